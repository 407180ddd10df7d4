"""Hot-swap on the real vLLM engine: no failed or truncated stream across a promotion, requests finish on the
adapter they started with, a drained version is unloaded, rollback, and the live A/B test deciding."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine

from deploy.local.engine import EngineProcess
from deploy.migrations import upgrade
from tests.feedback_helpers import PROMPT, auth, chat, drain, send, vote
from tests.gateway_helpers import MODEL_NAME, GatewayFactory
from tests.loop_helpers import admin, make_adapter, statuses
from trainer.ab import wilson
from trainer.promotion import remote_promotions

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path: Path, rdb: redis.Redis, base_routing: None) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    return url


def served_by(data: dict[str, Any]) -> list[str]:
    return [c["adapter"] for c in data["pairloop"]["choices"]]


def vllm_models(engine: EngineProcess) -> list[str]:
    return [m["id"] for m in httpx.get(f"{engine.url}/v1/models").json()["data"]]


async def stream(client: httpx.AsyncClient, base: str, first: asyncio.Event, counter: list[int]) -> dict[str, Any]:
    """One streaming chat request; what it received, and when it ended."""
    body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 200, "stream": True}
    lines: list[str] = []
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=auth()) as resp:
        status = resp.status_code
        async for line in resp.aiter_lines():
            if not line:
                continue
            if not lines:
                counter[0] += 1
                if counter[0] >= 16:
                    first.set()
            lines.append(line)
    return {"status": status, "lines": lines, "ended": time.perf_counter()}


def check_stream(result: dict[str, Any]) -> list[str]:
    """The adapters a complete, error-free stream was served by; raises if it failed or was cut short."""
    lines = result["lines"]
    assert result["status"] == 200 and lines[-1] == "data: [DONE]", lines[-3:]
    assert not any('"error"' in line for line in lines), [x for x in lines if '"error"' in x]
    chunks = [json.loads(line[5:]) for line in lines[:-1]]
    finish = {c["index"]: c["finish_reason"] for ch in chunks for c in ch["choices"] if c.get("finish_reason")}
    assert set(finish) == {0, 1} and all(f in ("stop", "length") for f in finish.values()), finish
    ext = next(ch["pairloop"] for ch in chunks if "pairloop" in ch)
    return [c["adapter"] for c in ext["choices"]]


def test_promotion_under_16_streams_fails_nothing_then_rollback(
    make_gateway: GatewayFactory, engine: EngineProcess, tiny_model: Path, store: str, tmp_path: Path
) -> None:
    v1 = make_adapter(tiny_model, store, tmp_path, 1, seed=1)
    v2 = make_adapter(tiny_model, store, tmp_path, 2, seed=2)
    # max_loras 2: no slot to keep the previous champion, so a replaced version is unloaded once drained
    gw = make_gateway([engine.url], feedback={"database_url": store}, vllm_max_loras=2, adapter_unload_grace_s=1)
    assert served_by(chat(gw.url)) == [MODEL_NAME, MODEL_NAME]

    r = admin(gw.url, "POST", f"/admin/adapters/{v1}/promote")
    assert r.status_code == 200, r.text
    assert served_by(chat(gw.url)) == [v1, v1]

    async def run() -> tuple[list[dict[str, Any]], float, float, httpx.Response]:
        first = asyncio.Event()
        counter = [0]
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(stream(client, gw.url, first, counter)) for _ in range(20)]
            await asyncio.wait_for(first.wait(), 60)
            started = time.perf_counter()
            promoted = await client.post(f"{gw.url}/admin/adapters/{v2}/promote", headers=auth())
            after = await client.post(
                f"{gw.url}/v1/chat/completions",
                json={"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 4},
                headers=auth(),
            )
            swapped = time.perf_counter()
            assert after.status_code == 200 and served_by(after.json()) == [v2, v2]
            return list(await asyncio.gather(*tasks)), started, swapped - started, promoted

    results, started, swap_to_served_s, promoted = asyncio.run(run())
    assert promoted.status_code == 200, promoted.text
    in_flight = sum(r["ended"] > started for r in results)
    assert in_flight >= 16, f"only {in_flight} streams were still running when the promotion started"
    adapters = [check_stream(r) for r in results]  # 0 failed, 0 truncated
    assert all(a == [v1, v1] for a in adapters), "a stream changed adapter mid-flight"
    # The swap does not wait for the old version's streams: the new one served while most of them still ran.
    still_running = sum(r["ended"] > started + swap_to_served_s for r in results)
    print(f"promote + first answer from v2: {swap_to_served_s:.2f} s; {still_running} of 20 old streams still running")
    assert still_running >= 8, f"only {still_running} streams outlived the swap ({swap_to_served_s:.1f} s)"
    assert swap_to_served_s < 5.0  # bench/swap.py measures the swap alone: tens of ms

    # v1 drained: unloaded from vLLM; the registry says who is who
    deadline = time.monotonic() + 10
    while v1 in vllm_models(engine) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert v1 not in vllm_models(engine) and v2 in vllm_models(engine)
    assert statuses(store) == {v1: "retired", v2: "champion"}

    started = time.perf_counter()
    r = admin(gw.url, "POST", "/admin/adapters/rollback")
    assert r.status_code == 200, r.text
    assert served_by(chat(gw.url, max_tokens=4)) == [v1, v1]
    assert time.perf_counter() - started < 1.0
    assert statuses(store) == {v1: "champion", v2: "retired"}
    listing = admin(gw.url, "GET", "/admin/adapters").json()
    assert listing["routing"]["champion"] == v1 and [a["name"] for a in listing["adapters"]] == [v2, v1]

    # A client may pin the base model or a served version (the simulation compares the champion with the base)
    assert served_by(chat(gw.url, model=f"{MODEL_NAME}@base", max_tokens=4)) == [MODEL_NAME, MODEL_NAME]
    assert served_by(chat(gw.url, model=f"{MODEL_NAME}@{v1}", max_tokens=4, n=1)) == [v1]
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": f"{MODEL_NAME}@{v2}", "messages": PROMPT},
        headers=auth("full"),
        timeout=30,
    )
    assert r.status_code == 404 and v1 in r.json()["error"]["message"]


def test_admin_adapter_calls_refuse_bad_input(make_gateway: GatewayFactory, engine: EngineProcess, store: str) -> None:
    gw = make_gateway([engine.url], feedback={"database_url": store})
    assert admin(gw.url, "POST", "/admin/adapters/rollback").status_code == 409  # nothing to roll back to
    r = admin(gw.url, "POST", "/admin/adapters/pl-v0009-deadbeef/promote")
    assert r.status_code == 404 and "no adapter named" in r.json()["error"]["message"]
    assert admin(gw.url, "POST", "/admin/adapters/..%2Fetc/promote").status_code in (400, 404)
    r = admin(gw.url, "POST", "/admin/adapters/x/promote")
    assert r.status_code == 400 and "not an adapter name" in r.json()["error"]["message"]
    r = httpx.post(f"{gw.url}/admin/adapters/rollback", headers=auth("chat"))
    assert r.status_code == 403
    assert httpx.get(f"{gw.url}/admin/adapters").status_code == 401


def wait_served(gw: str, adapters: set[str]) -> None:
    """Until a pair is served by exactly `adapters` (the gateway follows a swap made elsewhere within its poll)."""
    deadline = time.monotonic() + 5
    while set(served_by(chat(gw, max_tokens=4))) != adapters:
        assert time.monotonic() < deadline, f"the gateway did not switch to {adapters}"
        time.sleep(0.1)


def vote_for(gw: str, winner: str, n: int, users: int) -> None:
    """`n` votes, each on a fresh A/B pair, for the side served by `winner`."""
    for i in range(n):
        data = chat(gw, max_tokens=8, user=f"judge-{i % users}")
        sides = served_by(data)
        assert len(set(sides)) == 2, f"not an A/B pair: {sides}"
        assert send(gw, vote(data, preference=sides.index(winner), user=f"judge-{i % users}")).status_code == 202


def test_challenger_with_a_losing_record_is_retired_and_a_winning_one_promoted(
    make_gateway: GatewayFactory, engine: EngineProcess, tiny_model: Path, store: str, redis_url: str, tmp_path: Path
) -> None:
    champion, tied, loser, winner = (make_adapter(tiny_model, store, tmp_path, v, seed=v) for v in (1, 2, 3, 4))
    gw = make_gateway([engine.url], feedback={"database_url": store})
    assert admin(gw.url, "POST", f"/admin/adapters/{champion}/promote").status_code == 200
    db = create_engine(store)

    async def loop_call(action: Any) -> Any:
        # the worker's way: through the backends the gateway registered in Redis
        async with remote_promotions(redis_url, db) as loop:
            return await action(loop)

    asyncio.run(loop_call(lambda loop: loop.challenge(tied, ab_fraction=1.0)))
    wait_served(gw.url, {champion, tied})
    vote_for(gw.url, champion, 6, users=6)
    vote_for(gw.url, tied, 6, users=6)
    drain(redis_url, store)
    ab = asyncio.run(loop_call(lambda loop: loop.evaluate_ab(min_votes=10, alpha=0.05)))
    assert ab is not None and (ab.wins, ab.losses, ab.decision) == (6, 6, "wait")
    ab = asyncio.run(loop_call(lambda loop: loop.evaluate_ab(min_votes=10, alpha=0.05, max_votes=12)))
    assert ab is not None and ab.decision == "retire", "12 votes without a clear win reach max_votes"

    asyncio.run(loop_call(lambda loop: loop.challenge(loser, ab_fraction=1.0)))
    wait_served(gw.url, {champion, loser})
    vote_for(gw.url, champion, 12, users=6)
    drain(redis_url, store)
    ab = asyncio.run(loop_call(lambda loop: loop.evaluate_ab(min_votes=10, alpha=0.05)))
    assert ab is not None and (ab.wins, ab.losses, ab.decision) == (0, 12, "retire") and ab.evidence_worse >= 20
    routing = asyncio.run(loop_call(lambda loop: loop.routing()))
    assert routing.champion == champion and routing.challenger is None

    asyncio.run(loop_call(lambda loop: loop.challenge(winner, ab_fraction=1.0)))
    wait_served(gw.url, {champion, winner})
    vote_for(gw.url, winner, 9, users=6)
    drain(redis_url, store)
    ab = asyncio.run(loop_call(lambda loop: loop.evaluate_ab(min_votes=10, alpha=0.05)))
    assert ab is not None and ab.decision == "wait", "9 votes are fewer than ab_min_votes"
    ab = asyncio.run(loop_call(lambda loop: loop.evaluate_ab(min_votes=10, alpha=1e-4, max_votes=100)))
    assert ab is not None and ab.decision == "wait", "no clear win yet, and under max_votes"
    vote_for(gw.url, winner, 3, users=6)
    drain(redis_url, store)
    ab = asyncio.run(loop_call(lambda loop: loop.evaluate_ab(min_votes=10, alpha=0.05)))
    assert ab is not None and (ab.wins, ab.losses, ab.decision) == (12, 0, "promote") and ab.evidence >= 20
    assert statuses(store) == {champion: "retired", tied: "retired", loser: "retired", winner: "champion"}
    wait_served(gw.url, {winner})

    # The leaderboard ranks every variant that played on all those votes: winner > champion > loser.
    board = admin(gw.url, "GET", "/admin/leaderboard", params={"bootstrap": 50}).json()
    ranked = [v["name"] for v in board["variants"]]
    assert ranked.index(winner) < ranked.index(champion) < ranked.index(loser), board
    assert board["votes"] == 36 and {v["kind"] for v in board["variants"]} == {"adapter"}
    db.dispose()


def test_wilson_interval() -> None:
    assert wilson(0, 0, 0.95) == (0.0, 1.0)
    lo, hi = wilson(50, 100, 0.95)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
    lo, hi = wilson(12, 12, 0.95)
    assert 0.7 < lo < 0.8 and hi == 1.0  # 0.757 for 12 of 12
    assert wilson(0, 12, 0.95)[1] < 0.25
