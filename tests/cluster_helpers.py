"""deploy/compose.yaml's topology on one machine: every "host" a process group with its own data dir, on loopback.

Each pairloop host runs its compose service's command with its compose environment; what names another host
(`valkey:6379`, `postgres`, `s3:8333`, `vllm-1:8001`) or a path in a container is swapped for this machine's
(WIRING, and the address flags in `_localize`), and the test's own settings (TEST_ENV) go on top. So the compose
file and the tested topology cannot drift apart: a command that changes there changes here.

    valkey                    the shared Redis-compatible server (a real valkey-server)
    s3                        SeaweedFS's S3 gateway: the adapter store (tests/s3_server.py)
    PostgreSQL                the machine's, a database of its own
    migrate, model            the one-shots, run before the hosts start (`db upgrade`, `model build-tiny`)
    vllm-N (127.0.0.N+1:P)    `pairloop vllm` + `pairloop adapter-sync`, its own adapter directory
    gateway-N                 `pairloop gateway`, with its own /etc/hosts (a private mount namespace) that names
                              the vLLM hosts `vllm-pool`: PAIRLOOP_VLLM_URLS=dns+http://vllm-pool:P
    worker-N                  `pairloop worker` (feedback)
    trainer                   `pairloop worker --training`, its own adapters dir
    cron                      `pairloop cron`

No two hosts share a path but the base model (read-only, as compose's `models` volume): the vLLM hosts get
adapters only through the store and their sidecars. Used by tests/test_cluster.py and bench/cluster.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

from deploy.local.process import free_port
from deploy.local.redis_server import EmbeddedRedis
from tests import compose_file
from tests.gateway_helpers import KEYS, LEARNING_ENV, MODEL_NAME, SECRET, keys_json
from tests.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

POOL_NAME = "vllm-pool"
VALKEY_PASSWORD = "cluster-valkey-password"
VLLM_KEY = "cluster-vllm-api-key-0123456789"
"""The vLLM hosts' API key (compose's VLLM_API_KEY): the gateways and the trainer send it."""

COMPOSE_VARIABLES = {
    "REDIS_PASSWORD": VALKEY_PASSWORD,
    **{
        f"REDIS_{role}_PASSWORD": f"cluster-valkey-{role.lower()}-password"
        for role in ("GATEWAY", "WORKER", "TRAINER", "CRON", "SYNC")
    },
    "POSTGRES_PASSWORD": "unused-the-cluster-uses-its-own-database",
    "PAIRLOOP_SECRET": SECRET,
    "PAIRLOOP_API_KEYS": keys_json(),
    "VLLM_API_KEY": VLLM_KEY,
    "S3_ACCESS_KEY": ACCESS_KEY,
    "S3_SECRET_KEY": SECRET_KEY,
    "S3_READER_ACCESS_KEY": "cluster-s3-reader",
    "S3_READER_SECRET_KEY": "cluster-s3-reader-secret-key",
    # Each vLLM host a core of its own, as on machines of their own: left at `auto`, both engines bind to core 0,
    # and one restarted under load stalls in its start (the busy engine keeps the core; docs/RELIABILITY.md).
    "VLLM_1_CPU_CORES": "0",
    "VLLM_2_CPU_CORES": str(1 % (os.cpu_count() or 1)),
}
"""The env file the cluster gives deploy/compose.yaml."""

WIRING = (
    "PAIRLOOP_REDIS_URL",
    "PAIRLOOP_DATABASE_URL",
    "PAIRLOOP_ADAPTER_STORE_URL",
    "PAIRLOOP_ADAPTER_STORE_OPTIONS",
    "PAIRLOOP_VLLM_URLS",
    "PAIRLOOP_MODEL",
)
"""Compose variables that name other hosts or container paths: a host here gets this machine's value instead
(only where its compose service sets the variable)."""

COMPOSE_HOSTS: tuple[str, ...] = ("migrate", "model", "vllm-1", "vllm-1-sync", "vllm-2", "vllm-2-sync")
COMPOSE_HOSTS += ("gateway-1", "gateway-2", "worker", "trainer", "cron")
"""Every pairloop service of deploy/compose.yaml, each of which the cluster runs (tests/test_shipping.py checks
the list against the file)."""

TRAINER_ENV = LEARNING_ENV | {
    "PAIRLOOP_CHECK_INTERVAL_S": "3600",  # rounds in the test are started by POST /admin/train
}
"""The test's settings for the trainer and cron: a gate that 40 votes can pass, rounds started by the test."""

GATEWAY_ENV = {
    "PAIRLOOP_VLLM_DISCOVERY_S": "0.5",
    "PAIRLOOP_HEALTH_INTERVAL_S": "0.5",
    "PAIRLOOP_ADAPTER_POLL_S": "0.1",
}
"""The test's settings for the gateways: faster discovery and polling, to measure in seconds."""


def compose_service(name: str) -> tuple[list[str], dict[str, str]]:
    """A pairloop service of deploy/compose.yaml: its command (after `pairloop`) and its environment."""
    service = compose_file.pairloop_services(compose_file.load(COMPOSE_VARIABLES))[name]
    env = compose_file.environment(service)
    services = "|".join(re.escape(n) for n in compose_file.load(COMPOSE_VARIABLES)["services"])
    for key, value in env.items():
        if key not in WIRING:
            hosts = re.findall(rf"(?:^|//|@)({services})(?::\d+|/|$)", value)
            assert not hosts, f"compose {name}: {key} names another host ({hosts}): add it to WIRING"
    return list(service["command"]), env


def _localize(name: str, command: list[str], **flags: str) -> list[str]:
    """`command` with the value of each `--flag` replaced (each must be in the compose command)."""
    out = list(command)
    for flag, value in flags.items():
        option = "--" + flag.replace("_", "-")
        assert option in out, f"compose {name}: `{' '.join(command)}` has no {option}"
        out[out.index(option) + 1] = value
    return out


def can_isolate_hosts() -> bool:
    """Whether this process may give a gateway its own /etc/hosts (a mount namespace needs root)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare") is not None


def port_free_on(addresses: list[str], port: int) -> bool:
    for address in addresses:
        with socket.socket() as s:
            try:
                s.bind((address, port))
            except OSError:
                return False
    return True


def pool_port(addresses: list[str]) -> int:
    """A port free on every one of `addresses`."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port_free_on(addresses, port):
            return port
    raise RuntimeError("no port free on every vLLM address")


@dataclass
class Host:
    """One "machine": a process group started by `command`, its data dir, its log."""

    name: str
    dir: Path
    command: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = (self.dir / "host.log").open("ab")
        self.proc = subprocess.Popen(
            self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.dir
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole process group: the host is gone at once, nothing shuts down cleanly."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._reap()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout_s)
        self._reap()

    def _reap(self) -> None:
        """SIGKILL whatever is left of the group (a child that outlived its parent)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def log_tail(self, chars: int = 3000) -> str:
        path = self.dir / "host.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}


@dataclass
class Cluster:
    root: Path
    tiny_model: Path
    pg_url: str
    valkey: EmbeddedRedis | None = None
    s3: SeaweedS3 | None = None
    port: int = 0
    hosts: dict[str, Host] = field(default_factory=dict)
    pool: list[str] = field(default_factory=list)
    ran: set[str] = field(default_factory=set)
    """The compose services this cluster has run."""
    """The addresses `vllm-pool` resolves to on every gateway host."""

    # -- shared services -------------------------------------------------------------------------

    def start_services(self) -> None:
        self.valkey = EmbeddedRedis(self.root / "valkey", VALKEY_PASSWORD)
        self.valkey.start()
        admin = redis.Redis.from_url(self.valkey.url)  # compose's ACL users, each role connecting as its own
        for user, rules in compose_file.valkey_users(compose_file.load(COMPOSE_VARIABLES)).items():
            admin.execute_command("ACL", "SETUSER", user, *rules)
        admin.close()
        identities = json.loads(compose_file.load(COMPOSE_VARIABLES)["configs"]["s3-identities"]["content"])
        self.s3 = SeaweedS3(self.root / "s3", identities=identities["identities"])  # compose's, read-only one too
        self.s3.start()
        self.port = pool_port([vllm_address(i) for i in range(1, 4)])
        for one_shot in ("migrate", "model"):  # before the hosts, as compose orders them
            self.run_once(one_shot)

    @property
    def valkey_port(self) -> int:
        assert self.valkey is not None
        return self.valkey.port

    @property
    def redis_url(self) -> str:
        assert self.valkey is not None
        return self.valkey.url

    @property
    def models(self) -> Path:
        """The base model, read by the vLLM hosts and the trainer (compose's `models` volume)."""
        return self.root / "models" / "tiny"

    def wiring(self) -> dict[str, str]:
        assert self.s3 is not None
        return {
            "PAIRLOOP_REDIS_URL": self.redis_url,
            "PAIRLOOP_DATABASE_URL": self.pg_url,
            "PAIRLOOP_ADAPTER_STORE_URL": self.s3.url,
            "PAIRLOOP_ADAPTER_STORE_OPTIONS": json.dumps(self.s3.options()),
            "PAIRLOOP_VLLM_URLS": f"dns+http://{POOL_NAME}:{self.port}",
            "PAIRLOOP_MODEL": str(self.models),
        }

    def host_env(self, service: str, data_dir: Path, **extra: str) -> dict[str, str]:
        """The environment of compose `service` on this machine: its own variables, this machine's wiring
        for the ones that name hosts, its data dir, then `extra` (the test's settings)."""
        _, env = compose_service(service)
        self.ran.add(service)
        wiring = self.wiring()
        local = {k: wiring[k] if k in WIRING else v for k, v in env.items()}
        if "PAIRLOOP_REDIS_URL" in env:  # the service's own ACL user, this machine's Valkey
            userinfo = urlsplit(env["PAIRLOOP_REDIS_URL"]).netloc.rsplit("@", 1)[0]
            local["PAIRLOOP_REDIS_URL"] = f"redis://{userinfo}@127.0.0.1:{self.valkey_port}/0"
        if "PAIRLOOP_ADAPTER_STORE_OPTIONS" in env:  # the service's own identity, this machine's endpoint
            options = json.loads(env["PAIRLOOP_ADAPTER_STORE_OPTIONS"])
            local["PAIRLOOP_ADAPTER_STORE_OPTIONS"] = json.dumps(options | {"endpoint_url": self.s3.endpoint})
        return _clean_env() | local | {"PAIRLOOP_DATA_DIR": str(data_dir)} | extra

    def run_once(self, service: str) -> None:
        """A one-shot compose service (the migration, the model build), run to completion."""
        command, _ = compose_service(service)
        if service == "model":
            if not self.models.exists():
                self.models.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(self.tiny_model, self.models)  # the session's build: `build-tiny` finds it cached
            command = _localize(service, command, out=str(self.models))
        host_dir = self.root / service
        host_dir.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            self._pairloop(*command), env=self.host_env(service, host_dir), capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, f"compose {service}: `pairloop {' '.join(command)}` failed:\n{out.stderr[-3000:]}"

    # -- hosts -----------------------------------------------------------------------------------

    def _pairloop(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "deploy", *args]

    def add_vllm(self, n: int, *, with_sync: bool = True) -> Host:
        """vLLM host `n` (address 127.0.0.{n+1}): compose's `vllm-N` and `vllm-N-sync`, one process group
        (`with_sync=False`: the sidecar later, by `add_sync`). A host beyond the file's copies its last one."""
        name = f"vllm-{n}"
        service = _compose_vllm(n)
        host_dir = self.root / name
        host_dir.mkdir(parents=True, exist_ok=True)
        address = vllm_address(n)
        url = f"http://{address}:{self.port}"
        command, _ = compose_service(service)
        adapters = str(host_dir / "adapters")
        vllm = _join(
            self._pairloop(*_localize(service, command, host=address, port=str(self.port), adapter_dir=adapters))
        )
        if with_sync:  # one process group, each process with its own service's environment (compose's)
            sync_env = self.host_env(service + "-sync", host_dir)
            sync = _join(["env", "-i", *(f"{k}={v}" for k, v in sync_env.items()), *self._sync_command(n)])
            script = f"{vllm} & {sync} & wait"
        else:
            script = f"exec {vllm}"
        host = Host(name, host_dir, ["sh", "-c", script], self.host_env(service, host_dir), url=url)
        self.hosts[name] = host
        host.start()
        return host

    def _sync_command(self, n: int) -> list[str]:
        service = _compose_vllm(n) + "-sync"
        command, _ = compose_service(service)
        self.ran.add(service)
        url = f"http://{vllm_address(n)}:{self.port}"
        adapters = str(self.root / f"vllm-{n}" / "adapters")
        return self._pairloop(*_localize(service, command, vllm_url=url, dir=adapters), "--interval-s", "0.2")

    def add_sync(self, n: int) -> Host:
        """The adapter-sync of vLLM host `n`, started on its own (same host dir)."""
        vllm = self.hosts[f"vllm-{n}"]
        env = self.host_env(_compose_vllm(n) + "-sync", vllm.dir)
        host = Host(f"vllm-{n}-sync", vllm.dir, self._sync_command(n), env)
        self.hosts[host.name] = host
        host.start()
        return host

    def write_pool(self, addresses: list[str]) -> None:
        """What `vllm-pool` resolves to on each gateway host (its own /etc/hosts, rewritten in place)."""
        self.pool = addresses
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"] + [f"{a} {POOL_NAME}" for a in addresses]
        for host in self.hosts.values():
            hosts_file = host.dir / "etc-hosts"
            if host.name.startswith("gateway-"):
                with hosts_file.open("r+" if hosts_file.exists() else "w") as f:  # same inode: the bind mount sees it
                    f.seek(0)
                    f.truncate()
                    f.write("\n".join(lines) + "\n")

    def add_gateway(self, n: int, **env: str) -> Host:
        """Compose's `gateway-N`, with its own /etc/hosts naming the vLLM pool (a private mount namespace)."""
        name = f"gateway-{n}"
        host_dir = self.root / name
        host_dir.mkdir(parents=True, exist_ok=True)
        hosts_file = host_dir / "etc-hosts"
        hosts_file.touch()
        port = free_port()
        command, _ = compose_service(name)
        gateway = _join(self._pairloop(*_localize(name, command, host="127.0.0.1", port=str(port))))
        script = f"mount --bind {hosts_file} /etc/hosts && exec {gateway}"
        variables = self.host_env(name, host_dir, **GATEWAY_ENV, **env)
        host = Host(name, host_dir, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], variables)
        host.url = f"http://127.0.0.1:{port}"
        self.hosts[name] = host
        self.write_pool(self.pool)
        host.start()
        return host

    def add_worker(self, name: str, service: str | None = None, **env: str) -> Host:
        """Compose's `service` (default: `name`): a feedback worker, the trainer or cron."""
        service = service or name
        host_dir = self.root / name
        host_dir.mkdir(parents=True, exist_ok=True)
        command, _ = compose_service(service)
        extra = TRAINER_ENV if service in ("trainer", "cron") else {}
        host = Host(name, host_dir, self._pairloop(*command), self.host_env(service, host_dir, **(extra | env)))
        self.hosts[name] = host
        host.start()
        return host

    def stop(self) -> None:
        for host in reversed(list(self.hosts.values())):
            host.stop()
        if self.s3:
            self.s3.stop()
        if self.valkey:
            self.valkey.stop()

    # -- waiting ---------------------------------------------------------------------------------

    def wait_http(self, host: Host, path: str, timeout_s: float = 300.0, ok: int = 200) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{host.url}{path}", timeout=2.0).status_code == ok:
                    return
            if not host.alive():
                raise AssertionError(f"{host.name} exited:\n{host.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{host.name} did not answer {path} in {timeout_s} s:\n{host.log_tail()}")
            time.sleep(0.25)


def _compose_vllm(n: int) -> str:
    """The compose service vLLM host `n` runs: `vllm-N`, or the file's last one for a host it does not have."""
    names = sorted(
        k for k, s in compose_file.load(COMPOSE_VARIABLES)["services"].items() if s.get("command", [""])[0] == "vllm"
    )
    return f"vllm-{n}" if f"vllm-{n}" in names else names[-1]


def vllm_address(n: int) -> str:
    return f"127.0.0.{n + 1}"


def _join(cmd: list[str]) -> str:
    import shlex

    return shlex.join(cmd)


def backends(gateway: Host) -> list[dict[str, Any]]:
    resp = httpx.get(f"{gateway.url}/admin/backends", headers=_admin(), timeout=10)
    resp.raise_for_status()
    data: list[dict[str, Any]] = resp.json()["backends"]
    return data


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}"}


@contextlib.contextmanager
def cluster(root: Path, tiny_model: Path, pg_url: str) -> Iterator[Cluster]:
    c = Cluster(root, tiny_model, pg_url)
    try:
        c.start_services()
        yield c
    finally:
        c.stop()


@dataclass
class Outcome:
    started: float
    elapsed: float
    status: int
    """HTTP status; 0: no answer within the client's timeout or the connection failed."""
    adapter: str | None
    error: str | None


class SteadyLoad:
    """`concurrency` clients sending chat requests back to back, alternating over `gateways`, each with a
    client timeout: records every outcome (status, adapter that answered, time)."""

    def __init__(
        self, gateways: list[str], concurrency: int = 4, max_tokens: int = 16, timeout_s: float = 60.0
    ) -> None:
        import threading

        self.gateways = gateways
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(concurrency)]
        self._lock = threading.Lock()

    def _client(self, i: int) -> None:
        n = 0
        with httpx.Client(timeout=self.timeout_s, headers=_admin()) as client:
            while not self._stop.is_set():
                gateway = self.gateways[(i + n) % len(self.gateways)]
                body = {
                    "model": MODEL_NAME,
                    "messages": [{"role": "user", "content": f"Tell me about tea, {i}-{n}."}],
                    "max_tokens": self.max_tokens,
                    "user": f"load-{i}-{n}",
                }
                n += 1
                started = time.monotonic()
                try:
                    resp = client.post(f"{gateway}/v1/chat/completions", json=body)
                    data = resp.json()
                    adapter = data["pairloop"]["choices"][0]["adapter"] if resp.status_code == 200 else None
                    error = None if resp.status_code == 200 else data.get("error", {}).get("message", resp.text)
                    outcome = Outcome(started, time.monotonic() - started, resp.status_code, adapter, error)
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    outcome = Outcome(started, time.monotonic() - started, 0, None, repr(exc))
                with self._lock:
                    self.outcomes.append(outcome)

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)

    def since(self, t: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.started >= t]


def vllm_metric(url: str, name: str) -> float:
    """The sum of one counter over its labels from a vLLM server's /metrics (which takes its key)."""
    resp = httpx.get(f"{url}/metrics", timeout=10, headers={"Authorization": f"Bearer {VLLM_KEY}"})
    assert resp.status_code == 200, resp.text
    text = resp.text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))
