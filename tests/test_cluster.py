"""Every part on its own host, as deploy/compose.yaml lays them out (tests/cluster_helpers.py): two gateways,
vLLM hosts that share no disk and come and go, two feedback workers, a trainer, a cron, Valkey, PostgreSQL and
an S3-compatible adapter store.

One test, in the order an operator would live it: chats and votes across gateways, stored once; a round trained
on the trainer host, published to the store, copied by each vLLM host's sidecar and promoted; both gateways
following; a shared rate limit; a rollback and a promotion on one gateway followed by the other; a vLLM host
added by DNS that serves the champion before it takes a request; one killed under load (the requests on it fail
with a clear 503, none hangs, the rest go to the survivors) and restarted with the champion.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from feedback.store import Feedback
from tests.cluster_helpers import (
    COMPOSE_HOSTS,
    VLLM_KEY,
    Host,
    SteadyLoad,
    backends,
    can_isolate_hosts,
    cluster,
    vllm_address,
    vllm_metric,
)
from tests.gateway_helpers import KEYS, MODEL_NAME
from tests.parts import missing
from trainer import registry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.usefixtures("hosts_isolated"),
]


@pytest.fixture(scope="module")
def hosts_isolated() -> None:
    if not can_isolate_hosts():
        missing("cluster", "gateway hosts need a mount namespace of their own (root and unshare)")


AUTH = {"Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}"}


def chat(gateway: Host, user: str, seed: int, **body: Any) -> httpx.Response:
    payload: dict[str, Any] = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me about tea."}]}
    payload |= {"max_tokens": 48, "user": user, "seed": seed, **body}
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=payload, headers=AUTH, timeout=60)


def vote(gateway: Host, data: dict[str, Any], preference: int, user: str, feedback_id: str) -> httpx.Response:
    body = {
        "completion_id": data["id"],
        "feedback_token": data["pairloop"]["feedback_token"],
        "feedback_id": feedback_id,
        "kind": "pairwise",
        "preference": preference,
        "user": user,
    }
    return httpx.post(f"{gateway.url}/v1/feedback", json=body, headers=AUTH, timeout=30)


def served_adapter(gateway: Host) -> str:
    resp = chat(gateway, f"probe-{uuid.uuid4().hex[:8]}", 1, max_tokens=4)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["pairloop"]["choices"][0]["adapter"])


def wait_until(what: str, check: Any, timeout_s: float, hosts: list[Host] | None = None) -> float:
    """Seconds until `check()` is true; fails with the hosts' logs after `timeout_s`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            logs = "\n".join(f"--- {h.name}\n{h.log_tail(2500)}" for h in hosts or [])
            raise AssertionError(f"{what}: not within {timeout_s} s\n{logs}")
        time.sleep(0.1)
    return time.monotonic() - started


def ready_with(gateway: Host, url: str, model: str) -> bool:
    for b in backends(gateway):
        if b["url"] == url:
            return bool(b["ready"] and model in b["models"])
    return False


def healthy(gateway: Host, url: str) -> bool:
    return any(b["url"] == url and b["healthy"] for b in backends(gateway))


def vllm_up(host: Host) -> bool:
    try:
        return httpx.get(f"{host.url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stored_feedback(pg_url: str, ids: list[str]) -> int:
    engine = create_engine(pg_url)
    try:
        with Session(engine) as session:
            return int(session.scalar(select(func.count()).select_from(Feedback).where(Feedback.id.in_(ids))) or 0)
    finally:
        engine.dispose()


def test_every_part_on_its_own_host(tmp_path: Path, tiny_model: Path, fresh_pg_url: str) -> None:
    figures: dict[str, Any] = {}
    with cluster(tmp_path, tiny_model, fresh_pg_url) as c:
        limit = json.dumps({"per_s": 0.05, "burst": 4})
        v1, v2 = c.add_vllm(1), c.add_vllm(2)
        c.pool = [vllm_address(1), vllm_address(2)]
        g1 = c.add_gateway(1, PAIRLOOP_CHAT_LIMIT_PER_USER=limit)
        g2 = c.add_gateway(2, PAIRLOOP_CHAT_LIMIT_PER_USER=limit)
        workers = [c.add_worker("worker-1", "worker"), c.add_worker("worker-2", "worker")]
        trainer = c.add_worker("trainer")
        c.add_worker("cron")
        assert c.ran == set(COMPOSE_HOSTS), "every pairloop service of deploy/compose.yaml runs here"
        everyone = [v1, v2, g1, g2, trainer, *workers]
        for g in (g1, g2):
            c.wait_http(g, "/readyz", timeout_s=420)
        wait_until(
            "both vLLM hosts ready at both gateways",
            lambda: all(ready_with(g, v.url, MODEL_NAME) for g in (g1, g2) for v in (v1, v2)),
            120,
            everyone,
        )

        # 1. chats through one gateway, votes through the other (and again through the first: one row each);
        # seeded chats sample the same pairs, so the same ones are held out (feedback.store.split_of) every run
        ids: list[str] = []
        for i in range(200):
            a, b = (g1, g2) if i % 2 == 0 else (g2, g1)
            user = f"judge-{i}"
            resp = chat(a, user, seed=i)
            assert resp.status_code == 200, resp.text
            data = resp.json()
            texts = [ch["message"]["content"] for ch in data["choices"]]
            if len(texts[0]) == len(texts[1]):
                continue
            feedback_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"cluster-vote-{i}"))
            preference = 0 if len(texts[0]) < len(texts[1]) else 1
            first = vote(b, data, preference, user, feedback_id)
            assert first.status_code == 202, first.text  # a token issued by one gateway, accepted by the other
            again = vote(a, data, preference, user, feedback_id)
            assert again.status_code in (200, 202), again.text
            ids.append(feedback_id)
            if len(ids) == 40:
                break
        assert len(ids) == 40  # as many as the loop test: enough for the gate to decide on held-out pairs
        wait_until("40 votes stored", lambda: stored_feedback(c.pg_url, ids) == 40, 60, workers)
        time.sleep(1.0)
        assert stored_feedback(c.pg_url, ids) == 40  # two workers, two submissions each: every vote once
        # each role talks to Valkey as its own ACL user (deploy/redis_acl.py)
        admin = redis.Redis.from_url(c.redis_url)
        users = {client["user"] for client in admin.client_list()} - {"default"}  # "default": the test's own
        admin.close()
        assert users == {"gateway", "worker", "trainer", "cron", "adapter-sync"}, users

        # 2. a round on the trainer host, published to the store, loaded by each vLLM host from its own copy
        resp = httpx.post(f"{g2.url}/admin/train", headers=AUTH, timeout=30)
        assert resp.status_code == 202, resp.text

        def round_done() -> dict[str, Any] | None:
            rounds = httpx.get(f"{g1.url}/admin/train", headers=AUTH, timeout=30).json()["rounds"]
            done = [r for r in rounds if r["status"] != "running"]
            return done[0] if done else None

        wait_until("the round finished", lambda: round_done() is not None, 300, [trainer])
        result = round_done()
        assert result is not None and result["status"] == "promoted", (result, trainer.log_tail())
        champion = str(result["adapter"])
        engine = create_engine(c.pg_url)
        with Session(engine) as session:
            adapter = registry.get(session, champion)
            assert adapter is not None and adapter.path == f"store:{champion}"
        engine.dispose()
        for v in (v1, v2):
            copy = v.dir / "adapters" / champion
            assert (copy / "adapter_model.safetensors").is_file(), f"{v.name} has no copy of its own"
            assert httpx.get(f"{v.url}/v1/models", timeout=10).status_code == 401, "vLLM takes only its key"
            auth = {"Authorization": f"Bearer {VLLM_KEY}"}
            models = httpx.get(f"{v.url}/v1/models", headers=auth, timeout=10).json()["data"]
            assert any(m["id"] == champion for m in models)
        figures["to_both_gateways_s"] = wait_until(
            "both gateways serve the champion",
            lambda: served_adapter(g1) == champion and served_adapter(g2) == champion,
            10,
            everyone,
        )

        # 3. one rate limit for both gateways: a user's burst of 4 is spent across them, not 4 on each
        answers = [chat((g1, g2)[i % 2], "limited-user", seed=i, max_tokens=2).status_code for i in range(8)]
        assert answers.count(200) <= 5 and answers.count(429) >= 3, answers

        # 4. an admin action on one gateway is followed by the other within the poll interval
        resp = httpx.post(f"{g1.url}/admin/adapters/rollback", headers=AUTH, timeout=120)
        assert resp.status_code == 200, resp.text
        figures["rollback_followed_s"] = wait_until(
            "g2 follows g1's rollback", lambda: served_adapter(g2) == MODEL_NAME, 5, [g2]
        )
        resp = httpx.post(f"{g2.url}/admin/adapters/{champion}/promote", headers=AUTH, timeout=120)
        assert resp.status_code == 200, resp.text
        figures["promote_followed_s"] = wait_until(
            "g1 follows g2's promotion", lambda: served_adapter(g1) == champion, 5, [g1]
        )

        # 5. a third vLLM host appears in DNS: it takes no request until the champion is loaded from its own
        # copy and probed. Its sidecar starts late, so that the gateways know it, healthy, for a while first.
        v3 = c.add_vllm(3, with_sync=False)
        wait_until("the third vLLM server is up", lambda: vllm_up(v3), 300, [v3])
        with SteadyLoad([g1.url, g2.url], concurrency=4) as load:
            c.write_pool([vllm_address(1), vllm_address(2), vllm_address(3)])
            wait_until("both gateways see the new host healthy", lambda: all(healthy(g, v3.url) for g in (g1, g2)), 30)
            time.sleep(3.0)
            for g in (g1, g2):
                (entry,) = [b for b in backends(g) if b["url"] == v3.url]
                assert not entry["ready"] and champion not in entry["models"], entry
            served = "vllm:request_success_total"
            assert vllm_metric(v3.url, served) == 0  # healthy for seconds under load, and not one request
            adding = time.monotonic()
            c.add_sync(3)
            wait_until(
                "the new host ready at both gateways",
                lambda: all(ready_with(g, v3.url, champion) for g in (g1, g2)),
                60,
                [v3],
            )
            figures["added_ready_s"] = round(time.monotonic() - adding, 1)
            assert (v3.dir / "adapters" / champion).is_dir()
            wait_until("the new host takes requests", lambda: vllm_metric(v3.url, served) >= 6, 60)
            assert all(o.status == 200 and o.adapter == champion for o in load.since(0)), [
                o for o in load.outcomes if o.status != 200
            ][:5]

            # 6. one vLLM host killed under steady load
            time.sleep(1.0)
            killed = time.monotonic()
            v1.kill()
            time.sleep(6.0)
            after = load.since(killed)
            late = load.since(killed + 2.0)

        failed = [o for o in after if o.status != 200]
        assert all(o.status in (502, 503) and o.error for o in failed), failed
        assert len(failed) <= load.concurrency, failed  # at most the requests that were on the dead host
        assert all(o.elapsed < 30 for o in after)  # none hangs
        assert late and all(o.status == 200 for o in late), [o for o in late if o.status != 200][:5]
        figures["killed_failed"] = len(failed)
        figures["killed_ok"] = len(after) - len(failed)

        # 7. the killed host restarts and comes back serving the champion, from its own copy
        v1.start()
        wait_until(
            "the restarted host is ready with the champion at both gateways",
            lambda: all(ready_with(g, v1.url, champion) for g in (g1, g2)),
            240,
            [v1, g1, g2],
        )
        assert served_adapter(g1) == champion and served_adapter(g2) == champion
    print("cluster figures:", figures)
