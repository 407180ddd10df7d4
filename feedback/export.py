"""Training data from the store, in TRL's conversational formats.

DPO rows are `prompt`/`chosen`/`rejected`; KTO rows are `prompt`/`completion`/`label`. Each row also
carries `completion_id` and `feedback_id`, so any training example leads back to what was served and who
judged it. The mapping:

| feedback                            | DPO                               | KTO                           |
|-------------------------------------|-----------------------------------|-------------------------------|
| pairwise 0 or 1                     | chosen = winner, rejected = loser | winner True, loser False      |
| pairwise `tie`                      | skipped, counted                  | skipped, counted              |
| pairwise `both_bad`                 | skipped, counted                  | both choices False            |
| rating up / down                    | (see next line)                   | the rated choice True / False |
| up on one choice, down on the other | chosen = up, rejected = down      | (the two rows above)          |
| edit of a choice                    | chosen = edit, rejected = choice  | edit True, original False     |

A pair whose two texts are identical teaches nothing and is dropped (counted); KTO rows repeated by one
judge on one completion (a thumbs up and a vote for the same choice) are written once.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.store import Completion, Feedback

Kind = Literal["dpo", "kto"]
Format = Literal["jsonl", "parquet"]


@dataclass
class ExportReport:
    kind: str
    rows: int = 0
    events: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prompt(completion: Completion) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in completion.messages]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _events(session: Session, since: dt.datetime | None) -> Iterator[tuple[Feedback, Completion]]:
    query = select(Feedback, Completion).join(Completion, Feedback.completion_id == Completion.id)
    if since is not None:
        since = since.astimezone(dt.UTC)
        if session.get_bind().dialect.name == "sqlite":
            since = since.replace(tzinfo=None)  # SQLite keeps UTC times as naive text
        query = query.where(Feedback.received_at >= since)
    query = query.order_by(Feedback.received_at, Feedback.id).execution_options(yield_per=1000)
    yield from session.execute(query).tuples()


Events = Iterable[tuple[Feedback, Completion]]


def dpo_rows(session: Session, since: dt.datetime | None = None) -> tuple[list[dict[str, Any]], ExportReport]:
    return dpo_rows_of(_events(session, since))


def kto_rows(session: Session, since: dt.datetime | None = None) -> tuple[list[dict[str, Any]], ExportReport]:
    return kto_rows_of(_events(session, since))


def dpo_rows_of(events: Events) -> tuple[list[dict[str, Any]], ExportReport]:
    """DPO rows of `events` in their order (a rating pair where its `up` comes). A rating's opposite must be among
    `events` for the pair to form."""
    report = ExportReport("dpo")
    rows: list[dict[str, Any]] = []
    ratings: dict[tuple[str, str, str], dict[str, tuple[int, Feedback]]] = {}
    completions: dict[str, Completion] = {}

    def pair(c: Completion, chosen: str | None, rejected: str | None, feedback_id: str) -> None:
        if chosen is None or rejected is None:
            report.skip("missing_text")
        elif chosen == rejected:
            report.skip("identical_texts")
        else:
            rows.append(
                {
                    "prompt": _prompt(c),
                    "chosen": _assistant(chosen),
                    "rejected": _assistant(rejected),
                    "completion_id": c.id,
                    "feedback_id": feedback_id,
                }
            )

    for f, c in events:
        report.events += 1
        if f.kind == "pairwise":
            if f.preference in ("0", "1"):
                win = int(f.preference)
                pair(c, c.text(win), c.text(1 - win), f.id)
            else:
                report.skip(f.preference or "unknown")
        elif f.kind == "edit":
            assert f.choice is not None
            pair(c, f.edit_text, c.text(f.choice), f.id)
        elif f.kind == "rating":
            completions[c.id] = c
            assert f.rating is not None and f.choice is not None
            ratings.setdefault((c.id, f.judge_key_id, f.judge_user), {})[f.rating] = (f.choice, f)
    for (cid, _, _), by_rating in ratings.items():
        if "up" in by_rating and "down" in by_rating and by_rating["up"][0] != by_rating["down"][0]:
            c = completions[cid]
            (up, f_up), (down, _) = by_rating["up"], by_rating["down"]
            pair(c, c.text(up), c.text(down), f_up.id)
        else:
            report.skip("rating_without_opposite")
    report.rows = len(rows)
    return rows, report


def kto_rows_of(events: Events) -> tuple[list[dict[str, Any]], ExportReport]:
    """KTO rows of `events`, each event's rows on its own."""
    report = ExportReport("kto")
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str, str, bool]] = set()

    def row(c: Completion, f: Feedback, text: str | None, label: bool) -> None:
        if text is None:
            report.skip("missing_text")
            return
        key = (c.id, f.judge_key_id, f.judge_user, text, label)
        if key in seen:
            report.skip("repeated_row")
            return
        seen.add(key)
        rows.append(
            {
                "prompt": _prompt(c),
                "completion": _assistant(text),
                "label": label,
                "completion_id": c.id,
                "feedback_id": f.id,
            }
        )

    for f, c in events:
        report.events += 1
        if f.kind == "pairwise":
            if f.preference in ("0", "1"):
                win = int(f.preference)
                if c.text(win) == c.text(1 - win):
                    report.skip("identical_texts")
                    continue
                row(c, f, c.text(win), True)
                row(c, f, c.text(1 - win), False)
            elif f.preference == "both_bad":
                row(c, f, c.text(0), False)
                if c.text(1) != c.text(0):
                    row(c, f, c.text(1), False)
            else:
                report.skip(f.preference or "unknown")
        elif f.kind == "rating":
            assert f.choice is not None
            row(c, f, c.text(f.choice), f.rating == "up")
        elif f.kind == "edit":
            assert f.choice is not None
            if f.edit_text == c.text(f.choice):
                report.skip("identical_texts")
                continue
            row(c, f, f.edit_text, True)
            row(c, f, c.text(f.choice), False)
    report.rows = len(rows)
    return rows, report


def write(rows: list[dict[str, Any]], out: Path, fmt: Format) -> None:
    """Write `rows` to `out` atomically: a reader sees the old file or the whole new one, never a part."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        if fmt == "jsonl":
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                for r in rows:
                    handle.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            os.close(fd)
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export(session: Session, kind: Kind, out: Path, fmt: Format, since: dt.datetime | None = None) -> ExportReport:
    rows, report = (dpo_rows if kind == "dpo" else kto_rows)(session, since)
    write(rows, out, fmt)
    return report
