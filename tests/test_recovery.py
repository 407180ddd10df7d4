"""Rounds recover from a crash: a training worker SIGKILLed mid-round frees its job within seconds (the rerun waits
for its lock to lapse), the round runs again with its trigger and the interrupted one is marked failed; two
`pairloop cron` do not double the periodic check."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import redis
from rq import Queue
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from deploy.local.process import signal_group, spawn, terminate
from deploy.local.redis_server import EmbeddedRedis
from deploy.migrations import upgrade
from feedback.store import save_event
from tests.store_helpers import event, record
from trainer.errors import RoundBusy
from trainer.loop import check
from trainer.queue import LOCK_KEY, RoundLock, enqueue_round
from trainer.settings import TrainerSettings
from workers.cron import JsonCronJob


def test_two_cron_schedulers_enqueue_one_check_per_interval(valkey: EmbeddedRedis) -> None:
    connection = redis.Redis.from_url(valkey.url)
    jobs = [JsonCronJob(queue_name="pairloop-control", func=check, interval=2) for _ in range(2)]
    assert jobs[0].enqueue(connection) is not None
    assert jobs[1].enqueue(connection) is None, "the second scheduler's tick in the same interval enqueues nothing"
    assert Queue("pairloop-control", connection=connection).count == 1
    time.sleep(2.0)  # the next interval (the claim lasts 90% of one)
    assert jobs[1].enqueue(connection) is not None
    assert Queue("pairloop-control", connection=connection).count == 2
    connection.close()


def test_a_rerun_waits_for_a_dead_workers_lock_to_lapse(valkey: EmbeddedRedis) -> None:
    """The requeued job of a killed round can start before the dead worker's lock expires: it waits for it."""
    connection = redis.Redis.from_url(valkey.url)
    set_at = time.monotonic()
    connection.set(LOCK_KEY, "a-dead-worker", px=1500)  # no one renews it
    with pytest.raises(RoundBusy):
        RoundLock(connection).__enter__()
    with RoundLock(connection, wait_s=10) as lock:  # no RoundBusy: it waited for the lapse
        assert time.monotonic() - set_at >= 1.4, "taken only once the dead worker's lock lapsed"
        assert connection.get(LOCK_KEY) == lock.token.encode()
    assert not connection.exists(LOCK_KEY)
    # a live holder keeps its lock past its TTL (its thread renews it every second here): a second one waiting
    # more than twice the TTL gives up; without the renewals the key would lapse after 3 s and be taken
    with RoundLock(connection, ttl_s=3) as holder:
        started = time.monotonic()
        with pytest.raises(RoundBusy):
            RoundLock(connection, wait_s=7).__enter__()
        assert time.monotonic() - started >= 7
        assert connection.get(LOCK_KEY) == holder.token.encode()
    connection.close()


def rounds(db: Path) -> list[tuple[int, str, str, str | None]]:
    """(id, trigger, status, error) of every round in the log."""
    with closing(sqlite3.connect(db)) as conn:
        try:
            return list(conn.execute("SELECT id, trigger, status, error FROM training_rounds ORDER BY id"))
        except sqlite3.OperationalError:
            return []


@pytest.fixture
def trainer_env(valkey: EmbeddedRedis, tiny_model: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A store with 48 stored preference pairs from 48 judges, and the environment of a training worker on it."""
    store = f"sqlite:///{tmp_path / 'pairloop.db'}"
    upgrade(store)
    engine = create_engine(store)
    with Session(engine) as session, session.begin():
        for i in range(48):
            c = record(a=f"Thank you for asking! Tea {i} is a warm drink.", b=f"Tea {i}.")
            save_event(session, event(c, judge=f"judge-{i}", preference="0"))
    engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}
    env |= {
        "PAIRLOOP_REDIS_URL": valkey.url,
        "PAIRLOOP_DATA_DIR": str(tmp_path),
        "PAIRLOOP_DATABASE_URL": store,
        "PAIRLOOP_MODEL": str(tiny_model),
        "PAIRLOOP_TRAIN__MIN_PAIRS": "4",
        "PAIRLOOP_TRAIN__EPOCHS": "4",  # long enough to be killed in the middle
        "PAIRLOOP_GATE_LENGTH_PROMPTS": "2",
    }
    yield env


@pytest.mark.slow
def test_a_round_whose_worker_is_killed_runs_again_within_two_minutes(
    trainer_env: dict[str, str], valkey: EmbeddedRedis, tmp_path: Path
) -> None:
    db = tmp_path / "pairloop.db"
    connection = redis.Redis.from_url(valkey.url)
    settings = TrainerSettings(data_dir=tmp_path, database_url=trainer_env["PAIRLOOP_DATABASE_URL"])
    enqueue_round(connection, settings, "cron")
    cmd = [sys.executable, "-m", "deploy", "worker", "--training"]
    first = spawn(cmd, env=trainer_env, log_path=tmp_path / "first.log")
    second = None
    try:
        deadline = time.monotonic() + 120
        while not any(status == "running" for _, _, status, _ in rounds(db)):
            assert time.monotonic() < deadline and first.poll() is None, "the round did not start"
            time.sleep(0.2)
        assert connection.exists(LOCK_KEY)
        signal_group(first, signal.SIGKILL)  # the worker, and whatever it runs, mid-round
        first.wait()
        killed = time.monotonic()
        # as `pairloop up`'s supervisor does: another training worker
        second = spawn(cmd, env=trainer_env, log_path=tmp_path / "second.log")
        while len(log := rounds(db)) < 2:
            assert time.monotonic() - killed < 120, f"no round started within 2 minutes of the kill: {log}"
            assert second.poll() is None, (tmp_path / "second.log").read_text()[-2000:]
            time.sleep(0.5)
        started = time.monotonic() - killed
        while (log := rounds(db))[-1][2] == "running":  # training time is the machine's, not the recovery's
            assert time.monotonic() - killed < 600, f"the rerun did not finish: {log}"
            time.sleep(0.5)
        (_, _, first_status, error), (_, trigger, status, _) = log[0], log[-1]
        assert first_status == "failed" and error is not None and "interrupted" in error, log
        assert trigger == "cron", "the rerun keeps the interrupted round's trigger"
        assert status in ("passed", "challenger", "promoted", "rejected"), log
        assert not connection.exists(LOCK_KEY), "the rerun released the lock"
        print(f"a round started again {started:.0f} s after the kill")
    finally:
        if first.poll() is None:
            signal_group(first, signal.SIGKILL)
        if second is not None:
            terminate(second)
        connection.close()


def test_cron_that_loses_redis_waits_for_it_and_goes_on(valkey: EmbeddedRedis, tmp_path: Path) -> None:
    """RQ's cron scheduler ends on the first Redis error; `pairloop cron` waits for Redis and schedules again."""
    settings = TrainerSettings()
    env = {**os.environ, "PAIRLOOP_REDIS_URL": valkey.url, "PAIRLOOP_CHECK_INTERVAL_S": "1"}
    log = tmp_path / "cron.log"
    cron = spawn([sys.executable, "-m", "deploy", "cron", "--data-dir", str(tmp_path)], env=env, log_path=log)
    connection = redis.Redis.from_url(valkey.url)
    control = Queue(settings.control_queue, connection=connection)
    try:
        deadline = time.monotonic() + 60
        while control.count == 0:
            assert time.monotonic() < deadline and cron.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        valkey.stop()
        time.sleep(10)  # far beyond the client's own retries (serving/redis_client.py: about a second)
        assert cron.poll() is None, log.read_text()[-3000:]
        valkey.start()
        before = control.count
        deadline = time.monotonic() + 60
        while control.count <= before:
            assert time.monotonic() < deadline and cron.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert "cron lost Redis" in log.read_text()
    finally:
        terminate(cron, 10)
        connection.close()
    assert cron.returncode == 0, log.read_text()[-3000:]
