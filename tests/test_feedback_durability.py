"""Nothing acknowledged is lost: a worker SIGKILLed in the middle of 1,000 events, and Redis killed and
restarted under traffic. Both against the embedded Valkey with AOF (the API waits for WAITAOF)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from deploy.local.process import spawn, terminate
from deploy.local.redis_server import EmbeddedRedis
from deploy.migrations import upgrade
from feedback.queue import status
from tests.feedback_helpers import auth, count_feedback, seed_completions, stored_feedback, vote
from tests.gateway_helpers import GatewayFactory
from workers.settings import WorkerSettings

pytestmark = pytest.mark.slow

WORKER_ENV = {
    "PAIRLOOP_JOB_TIMEOUT_S": "5",
    "PAIRLOOP_JOB_ABANDONED_AFTER_S": "2",
    "PAIRLOOP_MAINTENANCE_INTERVAL_S": "2",
    "PAIRLOOP_JOB_RETRY_INTERVALS_S": "0,1,2,5,10",
}


def start_worker(redis_url: str, store_url: str, tmp: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **WORKER_ENV,
        "PAIRLOOP_REDIS_URL": redis_url,
        "PAIRLOOP_DATABASE_URL": store_url,
        "PAIRLOOP_DATA_DIR": str(tmp),
    }
    return spawn([sys.executable, "-m", "deploy", "worker"], env=env, log_path=log)


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, describe: Callable[[], object] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} {describe()}")
        time.sleep(0.2)


async def post_all(base: str, bodies: list[dict[str, Any]], concurrency: int = 16) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, headers=auth(), timeout=30) as client:

        async def one(body: dict[str, Any]) -> httpx.Response:
            async with limit:
                return await client.post("/v1/feedback", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(
    make_gateway: GatewayFactory, valkey: EmbeddedRedis, store_url: str, tmp_path: Path
) -> None:
    gw = make_gateway(
        ["http://127.0.0.1:9"],  # no vLLM needed: the completions are seeded
        redis_url=valkey.url,
        feedback={"database_url": store_url, "feedback_durability": "aof"},
    )
    bodies = [vote(c, preference=i % 2) for i, c in enumerate(seed_completions(valkey.url, 1000))]
    answers = asyncio.run(post_all(gw.url, bodies))
    assert [a.status_code for a in answers] == [202] * 1000
    acknowledged = {a.json()["id"] for a in answers}

    upgrade(store_url)
    worker = start_worker(valkey.url, store_url, tmp_path, tmp_path / "worker1.log")
    try:
        wait_for(lambda: count_feedback(store_url) >= 150, 120, "the first worker to store 150 events")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        terminate(worker, 5)
    at_kill = count_feedback(store_url)
    assert at_kill < 1000, "the worker finished before it was killed; the test proves nothing"

    connection = redis.Redis.from_url(valkey.url)
    settings = WorkerSettings()
    worker = start_worker(valkey.url, store_url, tmp_path, tmp_path / "worker2.log")
    try:
        wait_for(
            lambda: count_feedback(store_url) >= 1000,
            180,
            "all 1,000 events in the store",
            lambda: (count_feedback(store_url), status(connection, settings)),
        )
        wait_for(
            lambda: (s := status(connection, settings)).queued == 0 and s.started == 0 and s.scheduled == 0,
            60,
            "an empty queue",
            lambda: status(connection, settings),
        )
    finally:
        terminate(worker, 20)
    stored = stored_feedback(store_url)
    assert set(stored) == acknowledged  # none lost, none extra (and the primary key forbids duplicates)
    assert status(connection, settings).failed == 0
    connection.close()


def test_redis_killed_and_restarted_under_traffic(
    make_gateway: GatewayFactory, valkey: EmbeddedRedis, store_url: str, tmp_path: Path
) -> None:
    """Clients send feedback, retrying each event with its feedback_id after a 503, while the embedded
    Valkey is SIGKILLed and restarted by its supervisor (as `pairloop up` runs it) from its AOF. Every event
    answered 202 must reach the store."""
    gw = make_gateway(
        ["http://127.0.0.1:9"],
        redis_url=valkey.url,
        retry_after_s=1,
        feedback={"database_url": store_url, "feedback_durability": "aof"},
    )
    bodies = [vote(c, preference=0) for c in seed_completions(valkey.url, 400)]
    acknowledged: set[str] = set()
    refused: list[int] = []

    async def client(chunk: list[dict[str, Any]]) -> None:
        async with httpx.AsyncClient(base_url=gw.url, headers=auth(), timeout=30) as http:
            for body in chunk:
                for _ in range(100):
                    try:
                        resp = await http.post("/v1/feedback", json=body)
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
                        continue
                    if resp.status_code == 202:
                        acknowledged.add(resp.json()["id"])
                        break
                    assert resp.status_code == 503, resp.text
                    refused.append(resp.status_code)
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.01)

    async def chaos() -> None:
        await asyncio.sleep(1.0)
        valkey.child.kill()  # SIGKILL: no shutdown, no final fsync; its supervisor restarts it after 1 s

    async def main() -> None:
        chunks = [bodies[i::8] for i in range(8)]
        await asyncio.gather(chaos(), *(client(c) for c in chunks))

    asyncio.run(main())
    assert refused, "Redis was never seen down; the test proves nothing"
    assert len(acknowledged) == 400  # every event got its 202 in the end (retries with the same id)
    assert valkey.child.restarts == 1

    upgrade(store_url)
    worker = start_worker(valkey.url, store_url, tmp_path, tmp_path / "worker.log")
    try:
        wait_for(
            lambda: count_feedback(store_url) >= 400,
            120,
            "all acknowledged events in the store",
            lambda: (count_feedback(store_url), (tmp_path / "worker.log").read_text()[-3000:]),
        )
    finally:
        terminate(worker, 20)
    assert set(stored_feedback(store_url)) == acknowledged


def redis_away(valkey: EmbeddedRedis, seconds: float) -> None:
    """Valkey stopped for `seconds`, far longer than the clients' own retries (serving/redis_client.py: two,
    about a second), then started again from its AOF. 10 s: a worker waiting in a dequeue rode out a 4 s outage
    without noticing it (its retry reconnected), which tests nothing."""
    valkey.stop()
    time.sleep(seconds)
    valkey.start()


def test_a_worker_that_loses_redis_waits_for_it_and_stores_everything(
    make_gateway: GatewayFactory, valkey: EmbeddedRedis, store_url: str, tmp_path: Path
) -> None:
    """RQ's worker ends on a Redis error from wherever it is (taking a job, finishing one, its own death
    notice): the chaos bench found both feedback workers gone after a Valkey restart. This one must stay up,
    wait for Redis, start again and store what was acknowledged before, during and after."""
    gw = make_gateway(
        ["http://127.0.0.1:9"],
        redis_url=valkey.url,
        feedback={"database_url": store_url, "feedback_durability": "aof"},
    )
    completions = seed_completions(valkey.url, 600)
    first = asyncio.run(post_all(gw.url, [vote(c, preference=0) for c in completions[:300]]))
    assert [a.status_code for a in first] == [202] * 300
    upgrade(store_url)
    log = tmp_path / "worker.log"
    worker = start_worker(valkey.url, store_url, tmp_path, log)
    try:
        wait_for(lambda: count_feedback(store_url) >= 30, 120, "the worker to store 30 events")
        redis_away(valkey, 10)
        assert worker.poll() is None, log.read_text()[-3000:]
        later = asyncio.run(post_all(gw.url, [vote(c, preference=1) for c in completions[300:]]))
        assert [a.status_code for a in later] == [202] * 300, [a.text for a in later if a.status_code != 202][:3]
        wait_for(
            lambda: count_feedback(store_url) >= 600,
            120,
            "all 600 events in the store",
            lambda: (count_feedback(store_url), worker.poll(), log.read_text()[-3000:]),
        )
        assert worker.poll() is None
        text = log.read_text()
        # It noticed: in a job or its bookkeeping (our supervisor restarts it), or while taking the next job (RQ's
        # own dequeue loop waits for Redis and says so); which one depends on where the outage finds it.
        noticed = ("lost Redis", "ended without being asked to", "could not connect to Redis instance")
        assert any(line in text for line in noticed), "Redis never went away under it"
    finally:
        terminate(worker, 20)
    assert worker.returncode == 0, log.read_text()[-3000:]  # SIGTERM after the outage still stops it cleanly
    assert set(stored_feedback(store_url)) == {a.json()["id"] for a in first + later}
