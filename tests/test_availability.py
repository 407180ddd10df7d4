"""When vLLM or Redis is gone: 503 with Retry-After, readiness false, nothing recorded; and recovery."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import redis

from deploy.local.engine import EngineProcess
from deploy.local.process import free_port
from deploy.local.redis_server import EmbeddedRedis
from deploy.migrations import upgrade
from tests.feedback_helpers import chat, send, vote
from tests.gateway_helpers import KEYS, GatewayFactory
from tests.loop_helpers import admin, make_adapter

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}"}
BODY = {"messages": [{"role": "user", "content": "What is tea?"}], "max_tokens": 8}


def wait_for(predicate, timeout_s: float, step_s: float = 0.25) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return False


def test_unreachable_vllm_is_503_with_retry_after(make_gateway: GatewayFactory, rdb: redis.Redis) -> None:
    gw = make_gateway([f"http://127.0.0.1:{free_port()}"])
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, headers=AUTH)
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "3"
    assert r.json()["error"]["type"] == "service_unavailable"
    ready = httpx.get(f"{gw.url}/readyz")
    assert ready.status_code == 503 and ready.json()["backends_healthy"] == 0
    assert httpx.get(f"{gw.url}/healthz").status_code == 200
    assert not list(rdb.scan_iter("pairloop:completion:*"))


def test_unreachable_redis_is_503_and_nothing_is_served(make_gateway: GatewayFactory, engine: EngineProcess) -> None:
    gw = make_gateway([engine.url], redis_url=f"redis://127.0.0.1:{free_port()}/0")
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, headers=AUTH, timeout=30)
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert "Redis" in r.json()["error"]["message"]
    ready = httpx.get(f"{gw.url}/readyz")
    assert ready.status_code == 503 and ready.json()["redis"] is False


def test_requests_spread_over_replicas_and_skip_a_dead_one(make_gateway: GatewayFactory, engine: EngineProcess) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = make_gateway([dead, engine.url])
    for _ in range(4):
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
    ready = httpx.get(f"{gw.url}/readyz").json()
    assert ready["backends"] == 2 and ready["backends_healthy"] == 1


def test_vllm_killed_then_back(
    make_gateway: GatewayFactory,
    engine: EngineProcess,
    rdb: redis.Redis,
    redis_url: str,
    tiny_model: Path,
    tmp_path: Path,
    base_routing: None,
) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(store)
    champion = make_adapter(tiny_model, store, tmp_path, 1, seed=7)
    gw = make_gateway([engine.url], feedback={"database_url": store})
    assert httpx.get(f"{gw.url}/readyz").status_code == 200
    assert admin(gw.url, "POST", f"/admin/adapters/{champion}/promote").status_code == 200
    restarts = engine.restarts
    # a stream in flight when vLLM dies ends with an error chunk, and nothing is recorded for it
    body = {**BODY, "stream": True, "max_tokens": 200}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        engine.kill()
        rest = [line for line in lines if line]
    cid = json.loads(first[5:])["id"]
    assert any('"error"' in line for line in rest), rest[-3:]
    assert rest[-1] == "data: [DONE]"
    assert not any('"pairloop"' in line for line in rest), "a cut stream must not get a feedback token"
    assert rdb.get(f"pairloop:completion:{cid}") is None
    assert wait_for(lambda: httpx.get(f"{gw.url}/readyz").status_code == 503, 10), "readiness did not fail"
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, headers=AUTH, timeout=30)
    assert r.status_code == 503 and r.headers["Retry-After"] == "3"
    # the launcher restarts vLLM; the gateway notices by itself
    assert wait_for(lambda: httpx.get(f"{gw.url}/readyz").status_code == 200, 300, 1.0), "vLLM did not return"
    assert engine.restarts == restarts + 1
    # the restarted vLLM has no adapter; the gateway loads the champion again before sending it requests
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, headers=AUTH, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert [c["adapter"] for c in r.json()["pairloop"]["choices"]] == [champion, champion]
    assert champion in [m["id"] for m in httpx.get(f"{engine.url}/v1/models").json()["data"]]


def test_redis_unreachable_is_503_on_chat_and_feedback_and_the_service_recovers_by_itself(
    make_gateway: GatewayFactory, engine: EngineProcess, valkey: EmbeddedRedis, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(store)
    gw = make_gateway([engine.url], redis_url=valkey.url, feedback={"database_url": store})
    served = chat(gw.url)
    valkey.stop()  # Redis gone: records, the queue and the limits are all in it
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=BODY, headers=AUTH, timeout=30)
    assert r.status_code == 503 and r.headers["Retry-After"] == "3", r.text
    assert r.json()["error"]["type"] == "service_unavailable"
    r = send(gw.url, vote(served))
    assert r.status_code == 503 and r.headers["Retry-After"] == "3", r.text
    assert httpx.get(f"{gw.url}/readyz").status_code == 503
    valkey.start()  # back on the same port, its data from the append-only file; the gateway is not restarted
    assert wait_for(lambda: httpx.get(f"{gw.url}/readyz").status_code == 200, 30), "readiness did not come back"
    assert send(gw.url, vote(served)).status_code == 202, "the completion served before is still known"
    assert len(chat(gw.url)["choices"]) == 2
