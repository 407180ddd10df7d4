"""The preference store on SQLite and PostgreSQL: migrations match the models, writes are idempotent, and
exports follow the documented mapping."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from deploy.migrations import current, head
from feedback.export import Format, dpo_rows, export, kto_rows, write
from feedback.schema import FeedbackEvent
from feedback.store import Base, save_event
from tests.store_helpers import event, record
from workers.jobs import configure, store_feedback


def save(store_url: str, *events: FeedbackEvent) -> list[bool]:
    engine = create_engine(store_url)
    try:
        with Session(engine) as session, session.begin():
            return [save_event(session, e) for e in events]
    finally:
        engine.dispose()


def rows(store_url: str, kind: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    engine = create_engine(store_url)
    try:
        with Session(engine) as session:
            got, report = (dpo_rows if kind == "dpo" else kto_rows)(session)
            return got, report.as_dict()
    finally:
        engine.dispose()


def test_migrations_match_the_models(store_url: str) -> None:
    import trainer.registry  # noqa: F401  (its tables join Base.metadata)

    assert current(store_url) == head() == "0002"
    engine = create_engine(store_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_the_job_is_idempotent(store_url: str) -> None:
    """A job rerun after its commit (worker killed before RQ's acknowledgement) stores nothing new."""
    configure(store_url)
    payload = event(record(), preference="1").model_dump(mode="json")
    assert store_feedback(payload) is True
    assert store_feedback(payload) is False
    assert len(rows(store_url, "dpo")[0]) == 1


def test_one_vote_per_judge_even_if_the_api_check_was_missed(store_url: str) -> None:
    c = record()
    first, second = event(c, preference="0"), event(c, preference="1")
    other_judge = event(c, judge="bob", preference="1")
    assert save(store_url, first, second, other_judge) == [True, False, True]
    got, _ = rows(store_url, "dpo")
    assert sorted(r["feedback_id"] for r in got) == sorted([first.feedback_id, other_judge.feedback_id])


def test_dpo_mapping(store_url: str) -> None:
    win_b, tie, both_bad, thumbs, edit, same = (record() for _ in range(6))
    same = record("Same text.", "Same text.")
    only_up = record()
    save(
        store_url,
        event(win_b, preference="1"),
        event(tie, preference="tie"),
        event(both_bad, preference="both_bad"),
        event(thumbs, "rating", choice=1, rating="up"),
        event(thumbs, "rating", choice=0, rating="down"),
        event(edit, "edit", choice=0, edit_text="A better answer."),
        event(same, preference="0"),
        event(only_up, "rating", choice=0, rating="up"),
    )
    got, report = rows(store_url, "dpo")
    by_id = {r["completion_id"]: r for r in got}
    assert set(by_id) == {win_b.id, thumbs.id, edit.id}
    assert by_id[win_b.id]["chosen"] == [{"role": "assistant", "content": "Answer B."}]
    assert by_id[win_b.id]["rejected"] == [{"role": "assistant", "content": "Answer A."}]
    assert by_id[win_b.id]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert by_id[thumbs.id]["chosen"][0]["content"] == "Answer B."
    assert by_id[edit.id]["chosen"][0]["content"] == "A better answer."
    assert by_id[edit.id]["rejected"][0]["content"] == "Answer A."
    assert report["skipped"] == {"tie": 1, "both_bad": 1, "identical_texts": 1, "rating_without_opposite": 1}
    assert report["rows"] == 3 and report["events"] == 8


def test_kto_mapping(store_url: str) -> None:
    win_a, both_bad, thumbs, tie = record(), record(), record(), record()
    save(
        store_url,
        event(win_a, preference="0"),
        event(win_a, "rating", choice=0, rating="up"),  # repeats the vote's True row: written once
        event(both_bad, preference="both_bad"),
        event(thumbs, "rating", choice=1, rating="down"),
        event(tie, preference="tie"),
    )
    got, report = rows(store_url, "kto")
    labels = sorted((r["completion_id"], r["completion"][0]["content"], r["label"]) for r in got)
    assert labels == sorted(
        [
            (win_a.id, "Answer A.", True),
            (win_a.id, "Answer B.", False),
            (both_bad.id, "Answer A.", False),
            (both_bad.id, "Answer B.", False),
            (thumbs.id, "Answer B.", False),
        ]
    )
    assert report["skipped"] == {"repeated_row": 1, "tie": 1}


def test_export_files_and_since(store_url: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    old, new = record(), record()
    early = event(old, preference="0")
    early.received_at = time.time() - 3600
    save(store_url, early, event(new, preference="1"))
    engine = create_engine(store_url)
    with Session(engine) as session:
        report = export(session, "dpo", tmp_path / "all.parquet", "parquet")
        assert report.rows == 2
        table = pq.read_table(tmp_path / "all.parquet")
        assert table.num_rows == 2 and {"prompt", "chosen", "rejected"} <= set(table.column_names)
        import datetime as dt

        since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        report = export(session, "dpo", tmp_path / "recent.jsonl", "jsonl", since)
    engine.dispose()
    lines = (tmp_path / "recent.jsonl").read_text().splitlines()
    assert report.rows == 1 and json.loads(lines[0])["completion_id"] == new.id
    assert not list(tmp_path.glob(".*.tmp"))


def test_single_choice_completions_store_and_rate(store_url: str) -> None:
    single = record(b=None)
    save(store_url, event(single, "rating", choice=0, rating="up"))
    got, _ = rows(store_url, "kto")
    assert [(r["completion"][0]["content"], r["label"]) for r in got] == [("Answer A.", True)]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_writes_nothing_half_done(tmp_path: Path, fmt: Format) -> None:
    """A failure while writing leaves the previous file as it was and no temporary file behind."""
    import pyarrow as pa

    out = tmp_path / f"data.{fmt}"
    out.write_text("previous")
    good = {"prompt": [], "chosen": [], "rejected": []}
    with pytest.raises((TypeError, pa.ArrowException)):
        write([good, {**good, "chosen": object()}], out, fmt)  # the second row cannot be serialized
    assert out.read_text() == "previous"
    assert not list(tmp_path.glob(".*.tmp"))
