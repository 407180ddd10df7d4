"""The queue's jobs: a feedback job carries the event and names its record, which the queueing keeps alive; jobs
queued under release 0.1's names (`workers.jobs.store_feedback` with the whole record, `workers.training.check`)
still run after an upgrade."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.callbacks import Callback
from rq.job import Job
from rq.serializers import JSONSerializer

from deploy.local.redis_server import EmbeddedRedis
from deploy.migrations import upgrade
from feedback.settings import FeedbackSettings
from serving import records
from tests.feedback_helpers import drain, stored_completions, stored_feedback, submit_events
from tests.store_helpers import event, record
from trainer import loop
from trainer.data import held_out
from trainer.settings import TrainerSettings
from workers.runner import make_worker
from workers.settings import WorkerSettings


def test_a_job_carries_the_event_and_keeps_its_record_alive(valkey: EmbeddedRedis, tmp_path: Path) -> None:
    settings = FeedbackSettings(feedback_record_hold_s=7200)
    long_answer = "A long answer. " * 200
    e = event(record(long_answer, long_answer + "!"), preference="1")
    submit_events(valkey.url, settings, [e])  # the record is saved with a TTL of an hour first

    client = redis.Redis.from_url(valkey.url)
    job = Job.fetch(e.feedback_id, connection=client, serializer=JSONSerializer)
    payload = job.args[0]
    assert payload["completion_id"] == e.completion.id and "completion" not in payload
    assert len(json.dumps(payload)) < 1000  # the answers (6 KB) are in the record only
    assert 3600 < client.ttl(records.record_key(e.completion.id)) <= 7200  # held for the queue's wait
    client.close()

    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    drain(valkey.url, store_url)
    assert stored_feedback(store_url)[e.feedback_id].preference == "1"
    assert stored_completions(store_url)[e.completion.id].text_a == long_answer


def test_jobs_queued_under_release_0_1_names_still_run(
    valkey: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(store_url)
    client = redis.Redis.from_url(valkey.url)
    old = event(record(), preference="0")  # 0.1 queued the whole event, its record inside
    Queue("pairloop-feedback", connection=client, serializer=JSONSerializer).enqueue(
        "workers.jobs.store_feedback", args=(old.model_dump(mode="json"),), job_id=old.feedback_id
    )
    drain(valkey.url, store_url)
    assert set(stored_feedback(store_url)) == {old.feedback_id}

    monkeypatch.setenv("PAIRLOOP_DATABASE_URL", store_url)
    monkeypatch.setenv("PAIRLOOP_DATA_DIR", str(tmp_path))
    loop.configure(valkey.url)
    control = Queue(TrainerSettings().control_queue, connection=client, serializer=JSONSerializer)
    check = control.enqueue("workers.training.check")
    make_worker(client, WorkerSettings(database_url=store_url), queues=[control]).work(
        burst=True, logging_level="WARNING"
    )
    check = Job.fetch(check.id, connection=client, serializer=JSONSerializer)
    # one pending vote: two KTO rows (too few pairs for DPO), none if its completion is held out
    usable = 0 if held_out(old.completion, TrainerSettings().holdout_fraction) else 2
    assert check.get_status() == "finished" and check.return_value() == {"new_examples": usable}
    client.close()


def test_a_job_naming_any_other_function_fails_without_running(valkey: EmbeddedRedis, tmp_path: Path) -> None:
    """Whoever can write to Redis can queue a job; a worker runs only pairloop's job functions (and no callback)."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(store_url)
    client = redis.Redis.from_url(valkey.url)
    queue = Queue("pairloop-feedback", connection=client, serializer=JSONSerializer)
    forged = queue.enqueue("os.mkdir", args=(str(tmp_path / "forged-job-ran"),))
    # an allowed job that fails, with a failure callback of the forger's choosing
    callback = queue.enqueue("feedback.jobs.store_feedback", args=({"garbage": True},), on_failure=Callback("os.mkdir"))
    make_worker(client, WorkerSettings(database_url=store_url)).work(burst=True, logging_level="WARNING")
    forged = Job.fetch(forged.id, connection=client, serializer=JSONSerializer)
    assert forged.get_status() == "failed"
    assert "'os.mkdir', which is not a pairloop job" in (forged.latest_result().exc_string or "")
    assert not (tmp_path / "forged-job-ran").exists()
    assert Job.fetch(callback.id, connection=client, serializer=JSONSerializer).get_status() == "failed"
    assert CALLED == [], "no callback ran either"
    client.close()


CALLED: list[object] = []


def trace(*args: object) -> None:
    CALLED.append(args)
