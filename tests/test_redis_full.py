"""A Redis that fills up, on real parts (vLLM, Valkey with AOF, the gateway, an RQ worker): new chats and then
feedback get a 503 with Retry-After before Valkey is full, a gateway that lets it fill to the last byte still answers
503 (never 500) and half-writes nothing, both take requests again by themselves once memory comes back, and every
vote acknowledged on the way is stored."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from deploy.local.engine import EngineProcess
from deploy.local.redis_server import EmbeddedRedis
from tests.feedback_helpers import auth, chat_pair, drain, stored_feedback, vote
from tests.gateway_helpers import MODEL_NAME, GatewayFactory

pytestmark = pytest.mark.slow

FILLER_TTL_S = 300


def post_chat(base: str) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tea?"}], "max_tokens": 8}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth("full"), timeout=60)


def post_vote(base: str, completion: dict[str, Any], acked: set[str]) -> httpx.Response:
    r = httpx.post(f"{base}/v1/feedback", json=vote(completion), headers=auth("full"), timeout=60)
    if r.status_code == 202:
        acked.add(r.json()["id"])  # a repeated vote is answered with the first one's id
    return r


def fill(client: redis.Redis, share: float, prefix: str) -> None:
    """Filler keys (64 KiB, expiring after FILLER_TTL_S) until Redis holds `share` of its maxmemory, or refuses."""
    limit = int(client.config_get("maxmemory")["maxmemory"])
    n = 0
    while int(client.info("memory")["used_memory"]) < share * limit:  # type: ignore[index]
        try:
            client.set(f"filler:{prefix}:{n}", b"x" * 65536, ex=FILLER_TTL_S)
        except redis.exceptions.OutOfMemoryError:
            return
        n += 1


def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def refused(r: httpx.Response) -> bool:
    if r.status_code != 503:
        assert r.status_code in (200, 202), r.text
        return False
    assert int(r.headers["Retry-After"]) > 0 and r.json()["error"]["type"]
    return True


def test_a_full_redis_answers_503_and_recovers_by_itself_losing_no_vote(
    make_gateway: GatewayFactory, engine: EngineProcess, valkey: EmbeddedRedis, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    client = redis.Redis.from_url(valkey.url)
    aof = {"feedback_durability": "aof", "database_url": store_url}
    gw = make_gateway([engine.url], redis_url=valkey.url, feedback=aof)
    # A gateway that lets Redis fill to the last byte: Redis's own refusal must reach the client as a 503.
    raw = make_gateway([engine.url], redis_url=valkey.url, feedback=aof, redis_chat_limit=1.0, redis_feedback_limit=1.0)
    pairs = [chat_pair(gw.url, max_tokens=8) for _ in range(6)]
    acked: set[str] = set()
    assert post_vote(gw.url, pairs[0], acked).status_code == 202
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 8 * 2**20)  # type: ignore[index]

    # Between the chat limit (85%) and the feedback limit (95%): chats refused, votes taken.
    fill(client, 0.90, "a")
    until(lambda: refused(post_chat(gw.url)), 10, "a chat was served with Redis at 90% of its maxmemory")
    message = post_chat(gw.url).json()["error"]["message"]
    assert "nearly full" in message, message
    assert post_vote(gw.url, pairs[1], acked).status_code == 202

    # Over the feedback limit: votes refused too, with nothing queued for them.
    fill(client, 0.97, "b")
    until(lambda: refused(post_vote(gw.url, pairs[2], acked)), 10, "a vote was taken at 97%")
    queued = client.llen("rq:queue:pairloop-feedback")

    # Full: Redis itself refuses the record and the queued event (its limit set just under what it holds, since
    # a write is refused only once memory is over the limit, and freed buffers could bring it back under).
    limit = int(client.config_get("maxmemory")["maxmemory"])
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 2**20)  # type: ignore[index]
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("probe", "x")
    r = post_chat(raw.url)
    assert r.status_code == 503 and "Could not record" in r.json()["error"]["message"], r.text
    r = post_vote(raw.url, pairs[3], acked)
    assert r.status_code == 503 and "could not be queued" in r.json()["error"]["message"], r.text
    assert client.llen("rq:queue:pairloop-feedback") == queued  # no job, no claim: a retry is a first try
    assert not client.keys(f"pairloop:feedback:claim:{pairs[3]['id']}:*")

    # The filler expires, as records do (an expiry is a write Redis takes when full): both gateways take chats
    # and votes again by themselves.
    client.config_set("maxmemory", limit)
    for key in client.scan_iter("filler:*"):
        client.pexpire(key, 1)
    until(lambda: not refused(post_chat(gw.url)), 30, "chats still refused after memory came back")
    assert post_chat(raw.url).status_code == 200
    for pair in pairs[2:]:
        assert post_vote(gw.url, pair, acked).status_code == 202

    drain(valkey.url, store_url)
    assert set(stored_feedback(store_url)) == acked and len(acked) == len(pairs)
    client.close()
