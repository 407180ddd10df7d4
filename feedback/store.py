"""The preference store: served completions that received feedback, and the feedback events on them.

SQLAlchemy 2 models; the schema is made by the Alembic migrations in `deploy/migrations`. SQLite in the
data dir is the embedded default, PostgreSQL is chosen by URL. Writes are idempotent: an event that is
stored twice (a worker killed between its commit and RQ's acknowledgement) is stored once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from functools import cache
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from feedback.schema import FeedbackEvent
from serving.protocol import CompletionRecord

log = logging.getLogger(__name__)


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def split_of(completion: CompletionRecord) -> float:
    """Where a completion falls in [0, 1): the first 8 bytes of the SHA-256 of what was asked and answered (its
    messages and the set of its answers' texts), never of its random id. The trainer holds out the completions
    below its `holdout_fraction` and samples replay and evaluation rows by ranges of it (an index scan, whatever
    the store's size). Every vote on one completion shares it; a pair served twice (a seeded request sent
    again) lands on the same side both times, so an evaluation never scores a pair its round trained on, and a
    run that samples seeded pairs holds out the same ones every time. Stored with each event (`Feedback.split`):
    changing this function leaves the stored values as they are."""
    asked = [completion.messages, sorted(choice.text for choice in completion.choices)]
    digest = hashlib.sha256(json.dumps(asked, sort_keys=True, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Completion(Base):
    """A served completion, as the gateway recorded it, kept once it received feedback."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    messages: Mapped[list[Any]] = mapped_column(JSON)
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON)
    text_a: Mapped[str] = mapped_column(Text)
    text_b: Mapped[str | None] = mapped_column(Text)
    adapter_a: Mapped[str] = mapped_column(String(256))
    adapter_b: Mapped[str | None] = mapped_column(String(256))
    finish_a: Mapped[str | None] = mapped_column(String(32))
    finish_b: Mapped[str | None] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(64))
    user: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    def text(self, choice: int) -> str | None:
        return self.text_a if choice == 0 else self.text_b

    def adapter(self, choice: int) -> str | None:
        return self.adapter_a if choice == 0 else self.adapter_b


class Feedback(Base):
    """One feedback event. `id` is the client's `feedback_id` (or one the API made)."""

    __tablename__ = "feedback"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    completion_id: Mapped[str] = mapped_column(ForeignKey("completions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    judge_key_id: Mapped[str] = mapped_column(String(64))
    judge_user: Mapped[str] = mapped_column(String(256))
    preference: Mapped[str | None] = mapped_column(String(16))
    choice: Mapped[int | None] = mapped_column(Integer)
    rating: Mapped[str | None] = mapped_column(String(8))
    edit_text: Mapped[str | None] = mapped_column(Text)
    user_written: Mapped[bool] = mapped_column(Boolean, default=False)
    comment: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    stored_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    split: Mapped[float] = mapped_column(Float, index=True)
    """`split_of(completion)` when it was stored, kept here so that the trainer's queries can use an index on it."""
    round_id: Mapped[int | None] = mapped_column(Integer, index=True)
    """The training round that took this event as new data (it trained on it, or passed it over: held out, of no
    use to its loss, over a judge's share); NULL until one does. Written by the trainer (`trainer/data.py`)."""

    __table_args__ = (
        # What no round has taken yet: the periodic check counts these, whatever the store's size.
        Index(
            "ix_feedback_pending",
            "received_at",
            sqlite_where=text("round_id IS NULL"),
            postgresql_where=text("round_id IS NULL"),
        ),
        # One pairwise vote per completion and judge; one rating and one edit per choice and judge.
        Index(
            "uq_feedback_vote",
            "completion_id",
            "judge_key_id",
            "judge_user",
            unique=True,
            sqlite_where=text("kind = 'pairwise'"),
            postgresql_where=text("kind = 'pairwise'"),
        ),
        Index(
            "uq_feedback_choice",
            "completion_id",
            "judge_key_id",
            "judge_user",
            "kind",
            "choice",
            unique=True,
            sqlite_where=text("kind != 'pairwise'"),
            postgresql_where=text("kind != 'pairwise'"),
        ),
    )


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL (readers beside the writer) and waits on a busy lock."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@cache
def engine_for(url: str) -> Engine:
    """One engine per URL and process (a worker reuses its connections across jobs)."""
    return make_engine(url)


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"the preference store supports SQLite and PostgreSQL, not {dialect}")


def completion_row(event: FeedbackEvent) -> dict[str, Any]:
    c = event.completion
    a = c.choices[0]
    b = c.choices[1] if len(c.choices) > 1 else None
    return {
        "id": c.id,
        "model": c.model,
        "messages": c.messages,
        "sampling": c.sampling.model_dump(mode="json"),
        "text_a": a.text,
        "text_b": b.text if b else None,
        "adapter_a": a.adapter,
        "adapter_b": b.adapter if b else None,
        "finish_a": a.finish_reason,
        "finish_b": b.finish_reason if b else None,
        "key_id": c.key_id,
        "user": c.user,
        "created_at": utc(c.created_at),
        "finished_at": utc(c.finished_at),
    }


def feedback_row(event: FeedbackEvent) -> dict[str, Any]:
    return {
        "id": event.feedback_id,
        "completion_id": event.completion.id,
        "kind": event.kind,
        "judge_key_id": event.judge_key_id,
        "judge_user": event.judge_user,
        "preference": event.preference,
        "choice": event.choice,
        "rating": event.rating,
        "edit_text": event.edit_text,
        "user_written": event.kind == "edit",
        "comment": event.comment,
        "received_at": utc(event.received_at),
        "stored_at": dt.datetime.now(dt.UTC),
        "split": split_of(event.completion),
    }


def save_event(session: Session, event: FeedbackEvent) -> bool:
    """Store the event and its completion in one transaction; False when it was stored already.

    Both inserts are `ON CONFLICT DO NOTHING`, so running this twice for one event changes nothing the
    second time. The caller commits.
    """
    session.execute(_insert(session, Completion).values(completion_row(event)).on_conflict_do_nothing())
    inserted = (
        session.execute(
            _insert(session, Feedback).values(feedback_row(event)).on_conflict_do_nothing().returning(Feedback.id)
        ).first()
        is not None
    )
    if not inserted and session.get(Feedback, event.feedback_id) is None:
        # Not stored under its id, so a unique judgement index refused it: the same judge already gave a
        # different verdict that the API's Redis check did not see (e.g. Redis lost its keys). First vote stands.
        log.warning(
            "feedback %s conflicts with a stored vote on %s; kept the first", event.feedback_id, event.completion.id
        )
    return inserted
