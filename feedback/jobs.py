"""The feedback queue's job: storing one event. RQ imports it by name (`feedback.jobs.store_feedback`, the
`JOB_FUNCTION` of `feedback/queue.py`) with JSON arguments. Jobs queued under release 0.1's name
(`workers.jobs.store_feedback`) still run through `workers/jobs.py`."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from feedback.schema import FeedbackEvent
from feedback.settings import FeedbackSettings
from feedback.store import engine_for, save_event

log = logging.getLogger(__name__)

_store_url: str | None = None


def configure(store_url: str | None) -> None:
    """Point this process's jobs at a store (the worker does this at start; default: from the environment)."""
    global _store_url
    _store_url = store_url


def store_feedback(payload: dict[str, Any]) -> bool:
    """Persist one feedback event. Idempotent: a second run of the same event stores nothing and succeeds.

    Returns whether this run stored it (False: it was already there).
    """
    event = FeedbackEvent.model_validate(payload)
    url = _store_url or FeedbackSettings().store_url()
    with Session(engine_for(url)) as session, session.begin():
        stored = save_event(session, event)
    if not stored:
        log.info("feedback %s was stored already", event.feedback_id)
    return stored
