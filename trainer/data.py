"""What one round trains and is judged on, drawn from the preference store.

- **Split by completion**: a completion is held out when a hash of its id falls under `holdout_fraction`,
  so both rows of a pair, and every later vote on it, land on the same side, round after round.
- **New and replayed**: the training rows are the examples received since the previous round, plus
  `replay_fraction` as many older training rows drawn at random (guards against forgetting).
- **Capped per judge**: no judge (API key and user) supplies more than `max_user_share` of the rows.
- **One loss per round**: DPO when the round has enough pairs (thumbs up and down on the two choices of one
  completion already form a pair), else KTO on unpaired thumbs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.export import dpo_rows, kto_rows
from feedback.store import Feedback
from trainer.registry import aware
from trainer.settings import TrainerSettings

Row = dict[str, Any]


def held_out(completion_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(completion_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class RoundData:
    method: str
    """`dpo` or `kto`."""
    train: list[Row]
    eval: list[Row]
    new_examples: int
    replayed: int
    capped: int
    data_until: dt.datetime | None
    """The newest feedback this round has seen: the next round counts what came after it."""
    judges: dict[str, int] = field(default_factory=dict)

    def digest(self) -> str:
        """SHA-256 of the training rows' feedback ids: which examples the adapter was trained on."""
        ids = sorted(f"{r['feedback_id']}:{r.get('label', '')}" for r in self.train)
        return hashlib.sha256(json.dumps(ids).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
            "new_examples": self.new_examples,
            "replayed": self.replayed,
            "capped": self.capped,
            "judges": len(self.judges),
            "examples_sha256": self.digest(),
        }


def _judges(session: Session) -> dict[str, tuple[str, dt.datetime]]:
    """feedback id -> (judge, received_at)."""
    query = select(Feedback.id, Feedback.judge_key_id, Feedback.judge_user, Feedback.received_at)
    return {fid: (f"{key}:{user}", aware(at)) for fid, key, user, at in session.execute(query)}


def count_new(session: Session, since: dt.datetime | None, settings: TrainerSettings) -> int:
    """Usable training examples (of the round's method) received after `since`."""
    return select_round(session, since, settings).new_examples


def select_round(session: Session, since: dt.datetime | None, settings: TrainerSettings) -> RoundData:
    """The round's rows: feedback received after `since` (the previous round's watermark) plus replay."""
    config = settings.train
    pairs, _ = dpo_rows(session)
    method = config.method
    if method == "auto":
        method = (
            "dpo"
            if sum(not held_out(r["completion_id"], settings.holdout_fraction) for r in pairs) >= (config.min_pairs)
            else "kto"
        )
    rows = pairs if method == "dpo" else kto_rows(session)[0]
    meta = _judges(session)
    rng = random.Random(config.seed)

    train_new: list[Row] = []
    train_old: list[Row] = []
    evaluation: list[Row] = []
    newest: dt.datetime | None = None
    for row in rows:
        judge, received = meta[row["feedback_id"]]
        row = {**row, "judge": judge}
        newest = received if newest is None or received > newest else newest
        if held_out(row["completion_id"], settings.holdout_fraction):
            evaluation.append(row)
        elif since is None or received > since:
            train_new.append(row)
        else:
            train_old.append(row)

    replay = rng.sample(train_old, min(len(train_old), int(len(train_new) * settings.replay_fraction)))
    chosen, capped = _cap(train_new + replay, settings.max_user_share)
    rng.shuffle(chosen)
    if len(evaluation) > settings.max_eval_examples:
        evaluation = rng.sample(evaluation, settings.max_eval_examples)
    judges: dict[str, int] = {}
    for row in chosen:
        judges[row["judge"]] = judges.get(row["judge"], 0) + 1
    return RoundData(
        method=method,
        train=chosen,
        eval=evaluation,
        new_examples=len(train_new),
        replayed=len(replay),
        capped=capped,
        data_until=newest,
        judges=judges,
    )


def _cap(rows: list[Row], share: float) -> tuple[list[Row], int]:
    """At most `share` of the rows from any one judge (at least one each); how many were dropped."""
    if share >= 1 or not rows:
        return rows, 0
    limit = max(1, int(share * len(rows)))
    kept: list[Row] = []
    per_judge: dict[str, int] = {}
    for row in rows:  # new rows come first: a judge over the cap keeps its newest examples
        n = per_judge.get(row["judge"], 0)
        if n < limit:
            kept.append(row)
            per_judge[row["judge"]] = n + 1
    return kept, len(rows) - len(kept)
