"""`GET /admin/dashboard` (scope `admin`): everything the dashboard page (web/dashboard.html) draws, in one read.

Adapter versions with their gate figures, the live champion-vs-challenger record with the statistic that decides,
feedback counts over time, the queues' depth, the backlog of examples waiting for a round, and the last training
rounds with loss and accuracy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import redis
from fastapi import APIRouter
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from feedback import queue as feedback_queue
from feedback.api import FeedbackDep
from feedback.settings import QueueSettings
from feedback.store import Feedback
from serving.adapters.routing import load_routing, routing_json
from serving.api import GatewayDep
from serving.errors import responses
from trainer import queue as training_queue
from trainer import registry
from trainer.ab import live_record
from trainer.api import Admin, LoopAdminDep
from trainer.data import backlog
from trainer.settings import TrainerSettings

router = APIRouter(prefix="/admin", responses=responses(401, 403, 500, 503))

BUCKETS = 24
MIN_SPAN_S = 600


def feedback_series(session: Session, now: dt.datetime) -> dict[str, Any]:
    """Feedback received per time bucket, from the first event (at least the last 10 minutes) to now."""
    total = session.scalar(select(func.count()).select_from(Feedback)) or 0
    by_kind = dict(session.execute(select(Feedback.kind, func.count()).group_by(Feedback.kind)).tuples().all())
    first = session.scalar(select(func.min(Feedback.received_at)))
    span = max((now - registry.aware(first)).total_seconds() if first else 0, MIN_SPAN_S)
    step = span / BUCKETS
    start = now - dt.timedelta(seconds=span)
    buckets = []
    for i in range(BUCKETS):  # one indexed range count each (received_at has an index): same SQL on both stores
        lo, hi = start + dt.timedelta(seconds=i * step), start + dt.timedelta(seconds=(i + 1) * step)
        count = session.scalar(
            select(func.count()).select_from(Feedback).where(Feedback.received_at > lo, Feedback.received_at <= hi)
        )
        buckets.append({"end": hi.isoformat(), "count": count or 0})
    return {"total": total, "by_kind": by_kind, "bucket_s": round(step, 1), "buckets": buckets}


def training_rounds(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    """The latest rounds, oldest first, with the loss and the gate's accuracy of the adapter each made."""
    out = []
    for row in reversed(registry.rounds(session, limit)):
        item = row.as_dict()
        adapter = registry.get(session, row.adapter) if row.adapter else None
        metrics = adapter.metrics if adapter else {}
        gate = metrics.get("gate") or {}
        item["loss"] = metrics.get("loss")
        item["accuracy"] = (gate.get("candidate") or {}).get("accuracy")
        item["champion_accuracy"] = (gate.get("champion") or {}).get("accuracy")
        out.append(item)
    return out


def _read_store(store: Engine, challenger: str | None, trainer: TrainerSettings) -> dict[str, Any]:
    now = registry.now()
    with Session(store) as session:
        ab = None
        if challenger:
            ab = live_record(
                session,
                challenger,
                min_votes=trainer.ab_min_votes,
                alpha=trainer.ab_alpha,
                max_votes=trainer.ab_max_votes,
                confidence=trainer.ab_confidence,
            )
        return {
            "adapters": [a.as_dict() for a in registry.listing(session)],
            "ab": ab,
            "feedback": feedback_series(session, now),
            "rounds": training_rounds(session),
            "backlog": backlog(session, trainer),
            "generated_at": now.isoformat(),
        }


def _read_queues(connection: redis.Redis, feedback: QueueSettings, trainer: TrainerSettings) -> dict[str, Any]:
    return {
        "feedback": feedback_queue.status(connection, feedback).as_dict(),
        "training": {
            "queued": training_queue.training_queue(connection, trainer).count,
            "running": bool(connection.exists(training_queue.LOCK_KEY)),
        },
    }


@router.get("/dashboard")
async def dashboard(_: Admin, gateway: GatewayDep, feedback: FeedbackDep, loop: LoopAdminDep) -> dict[str, Any]:
    routing = await load_routing(gateway.redis)
    data = await asyncio.to_thread(_read_store, feedback.store, routing.challenger, loop.settings)
    data["queues"] = await asyncio.to_thread(_read_queues, loop.connection, feedback.settings, loop.settings)
    data["routing"] = routing_json(routing)
    return data
