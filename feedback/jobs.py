"""The feedback queue's job: storing one event. RQ imports it by name (`feedback.jobs.store_feedback`, the
`JOB_FUNCTION` of `feedback/queue.py`) with JSON arguments. Jobs queued under release 0.1's name
(`workers.jobs.store_feedback`) still run through `workers/jobs.py`.

A job carries the event and names its completion; the completion's record is read from Redis, where the
gateway keeps it at least `feedback_record_hold_s` after the vote was queued. Once a job has failed, it keeps a
copy of the record in its own `meta`, so that a retry, however late (`pairloop queue retry-failed`), finds it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import redis
from rq import get_current_job
from sqlalchemy.orm import Session

from feedback.schema import FeedbackEvent, QueuedEvent
from feedback.settings import QueueSettings
from feedback.store import engine_for, save_event
from serving import records
from serving.protocol import CompletionRecord
from serving.redis_client import connect_sync

log = logging.getLogger(__name__)

_store_url: str | None = None
_redis_url: str | None = None
KEPT = "completion"
"""The key of a failed job's `meta` that holds its completion's record."""


class RecordMissing(Exception):
    """The completion's record is neither in Redis nor kept by the job: the event cannot be stored."""


def configure(store_url: str | None, redis_url: str | None = None) -> None:
    """Point this process's jobs at a store, and at a Redis for records when they run outside an RQ worker (the
    worker does this at start; default: from the environment)."""
    global _store_url, _redis_url
    _store_url, _redis_url = store_url, redis_url


def _completion(completion_id: str) -> CompletionRecord:
    job = get_current_job()
    if job is not None and KEPT in job.meta:
        return CompletionRecord.model_validate(job.meta[KEPT])
    if job is not None:
        found = records.load_sync(job.connection, completion_id)
    else:
        url = _redis_url or QueueSettings().redis_url
        if not url:
            raise RuntimeError("feedback.jobs.configure(store_url, redis_url) was not called")
        client = connect_sync(url)
        try:
            found = records.load_sync(client, completion_id)
        finally:
            client.close()
    if found is None:
        raise RecordMissing(f"the record of completion {completion_id} is gone from Redis; the event cannot be stored")
    return found


def _keep(event: FeedbackEvent) -> None:
    """A failing job keeps its completion's record (its retries may come after the record expired)."""
    job = get_current_job()
    if job is None or KEPT in job.meta:
        return
    job.meta[KEPT] = event.completion.model_dump(mode="json")
    with contextlib.suppress(redis.RedisError, OSError):  # Redis away too: the record is still there
        job.save_meta()


def store_feedback(payload: dict[str, Any]) -> bool:
    """Persist one feedback event. Idempotent: a second run of the same event stores nothing and succeeds.

    Returns whether this run stored it (False: it was already there).
    """
    if "completion" in payload:  # a release 0.1 job: the record came with it
        event = FeedbackEvent.model_validate(payload)
    else:
        queued = QueuedEvent.model_validate(payload)
        event = queued.with_completion(_completion(queued.completion_id))
    url = _store_url or QueueSettings().store_url()
    try:
        with Session(engine_for(url)) as session, session.begin():
            stored = save_event(session, event)
    except Exception:
        _keep(event)
        raise
    if not stored:
        log.info("feedback %s was stored already", event.feedback_id)
    return stored
