"""Failed jobs stay visible (`pairloop queue status`, RQ's own `rq info`) and `pairloop queue retry-failed`
requeues them; the worker then stores them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import redis
from rq import Queue

from deploy.local.redis_server import EmbeddedRedis
from feedback import jobs
from feedback.schema import FeedbackEvent
from serving import records
from tests.cli_helpers import cli
from tests.feedback_helpers import drain, stored_feedback, submit_events
from tests.store_helpers import event, record
from workers.runner import FeedbackWorker, make_worker
from workers.settings import WorkerSettings


def test_failed_jobs_are_visible_and_can_be_retried(valkey: EmbeddedRedis, tmp_path: Path) -> None:
    settings = WorkerSettings(job_retry_intervals_s=[])
    events = [event(record()) for _ in range(3)]

    submit_events(valkey.url, settings, events, claimed=True)

    # The store is unreachable: every job fails, and without retries lands in the failed registry.
    jobs.configure("postgresql+psycopg://nobody@127.0.0.1:1/none")
    connection = redis.Redis.from_url(valkey.url)
    make_worker(connection, settings).work(burst=True, logging_level="ERROR")

    status = cli("queue", "status", "--json", PAIRLOOP_REDIS_URL=valkey.url)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) | {"workers": 0} == {
        "name": "pairloop-feedback",
        "queued": 0,
        "started": 0,
        "scheduled": 0,
        "failed": 3,
        "workers": 0,
    }
    info = subprocess.run(
        [str(Path(sys.executable).parent / "rq"), "info", "--url", valkey.url, "--only-queues"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info.returncode == 0, info.stderr
    assert "pairloop-feedback" in info.stdout

    # The records expire before anyone retries: each failed job kept its own copy.
    assert connection.delete(*(records.record_key(e.completion.id) for e in events)) == 3
    retried = cli("queue", "retry-failed", PAIRLOOP_REDIS_URL=valkey.url)
    assert retried.returncode == 0 and "requeued 3" in retried.stdout
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    drain(valkey.url, store_url)
    assert set(stored_feedback(store_url)) == {e.feedback_id for e in events}
    status = cli("queue", "status", "--json", PAIRLOOP_REDIS_URL=valkey.url)
    assert json.loads(status.stdout)["failed"] == 0
    connection.close()


def test_queue_commands_say_when_there_is_no_redis(tmp_path: Path) -> None:
    r = cli("queue", "status", PAIRLOOP_DATA_DIR=str(tmp_path))
    assert r.returncode == 2 and "PAIRLOOP_REDIS_URL" in r.stderr
    for command in ("status", "retry-failed"):
        r = cli("queue", command, PAIRLOOP_REDIS_URL="redis://127.0.0.1:1/0")
        assert r.returncode == 1 and "Traceback" not in r.stderr and "127.0.0.1:1" in r.stderr


def test_export_refuses_bad_arguments(tmp_path: Path) -> None:
    out = str(tmp_path / "x.jsonl")
    r = cli("export", "--kind", "sft", "--out", out, PAIRLOOP_DATA_DIR=str(tmp_path))
    assert r.returncode == 2 and "--kind" in r.stderr
    r = cli("export", "--kind", "dpo", "--out", out, "--since", "yesterday", PAIRLOOP_DATA_DIR=str(tmp_path))
    assert r.returncode == 2 and "ISO 8601" in r.stderr
    r = cli("db", "upgrade", PAIRLOOP_DATABASE_URL="postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert r.returncode == 1 and "cannot migrate" in r.stderr and "Traceback" not in r.stderr
    r = cli("export", "--kind", "dpo", "--out", out, PAIRLOOP_DATA_DIR=str(tmp_path))  # no store there yet
    assert r.returncode == 1 and "pairloop db upgrade" in r.stderr and "Traceback" not in r.stderr
    assert not Path(out).exists()


def enqueue_one(
    valkey: EmbeddedRedis, settings: WorkerSettings
) -> tuple[FeedbackEvent, redis.Redis, FeedbackWorker, Queue]:
    """One event queued through the API's queue, and a worker (not started) on that queue."""
    e = event(record())
    submit_events(valkey.url, settings, [e])
    connection = redis.Redis.from_url(valkey.url)
    worker = make_worker(connection, settings)
    return e, connection, worker, worker.queues[0]


def test_a_job_whose_worker_died_is_run_again(valkey: EmbeddedRedis, tmp_path: Path) -> None:
    """An entry of RQ's started registry whose time ran out (its worker was SIGKILLed) goes back to the queue."""
    settings = WorkerSettings()
    e, connection, worker, queue = enqueue_one(valkey, settings)
    # What a worker killed in the middle of the job leaves behind: the job taken off the queue, marked
    # started, and an execution entry that expired.
    assert connection.lpop(queue.key) == e.feedback_id.encode()
    connection.hset(f"rq:job:{e.feedback_id}", "status", "started")
    connection.zadd(f"rq:wip:{queue.name}", {f"{e.feedback_id}:dead-execution": time.time() - 1})
    # RQ keeps the execution in the job's own registry a minute longer than the execution's hash
    connection.zadd(f"rq:executions:{e.feedback_id}", {"dead-execution": time.time() + 60})

    assert worker.requeue_abandoned(queue) == 1
    assert queue.job_ids == [e.feedback_id]
    assert connection.zcard(f"rq:wip:{queue.name}") == 0
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    drain(valkey.url, store_url)
    assert list(stored_feedback(store_url)) == [e.feedback_id]
    # the rerun succeeded: not failed, not waiting for a retry
    assert queue.failed_job_registry.count == 0 and queue.scheduled_job_registry.count == 0
    connection.close()


def test_a_job_taken_by_a_worker_that_died_at_once_is_run_again(valkey: EmbeddedRedis, tmp_path: Path) -> None:
    """A worker killed right after taking a job (RQ's intermediate queue, no execution yet): requeued on the
    maintenance pass after the one that first saw it."""
    settings = WorkerSettings(maintenance_interval_s=1)
    e, connection, worker, queue = enqueue_one(valkey, settings)
    assert connection.lmove(queue.key, queue.intermediate_queue.key) == e.feedback_id.encode()

    assert worker.requeue_abandoned(queue) == 0  # first seen now: a live worker could be about to claim it
    time.sleep(1.2)
    assert worker.requeue_abandoned(queue) == 1
    assert queue.job_ids == [e.feedback_id] and queue.intermediate_queue.get_job_ids() == []
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    drain(valkey.url, store_url)
    assert list(stored_feedback(store_url)) == [e.feedback_id]
    connection.close()


def test_a_retry_whose_scheduler_died_is_run(valkey: EmbeddedRedis, tmp_path: Path) -> None:
    """A retry left in RQ's scheduled registry while a dead worker's scheduler holds the lock (up to 61 s):
    enqueued by the maintenance pass once it is overdue by a maintenance interval, not before."""
    settings = WorkerSettings(maintenance_interval_s=1)
    e, connection, worker, queue = enqueue_one(valkey, settings)
    assert connection.lpop(queue.key) == e.feedback_id.encode()
    connection.hset(f"rq:job:{e.feedback_id}", "status", "scheduled")
    connection.set(f"rq:scheduler-lock:{queue.name}", "dead-scheduler", ex=61)
    connection.zadd(queue.scheduled_job_registry.key, {e.feedback_id: int(time.time())})

    assert worker.enqueue_overdue_retries(queue) == 0  # due now (in whole seconds): a live scheduler would take it
    time.sleep(2.1)
    assert worker.enqueue_overdue_retries(queue) == 1
    assert queue.job_ids == [e.feedback_id] and queue.scheduled_job_registry.count == 0
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    drain(valkey.url, store_url)
    assert list(stored_feedback(store_url)) == [e.feedback_id]
    connection.close()
