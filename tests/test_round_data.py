"""What a round takes from the store, on SQLite and PostgreSQL: at most its cap, the newest first, the rest left for
the next round; the check's and the selection's queries do not grow with the store; what no round can use stops
being pending; a crashed round's data is offered again; the migration fills the new columns of an older store."""

from __future__ import annotations

import hashlib
import itertools
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, func, select, text
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from deploy.migrations import alembic_config
from feedback.schema import FeedbackEvent
from feedback.store import Feedback, save_event, split_of
from serving.protocol import CompletionRecord
from tests.store_helpers import event, record
from trainer.data import count_new, give_back, pending, select_round, take
from trainer.settings import TrainerSettings

HOLDOUT = 0.2


def settings(**overrides: Any) -> TrainerSettings:
    values: dict[str, Any] = {"holdout_fraction": HOLDOUT, "max_user_share": 1.0, "replay_fraction": 0.5}
    return TrainerSettings(**(values | overrides))


_tries = itertools.count()


def on_side(a: str = "Answer A.", b: str = "Answer B.", held: bool = False) -> CompletionRecord:
    """A completion on the chosen side of the hold-out split: its texts, each with a number that puts it there."""
    return next(c for k in _tries if (split_of(c := record(f"{a} {k}", f"{b} {k}")) < HOLDOUT) == held)


def id_split(completion_id: str) -> float:
    """The split migration 0003 gave the events already stored: a hash of the completion's id."""
    return int.from_bytes(hashlib.sha256(completion_id.encode()).digest()[:8], "big") / 2**64


def votes(n: int, *, t0: float, held: bool = False, judges: int = 20, **fields: Any) -> list[FeedbackEvent]:
    """`n` pairwise votes on distinct two-choice completions, received one second apart from `t0`."""
    out = []
    for i in range(n):
        c = on_side(f"Answer A {i}.", f"Answer B {i}.", held=held)
        e = event(c, judge=f"judge-{i % judges}", **({"preference": "0"} | fields))
        out.append(e.model_copy(update={"received_at": t0 + i}))
    return out


@contextmanager
def store(url: str) -> Iterator[Engine]:
    engine = create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def save(engine: Engine, events: list[FeedbackEvent]) -> None:
    with Session(engine) as session, session.begin():
        for e in events:
            save_event(session, e)


def run_round(engine: Engine, round_id: int, s: TrainerSettings) -> Any:
    """Select and take a round's data as the training worker does (without training)."""
    with Session(engine) as session, session.begin():
        data = select_round(session, s, salt=round_id)
        take(session, round_id, data, s)
    return data


def pending_ids(engine: Engine) -> set[str]:
    with Session(engine) as session:
        return set(session.scalars(select(Feedback.id).where(Feedback.round_id.is_(None))))


def test_a_round_takes_at_most_its_cap_newest_first_and_leaves_the_rest_for_the_next(store_url: str) -> None:
    s = settings(max_round_examples=21, train={"min_pairs": 1})  # 14 new + 7 replayed
    sixty = votes(60, t0=time.time() - 1000)
    by_age = [e.feedback_id for e in sorted(sixty, key=lambda e: -e.received_at)]
    with store(store_url) as engine:
        save(engine, sixty)
        with Session(engine) as session:
            assert count_new(session, s) == 60

        first = run_round(engine, 1, s)
        assert first.new_examples == 14 and first.replayed == 0 and len(first.train) == 14
        assert first.taken == by_age[:14]  # the newest
        assert first.backlog == 46
        with Session(engine) as session:
            assert count_new(session, s) == 46

        second = run_round(engine, 2, s)
        assert second.taken == by_age[14:28]
        assert second.replayed == 7 and len(second.train) == 21  # never over the cap
        replayed = {r["feedback_id"] for r in second.train} - set(second.taken)
        assert replayed <= set(first.taken)  # replay comes from what earlier rounds took

        for round_id in range(3, 7):
            run_round(engine, round_id, s)
        assert pending_ids(engine) == set()
        with Session(engine) as session:
            assert count_new(session, s) == 0
            taken = session.execute(select(Feedback.round_id, func.count()).group_by(Feedback.round_id)).all()
        assert sorted(taken) == [(1, 14), (2, 14), (3, 14), (4, 14), (5, 4)]


def test_what_no_round_can_use_stops_being_pending_and_votes_stored_late_wait(store_url: str) -> None:
    s = settings(train={"min_pairs": 1})
    t0 = time.time() - 1000
    usable = votes(5, t0=t0)
    held = votes(3, t0=t0 + 10, held=True)
    ties = votes(3, t0=t0 + 20, preference="tie")
    same = [event(on_side("Same.", "Same."), preference="1").model_copy(update={"received_at": t0})]
    late = votes(2, t0=t0 - 500)  # received before the round's newest, stored after the round took its data
    with store(store_url) as engine:
        save(engine, usable + held + ties + same)
        with Session(engine) as session:
            assert count_new(session, s) == 5  # not the held-out, the ties, the identical pair
        data = run_round(engine, 1, s)
        assert sorted(data.taken) == sorted(e.feedback_id for e in usable)
        assert {r["completion_id"] for r in data.eval} == {e.completion.id for e in held}
        assert pending_ids(engine) == set()

        save(engine, late)
        assert pending_ids(engine) == {e.feedback_id for e in late}
        with Session(engine) as session:
            assert count_new(session, s) == 2


def test_a_rating_pair_forms_when_its_up_arrives_after_its_down_was_taken(store_url: str) -> None:
    s = settings(train={"method": "dpo", "min_pairs": 1})
    c = on_side("Good answer.", "Bad answer.")
    down = event(c, kind="rating", choice=1, rating="down").model_copy(update={"received_at": time.time() - 100})
    up = event(c, kind="rating", choice=0, rating="up")
    with store(store_url) as engine:
        save(engine, [down])
        with Session(engine) as session:
            assert pending(session, s).dpo == 0
        run_round(engine, 1, s)  # a DPO round: a lone `down` is of no use to it, and stops being pending
        save(engine, [up])
        with Session(engine) as session:
            assert count_new(session, s) == 1
        data = run_round(engine, 2, s)
        assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in data.train] == [
            (c.choices[0].text, c.choices[1].text)
        ]


def test_auto_takes_kto_when_too_few_pairs_arrived(store_url: str) -> None:
    s = settings(train={"min_pairs": 4})
    t0 = time.time() - 100
    thumbs = [
        event(on_side(), kind="rating", choice=0, rating="up").model_copy(update={"received_at": t0}) for _ in range(6)
    ]
    with store(store_url) as engine:
        save(engine, thumbs + votes(2, t0=t0))
        with Session(engine) as session:
            waiting = pending(session, s)
        assert (waiting.method, waiting.dpo, waiting.kto) == ("kto", 2, 6 + 2 * 2)
        data = run_round(engine, 1, s)
        assert data.method == "kto" and len(data.train) == 10


def test_a_crashed_rounds_data_is_pending_again(store_url: str) -> None:
    s = settings(train={"min_pairs": 1})
    with store(store_url) as engine:
        save(engine, votes(6, t0=time.time() - 100))
        run_round(engine, 7, s)
        assert pending_ids(engine) == set()
        with Session(engine) as session, session.begin():
            give_back(session, [7])
        assert len(pending_ids(engine)) == 6


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa_event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)


def test_the_checks_and_the_selections_queries_do_not_grow_with_the_store(store_url: str) -> None:
    """One query for the check; at most the same few for a round's selection, on a store of 40 events as of 400."""
    s = settings(max_round_examples=30, train={"min_pairs": 1})
    counts = []
    with store(store_url) as engine:
        t0 = time.time() - 10_000
        for size in (40, 400):
            with Session(engine) as session, session.begin():
                session.execute(text("DELETE FROM feedback"))
                session.execute(text("DELETE FROM completions"))
            save(engine, votes(size, t0=t0))
            with Session(engine) as session, session.begin():  # all but the newest 20 taken by earlier rounds
                session.execute(
                    text(
                        "UPDATE feedback SET round_id = 1 WHERE id NOT IN (SELECT id FROM feedback "
                        "ORDER BY received_at DESC LIMIT 20)"
                    )
                )
            with Session(engine) as session, statements(engine) as seen:
                assert count_new(session, s) == 20
                check = len(seen)
                data = select_round(session, s, salt=2)
                selection = len(seen) - check
            assert data.new_examples == 20 and data.replayed == 10
            counts.append((check, selection))
    # The check: one query. The selection: that count, the newest pending, a replay run and an evaluation run of
    # the split index (each a second query when it wraps around), and a rating pair's opposites (none here).
    assert [check for check, _ in counts] == [1, 1]
    assert all(selection <= 6 for _, selection in counts), counts


def test_the_migration_fills_the_new_columns_of_an_older_store(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0002")
    engine = create_engine(url)
    ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(3)]
    with engine.begin() as conn:
        for i, cid in enumerate(ids):
            conn.execute(
                text(
                    "INSERT INTO completions VALUES (:id, 'm', '[]', '{}', 'a', 'b', 'x', 'y', 'stop', 'stop', 'k', "
                    "'u', :t, :t)"
                ),
                {"id": cid, "t": f"2026-12-0{i + 1} 00:00:00"},
            )
            conn.execute(
                text(
                    "INSERT INTO feedback (id, completion_id, kind, judge_key_id, judge_user, preference, "
                    "user_written, received_at, stored_at) VALUES (:f, :c, 'pairwise', 'k', 'u', '0', 0, :t, :t)"
                ),
                {"f": f"f{i}", "c": cid, "t": f"2026-12-0{i + 1} 00:00:00"},
            )
        conn.execute(
            text(
                'INSERT INTO training_rounds (id, "trigger", status, new_examples, data_until, decision, '
                "started_at) VALUES (4, 'cron', 'rejected', 2, '2026-12-02 00:00:00', '{}', '2026-12-02 00:00:00')"
            )
        )
    command.upgrade(alembic_config(url), "head")
    with engine.connect() as conn:
        got = conn.execute(text("SELECT id, completion_id, split, round_id FROM feedback ORDER BY id")).all()
    engine.dispose()
    assert [(f, r) for f, _, _, r in got] == [("f0", 4), ("f1", 4), ("f2", None)]
    # 0003 filled in the split of the time: the hash of the completion's id
    assert all(split == pytest.approx(id_split(cid), abs=0) for _, cid, split, _ in got)


def test_the_backlog_stays_bounded_and_what_is_over_it_is_replayed(store_url: str) -> None:
    s = settings(max_round_examples=21, max_backlog=10, train={"min_pairs": 1})  # 14 new a round, 10 left waiting
    sixty = votes(60, t0=time.time() - 1000)
    by_age = [e.feedback_id for e in sorted(sixty, key=lambda e: -e.received_at)]
    with store(store_url) as engine:
        save(engine, sixty)
        first = run_round(engine, 1, s)
        assert first.taken == by_age[:14] and first.passed_over == 36 and first.backlog == 10
        assert pending_ids(engine) == set(by_age[14:24])  # the newest of the rest wait
        second = run_round(engine, 2, s)
        assert second.taken == by_age[14:24] and second.passed_over == 0
        replayed = {r["feedback_id"] for r in second.train} - set(second.taken)
        assert len(replayed) == 5 and replayed <= set(by_age[:14] + by_age[24:])  # passed over: in the replay pool
