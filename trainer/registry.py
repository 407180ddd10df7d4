"""The adapter registry and the round log, in the preference store (same database, same migrations).

An adapter is named once and never renamed or rewritten: `pl-v0003-1a2b3c4d` is version 3 and the first
8 hex digits of the SHA-256 of its weights. Its status moves one way:

    candidate -> rejected                      (the offline gate said no; kept for inspection, never served)
    candidate -> challenger -> champion -> retired
    candidate -> champion   (ab_fraction 0)    challenger -> retired (lost the live A/B test)

`retired` also covers a champion that was rolled back or replaced. Which adapter is served is decided by
the routing record in Redis (`serving/adapters/routing.py`); this table is its durable history.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from sqlalchemy import JSON, DateTime, Integer, String, Text, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from feedback.store import Base

Status = Literal["candidate", "challenger", "champion", "rejected", "retired"]


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Adapter(Base):
    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    parent: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    path: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(8))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    round_id: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    promoted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "parent": self.parent,
            "status": self.status,
            "method": self.method,
            "metrics": self.metrics,
            "reason": self.reason,
            "round_id": self.round_id,
            "created_at": aware(self.created_at).isoformat(),
            "promoted_at": aware(self.promoted_at).isoformat() if self.promoted_at else None,
            "age_s": round((now() - aware(self.created_at)).total_seconds()),
        }


class TrainingRound(Base):
    __tablename__ = "training_rounds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trigger: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    """running, then failed (no adapter), over_budget (stopped at `round_budget_s`, no adapter), rejected (by the
    gate), challenger, promoted, or passed (the gate passed but serving it failed: it stays a candidate)."""
    parent: Mapped[str | None] = mapped_column(String(64))
    adapter: Mapped[str | None] = mapped_column(String(64))
    new_examples: Mapped[int] = mapped_column(Integer, default=0)
    data_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    decision: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "trigger": self.trigger,
            "status": self.status,
            "parent": self.parent,
            "adapter": self.adapter,
            "new_examples": self.new_examples,
            "data_until": aware(self.data_until).isoformat() if self.data_until else None,
            "decision": self.decision,
            "error": self.error,
            "started_at": aware(self.started_at).isoformat(),
            "finished_at": aware(self.finished_at).isoformat() if self.finished_at else None,
        }


def aware(t: dt.datetime) -> dt.datetime:
    """`t` with its UTC zone: SQLite returns naive datetimes (UTC as stored)."""
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def adapter_name(version: int, digest: str) -> str:
    return f"pl-v{version:04d}-{digest[:8]}"


def next_version(session: Session) -> int:
    return int(session.scalar(select(func.coalesce(func.max(Adapter.version), 0))) or 0) + 1


def get(session: Session, name: str) -> Adapter | None:
    return session.get(Adapter, name)


def listing(session: Session) -> list[Adapter]:
    return list(session.scalars(select(Adapter).order_by(Adapter.version.desc())))


def set_status(session: Session, adapter: Adapter, status: Status, reason: str | None = None) -> None:
    adapter.status = status
    adapter.updated_at = now()
    if reason is not None:
        adapter.reason = reason
    if status == "champion":
        adapter.promoted_at = now()


def rounds(session: Session, limit: int = 20) -> list[TrainingRound]:
    return list(session.scalars(select(TrainingRound).order_by(TrainingRound.id.desc()).limit(limit)))
