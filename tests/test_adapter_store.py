"""The adapter store (a directory here; S3 in tests/test_cluster.py), the sidecar that copies adapters to a vLLM
host's disk, the host records the loaders read, and vLLM discovery by DNS. No engine: the fast lane."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError
from redis.asyncio import Redis

from serving import backends as backends_module
from serving.adapters.hosts import HOSTS_KEY, WANTED_KEY, host_path
from serving.adapters.routing import ROUTING_KEY, Routing
from serving.adapters.store import AdapterStore, is_store_ref, store_ref
from serving.adapters.sync import AdapterSync
from serving.backends import BackendPool, resolve_entry
from serving.errors import AdapterError
from serving.settings import ServingSettings


def adapter_dir(root: Path, weights: bytes = b"\x01" * 64) -> Path:
    d = root / "made"
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(weights)
    (d / "adapter_config.json").write_text('{"r": 4}')
    (d / "metadata.json").write_text('{"name": "pl-v0001-aaaaaaaa"}')
    return d


def test_publish_then_fetch_gives_the_same_files_checked(tmp_path: Path) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    made = adapter_dir(tmp_path)
    manifest = store.publish("pl-v0001-aaaaaaaa", made)
    assert set(manifest.files) == {"adapter_model.safetensors", "adapter_config.json", "metadata.json"}
    assert store.names() == ["pl-v0001-aaaaaaaa"]
    # blobs are named by their hash; nothing is left under a temporary name
    blobs = sorted(p.name for p in (tmp_path / "store" / "blobs" / "sha256").iterdir())
    assert blobs == sorted(e.sha256 for e in manifest.files.values())
    assert not list((tmp_path / "store" / "tmp").iterdir())
    copy = store.fetch("pl-v0001-aaaaaaaa", tmp_path / "host")
    assert copy == tmp_path / "host" / "pl-v0001-aaaaaaaa"
    for name in manifest.files:
        assert (copy / name).read_bytes() == (made / name).read_bytes()
    assert [p.name for p in (tmp_path / "host").iterdir()] == ["pl-v0001-aaaaaaaa"]  # no staging dir left


def test_names_are_immutable(tmp_path: Path) -> None:
    store = AdapterStore(f"file://{tmp_path / 'store'}")
    made = adapter_dir(tmp_path)
    first = store.publish("pl-v0001-aaaaaaaa", made)
    assert store.publish("pl-v0001-aaaaaaaa", made).files == first.files  # the same contents again: no change
    (made / "adapter_model.safetensors").write_bytes(b"\x02" * 64)
    with pytest.raises(AdapterError, match="immutable") as err:
        store.publish("pl-v0001-aaaaaaaa", made)
    assert err.value.status == 409
    assert store.manifest("pl-v0001-aaaaaaaa") == first


def test_an_unpublished_adapter_is_not_visible_and_cannot_be_fetched(tmp_path: Path) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    # blobs uploaded but no manifest yet (a publisher that died half-way): nothing is visible
    made = adapter_dir(tmp_path)
    manifest = store.publish("pl-v0001-aaaaaaaa", made)
    Path(store.manifest_key("pl-v0001-aaaaaaaa")).unlink()
    assert store.names() == [] and store.manifest("pl-v0001-aaaaaaaa") is None
    with pytest.raises(AdapterError, match="not in the adapter store") as err:
        store.fetch("pl-v0001-aaaaaaaa", tmp_path / "host")
    assert err.value.status == 404
    assert manifest.files  # the blobs stay: a later publish of the same name reuses them


def test_a_corrupted_blob_is_refused_and_leaves_no_copy(tmp_path: Path) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    manifest = store.publish("pl-v0001-aaaaaaaa", adapter_dir(tmp_path))
    digest = manifest.files["adapter_model.safetensors"].sha256
    Path(store.blob_key(digest)).write_bytes(b"\x03" * 64)  # same size, other bytes
    with pytest.raises(AdapterError, match=r"failed its check: adapter_model\.safetensors does not match") as err:
        store.fetch("pl-v0001-aaaaaaaa", tmp_path / "host")
    assert err.value.status == 502
    assert list((tmp_path / "host").iterdir()) == []


def test_a_damaged_local_copy_is_fetched_again(tmp_path: Path) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    made = adapter_dir(tmp_path)
    store.publish("pl-v0001-aaaaaaaa", made)
    copy = store.fetch("pl-v0001-aaaaaaaa", tmp_path / "host")
    (copy / "adapter_model.safetensors").write_bytes(b"broken")
    again = store.fetch("pl-v0001-aaaaaaaa", tmp_path / "host")
    assert (again / "adapter_model.safetensors").read_bytes() == (made / "adapter_model.safetensors").read_bytes()


def test_a_manifest_cannot_write_outside_the_adapter_directory(tmp_path: Path) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    manifest = store.publish("pl-v0001-aaaaaaaa", adapter_dir(tmp_path))
    raw = json.loads(manifest.model_dump_json())
    raw["files"]["../../escaped"] = raw["files"].pop("metadata.json")
    Path(store.manifest_key("pl-v0001-aaaaaaaa")).write_text(json.dumps(raw))
    with pytest.raises(AdapterError, match="unsafe file path"):
        store.fetch("pl-v0001-aaaaaaaa", tmp_path / "host" / "deep")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "host" / "escaped").exists()


def test_store_refs() -> None:
    assert store_ref("pl-v0002-bbbbbbbb") == "store:pl-v0002-bbbbbbbb"
    assert is_store_ref("store:x") and not is_store_ref("/srv/adapters/x")


# -- host records and the sidecar ------------------------------------------------------------------


async def test_host_path_waits_for_the_sidecar_and_answers_its_directory(
    rdb: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    store.publish("pl-v0001-aaaaaaaa", adapter_dir(tmp_path))
    url = "http://10.0.0.7:8001"
    async with Redis.from_url(redis_url) as client:
        # the embedded default: a plain path is used as it is
        assert await host_path(client, url, "/data/adapters/x", timeout_s=0) == "/data/adapters/x"
        with pytest.raises(AdapterError, match="no `pairloop adapter-sync` reports for the vLLM server") as err:
            await host_path(client, url, store_ref("pl-v0001-aaaaaaaa"), timeout_s=0.2)
        assert err.value.status == 503
        assert rdb.zscore(WANTED_KEY, "pl-v0001-aaaaaaaa") is not None  # asked for: every sidecar fetches it
        sync = AdapterSync(client, store, url, tmp_path / "vllm-host" / "adapters")
        assert await sync.sync_once() == {"pl-v0001-aaaaaaaa"}
        path = await host_path(client, url, store_ref("pl-v0001-aaaaaaaa"), timeout_s=1)
        assert path == str((tmp_path / "vllm-host" / "adapters" / "pl-v0001-aaaaaaaa").resolve())
        assert (Path(path) / "adapter_model.safetensors").is_file()
        # a host with its own disk cannot load a path on the trainer's disk: say what to configure
        with pytest.raises(AdapterError, match="set PAIRLOOP_ADAPTER_STORE_URL on the training worker"):
            await host_path(client, url, "/trainer/data/adapters/pl-v0001-aaaaaaaa", timeout_s=0)


async def test_the_sidecar_keeps_what_is_served_and_what_rollback_needs(
    rdb: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    store = AdapterStore(str(tmp_path / "store"))
    names = []
    for i in range(3):
        name = f"pl-v000{i + 1}-aaaaaaa{i}"
        store.publish(name, adapter_dir(tmp_path / f"a{i}", bytes([i + 1]) * 64))
        names.append(name)
    routing = Routing(
        champion=names[1],
        history=[None, names[0]],
        paths={names[0]: store_ref(names[0]), names[1]: store_ref(names[1])},
    )
    rdb.set(ROUTING_KEY, routing.model_dump_json())
    async with Redis.from_url(redis_url) as client:
        sync = AdapterSync(client, store, "http://10.0.0.8:8001", tmp_path / "host")
        assert await sync.sync_once() == {names[0], names[1]}
        assert await sync.sync_once() == set()  # nothing new
        record = json.loads(rdb.hget(HOSTS_KEY, "http://10.0.0.8:8001"))  # type: ignore[arg-type]
        assert record["have"] == sorted(names[:2]) and record["at"] <= time.time()
        assert not (tmp_path / "host" / names[2]).exists()  # never served nor asked for
        # a restarted sidecar checks what its disk holds and reports it again
        again = AdapterSync(client, store, "http://10.0.0.8:8001", tmp_path / "host")
        assert await again.sync_once() == {names[0], names[1]}


# -- discovery -------------------------------------------------------------------------------------


async def test_a_dns_entry_resolves_to_one_backend_per_address() -> None:
    assert await resolve_entry("dns+http://127.0.0.1:8001") == ["http://127.0.0.1:8001"]
    assert await resolve_entry("dns+http://[::1]:8001") == ["http://[::1]:8001"]


async def test_discovery_adds_new_addresses_unready_and_drains_vanished_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"dns+http://vllm:8001": ["http://10.0.0.1:8001", "http://10.0.0.2:8001"]}

    async def resolve(entry: str) -> list[str]:
        if entry not in answers:
            raise OSError("Name or service not known")
        return answers[entry]

    monkeypatch.setattr(backends_module, "resolve_entry", resolve)
    pool = BackendPool(["http://10.0.0.9:8001", "dns+http://vllm:8001"], client=None)  # type: ignore[arg-type]
    pool.gated = True
    await pool.discover()
    assert [b.url for b in pool.backends] == ["http://10.0.0.9:8001", "http://10.0.0.1:8001", "http://10.0.0.2:8001"]
    for b in pool.backends:
        b.healthy = True
    assert not pool.ready  # healthy, but nothing made them ready (the follower loads and probes first)
    pool.set_ready(pool.backends[1])
    assert pool.pick().url == "http://10.0.0.1:8001"
    # 10.0.0.1 leaves DNS while a request is on it: drained, then forgotten once the request is done
    answers["dns+http://vllm:8001"] = ["http://10.0.0.2:8001", "http://10.0.0.3:8001"]
    gone = pool.backends[1]
    gone.in_flight = 1
    await pool.discover()
    assert gone.draining and gone in pool.backends
    with pytest.raises(Exception, match="No inference backend"):
        pool.pick()
    gone.in_flight = 0
    await pool.discover()
    assert [b.url for b in pool.backends] == ["http://10.0.0.9:8001", "http://10.0.0.2:8001", "http://10.0.0.3:8001"]
    # a failing lookup keeps the last answer rather than draining every backend
    answers.clear()
    await pool.discover()
    assert [b.url for b in pool.backends if not b.draining] == [
        "http://10.0.0.9:8001",
        "http://10.0.0.2:8001",
        "http://10.0.0.3:8001",
    ]


def test_vllm_urls_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIRLOOP_VLLM_URLS", "http://10.0.0.5:8001, dns+http://vllm.ns.svc:8000")
    assert ServingSettings().vllm_urls == ["http://10.0.0.5:8001", "dns+http://vllm.ns.svc:8000"]
    monkeypatch.setenv("PAIRLOOP_VLLM_URLS", "10.0.0.5:8001")
    with pytest.raises(ValidationError, match="is not an http"):
        ServingSettings()


@pytest.mark.slow
def test_the_sidecars_s3_identity_can_read_the_store_and_not_write_it(tmp_path: Path) -> None:
    """deploy/compose.yaml's two S3 identities, on a real SeaweedFS: the trainer's publishes, the sidecars' fetches
    and can neither publish nor overwrite a manifest (so a sidecar cannot change what a name serves)."""
    from tests import compose_file
    from tests.s3_server import SeaweedS3

    variables = compose_file.env_example()
    identities = json.loads(compose_file.load(variables)["configs"]["s3-identities"]["content"])["identities"]
    s3 = SeaweedS3(tmp_path / "s3", identities=identities)
    s3.start()
    try:

        def store_as(service: str) -> AdapterStore:
            options = json.loads(
                compose_file.environment(compose_file.load(variables)["services"][service])[
                    "PAIRLOOP_ADAPTER_STORE_OPTIONS"
                ]
            )
            return AdapterStore(s3.url, options | {"endpoint_url": s3.endpoint})

        trainer, sidecar = store_as("trainer"), store_as("vllm-1-sync")
        trainer.publish("pl-v0001-aaaaaaaa", adapter_dir(tmp_path / "a"))
        assert sidecar.names() == ["pl-v0001-aaaaaaaa"]
        copy = sidecar.fetch("pl-v0001-aaaaaaaa", tmp_path / "host")
        assert (copy / "adapter_model.safetensors").read_bytes() == b"\x01" * 64
        with pytest.raises((AdapterError, PermissionError, OSError)):
            sidecar.publish("pl-v0002-bbbbbbbb", adapter_dir(tmp_path / "b", b"\x02" * 64))
        with pytest.raises((PermissionError, OSError)):
            sidecar.fs.pipe_file(sidecar.manifest_key("pl-v0001-aaaaaaaa"), b"{}")
        assert trainer.names() == ["pl-v0001-aaaaaaaa"]
        assert trainer.manifest("pl-v0001-aaaaaaaa") is not None
    finally:
        s3.stop()
