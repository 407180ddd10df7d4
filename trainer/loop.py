"""The learning loop's jobs: the periodic check (queued by `pairloop cron` on the control queue) and the training
round (on the training queue, run by the training worker, a process of its own so that a slow round never delays
feedback). This module owns a round from start to end: selecting its data, training and gating it
(`trainer/round.py`), publishing it, and the round's status transitions in the round log.

One round at a time, under the lock of `trainer/queue.py`. A round that passes the gate becomes the
challenger (or, with `ab_fraction` 0, the champion) at once; the check job later promotes or retires a
challenger by its live A/B record. RQ stores these functions by name (`trainer.loop.check`,
`trainer.loop.train_round`, `trainer/queue.py`): the names are part of what is queued. Jobs queued under the
names of release 0.1 (`workers.training.*`) still run through `workers/training.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from feedback.store import engine_for
from serving.errors import AdapterError
from serving.redis_client import connect_sync
from trainer import registry
from trainer.data import count_new, give_back, select_round, take
from trainer.errors import RoundFailed, RoundOverBudget
from trainer.promotion import Promotions, remote_promotions
from trainer.publish import local_copy, publish
from trainer.queue import LOCK_TTL_S, RoundLock, enqueue_round, round_pending
from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


_redis_url: str | None = None


def configure(redis_url: str | None) -> None:
    """Point this process's jobs at a Redis (the worker does this at start)."""
    global _redis_url
    _redis_url = redis_url


def _connection() -> redis.Redis:
    if not _redis_url:
        raise RuntimeError("trainer.loop.configure(redis_url) was not called")
    return connect_sync(_redis_url)


async def _with_promotions(settings: TrainerSettings, action: Any) -> Any:
    assert _redis_url
    async with remote_promotions(_redis_url, engine_for(settings.store_url()), settings.vllm_key()) as promotions:
        return await action(promotions)


# -- the periodic check -----------------------------------------------------------------------------


def check() -> dict[str, Any]:
    """Cron job: judge the challenger's live record; start a round when enough new examples arrived and no
    challenger is on trial (the next round's parent is whoever wins it; its votes are the round's data)."""
    settings = TrainerSettings()
    out: dict[str, Any] = {}
    ab = asyncio.run(
        _with_promotions(
            settings,
            lambda p: p.evaluate_ab(settings.ab_min_votes, settings.ab_alpha, settings.ab_max_votes),
        )
    )
    if ab is not None:
        out["ab"] = ab.as_dict()
        if ab.decision == "wait":
            out["round"] = "waiting for the A/B test"
            return out
    connection = _connection()
    try:
        if round_pending(connection, settings):
            out["round"] = "pending"
            return out
        with Session(engine_for(settings.store_url())) as session:
            new = count_new(session, settings)
        out["new_examples"] = new
        if new >= settings.min_new_examples:
            out["round"] = enqueue_round(connection, settings, "cron").id
    finally:
        connection.close()
    return out


# -- the round --------------------------------------------------------------------------------------


def train_round(trigger: str = "manual") -> dict[str, Any]:
    """Train one round on the newest pending examples (at most `max_round_examples` rows with their replay),
    gate it, and make it challenger or champion; past `round_budget_s` it stops and changes nothing served.

    A round whose worker dies is run again: the worker's heartbeat stops, RQ's started registry lets go of the
    job within seconds (`workers/runner.py`), a live training worker requeues it, and the rerun waits for the
    lock the dead worker held to lapse (`trainer.queue.RoundLock`, at most `LOCK_TTL_S`: the requeue can come
    first); it marks the interrupted round failed and offers what that round took again."""
    settings = TrainerSettings()
    connection = _connection()
    try:
        with RoundLock(connection, wait_s=LOCK_TTL_S + 5):
            return _train(settings, trigger)
    finally:
        connection.close()


def _train(settings: TrainerSettings, trigger: str) -> dict[str, Any]:
    from trainer.round import run_round  # torch: only in the process that trains

    deadline = time.monotonic() + settings.round_budget_s
    store = engine_for(settings.store_url())
    routing = asyncio.run(_with_promotions(settings, lambda p: p.routing()))
    with Session(store) as session:
        # Holding the lock, no other round runs: one still marked running crashed. What it took was never
        # learned from, so it is pending again and this round offers it anew.
        crashed = list(
            session.scalars(select(registry.TrainingRound.id).where(registry.TrainingRound.status == "running"))
        )
        give_back(session, crashed)
        session.execute(
            update(registry.TrainingRound)
            .where(registry.TrainingRound.id.in_(crashed))
            .values(
                status="failed",
                error="interrupted: its training worker died mid-round (the round is run again)",
                finished_at=registry.now(),
            )
        )
        version = registry.next_version(session)
        data = select_round(session, settings, salt=version)
        parent = registry.get(session, routing.champion) if routing.champion else None
        row = registry.TrainingRound(
            trigger=trigger,
            status="running",
            parent=parent.name if parent else None,
            new_examples=data.new_examples,
            data_until=data.data_until,
            decision={},
            started_at=registry.now(),
        )
        session.add(row)
        session.flush()
        take(session, row.id, data, settings)
        session.commit()
        round_id = row.id
        parent_ref = (parent.name, parent.path) if parent else None
    try:
        parent_dir = (parent_ref[0], local_copy(settings, *parent_ref)) if parent_ref else None
        result = run_round(data, parent_dir, version, settings, deadline=deadline)
    except RoundFailed as exc:
        status = "over_budget" if isinstance(exc, RoundOverBudget) else "failed"
        _finish(store, round_id, status, error=exc.message)
        log.error("round %d %s: %s", round_id, status.replace("_", " "), exc.message)
        return {"round": round_id, "status": status, "error": exc.message}
    path, publish_error = str(result.path), None
    if result.decision.passed:
        try:
            path = publish(settings, result.name, result.path)
        except AdapterError as exc:
            publish_error = f"could not publish to the adapter store: {exc.message}"
            log.error("round %d: %s", round_id, publish_error)
    with Session(store) as session:
        adapter = registry.Adapter(
            name=result.name,
            version=version,
            parent=parent_ref[0] if parent_ref else None,
            status="candidate" if result.decision.passed else "rejected",
            path=path,
            method=data.method,
            metrics=result.metrics,
            round_id=round_id,
            reason=None if result.decision.passed else "; ".join(result.decision.reasons),
            created_at=registry.now(),
            updated_at=registry.now(),
        )
        session.add(adapter)
        session.commit()
    decision = result.decision.as_dict()
    if not result.decision.passed:
        _finish(store, round_id, "rejected", adapter=result.name, decision=decision)
        return {"round": round_id, "status": "rejected", "adapter": result.name, "gate": decision}
    if publish_error:
        _finish(store, round_id, "passed", adapter=result.name, decision=decision, error=publish_error)
        return {"round": round_id, "status": "passed", "adapter": result.name, "gate": decision, "error": publish_error}
    status, error = _advance(settings, result.name)
    _finish(store, round_id, status, adapter=result.name, decision=decision, error=error)
    return {"round": round_id, "status": status, "adapter": result.name, "gate": decision, "error": error}


def _advance(settings: TrainerSettings, name: str) -> tuple[str, str | None]:
    """Make a candidate that passed the gate the challenger, or the champion with `ab_fraction` 0."""

    async def act(promotions: Promotions) -> None:
        if settings.ab_fraction > 0:
            await promotions.challenge(name, settings.ab_fraction)
        else:
            await promotions.promote(name, "passed the offline gate (ab_fraction 0)")

    try:
        asyncio.run(_with_promotions(settings, act))
    except AdapterError as exc:
        # It stays a candidate: `pairloop adapters promote` can serve it once vLLM is reachable.
        log.error("could not serve %s: %s", name, exc.message)
        return "passed", exc.message
    return ("challenger" if settings.ab_fraction > 0 else "promoted"), None


def _finish(store: Any, round_id: int, status: str, **values: Any) -> None:
    with Session(store) as session:
        row = session.get(registry.TrainingRound, round_id)
        assert row is not None
        row.status = status
        row.finished_at = registry.now()
        for key, value in values.items():
            setattr(row, key, value)
        session.commit()
