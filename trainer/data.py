"""What one round trains and is judged on, read from the preference store by indexed queries: the cost of the
periodic check and of a round's selection follows the new data and the round's size, never the store's.

- **Split by completion**: a completion is held out when its `split` (a hash of its messages and answers,
  `feedback.store.split_of`) falls under `holdout_fraction`, so both rows of a pair, every later vote on it and
  the same pair served again land on the same side.
- **Pending, then taken**: an event no round has taken yet is pending (`round_id` NULL, a partial index). The
  check counts the pending events of use to the next round's loss (`count_new`, one query). A round takes the
  newest of them, up to its share of `max_round_examples`, and marks them with its id; the older ones wait for the
  next round (the backlog), at most `max_backlog` of them: older ones join the replay pool. It also marks
  the pending events it has no use for (held out, a tie, a thumb without its opposite in a DPO round), so that they
  stop being pending.
- **Replay**: `replay_fraction` as many rows as the new ones, drawn from events earlier rounds took, as a run of
  the `split` index from a random point: a random sample of them, since the split is a hash.
- **Evaluation**: up to `max_eval_examples` held-out rows, a run of the `split` index from a point fixed by the
  seed (the same rows round after round, while the store grows).
- **Capped per judge and per key**: no judge (API key and user) supplies more than `max_user_share` of the rows,
  and, when votes came through more than one API key, no key more than `max_key_share` (the `user` names a client
  sends are its own, so the users a key invents all count under that key).
- **One loss per round**: DPO when enough pending pairs arrived (thumbs up and down on the two choices of one
  completion already form a pair), else KTO on unpaired thumbs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Integer, and_, case, cast, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from feedback.export import dpo_rows_of, kto_rows_of
from feedback.store import Completion, Feedback, split_of
from serving.protocol import CompletionRecord
from trainer.registry import aware
from trainer.settings import TrainerSettings

Row = dict[str, Any]
Event = tuple[Feedback, Completion]


def held_out(completion: CompletionRecord, fraction: float) -> bool:
    """Whether the trainer holds `completion` out of training for evaluation (`Feedback.split` as stored)."""
    return split_of(completion) < fraction


# -- what is of use to a loss, as SQL over feedback f joined with its completion c ---------------------------

_texts_differ = and_(Completion.text_b.is_not(None), Completion.text_a != Completion.text_b)
_rated_text = case((Feedback.choice == 0, Completion.text_a), else_=Completion.text_b)
_opposite = aliased(Feedback)
_has_opposite = exists().where(
    _opposite.completion_id == Feedback.completion_id,
    _opposite.judge_key_id == Feedback.judge_key_id,
    _opposite.judge_user == Feedback.judge_user,
    _opposite.kind == "rating",
    _opposite.rating == "down",
    _opposite.choice != Feedback.choice,
)
_decisive = and_(Feedback.kind == "pairwise", Feedback.preference.in_(("0", "1")))
_edited = and_(Feedback.kind == "edit", Feedback.edit_text.is_not(None), Feedback.edit_text != _rated_text)

DPO_USABLE: ColumnElement[bool] = or_(
    and_(_decisive, _texts_differ),
    _edited,
    and_(Feedback.kind == "rating", Feedback.rating == "up", _texts_differ, _has_opposite),
)
"""The events that make a DPO row (as `feedback.export.dpo_rows` maps them; a rating pair is made by its `up`)."""

KTO_ROWS: ColumnElement[Any] = case(
    (and_(_decisive, _texts_differ), 2),
    (and_(Feedback.kind == "pairwise", Feedback.preference == "both_bad"), 1 + cast(_texts_differ, Integer)),
    (and_(Feedback.kind == "rating", _rated_text.is_not(None)), 1),
    (_edited, 2),
    else_=0,
)
"""KTO rows an event makes (as `feedback.export.kto_rows` maps them, before it drops a judge's repeated rows)."""


def usable(method: str) -> ColumnElement[bool]:
    return DPO_USABLE if method == "dpo" else KTO_ROWS > 0


def _pending() -> ColumnElement[bool]:
    return Feedback.round_id.is_(None)  # the partial index ix_feedback_pending


@dataclass(frozen=True)
class Pending:
    """What the next round would take as new: pending events of use to each loss (training side only)."""

    dpo: int
    kto: int
    method: str

    @property
    def examples(self) -> int:
        return self.dpo if self.method == "dpo" else self.kto


def pending(session: Session, settings: TrainerSettings) -> Pending:
    """Pending training examples, by loss, and the loss the next round uses: one query on the pending index."""
    query = (
        select(func.count().filter(DPO_USABLE), func.coalesce(func.sum(KTO_ROWS), 0))
        .select_from(Feedback)
        .join(Completion, Feedback.completion_id == Completion.id)
        .where(_pending(), Feedback.split >= settings.holdout_fraction)
    )
    dpo, kto = session.execute(query).one()
    method = settings.train.method
    if method == "auto":
        method = "dpo" if dpo >= settings.train.min_pairs else "kto"
    return Pending(int(dpo), int(kto), method)


def backlog(session: Session, settings: TrainerSettings) -> dict[str, Any]:
    """What waits for the next round, as the admin API, the dashboard and `pairloop adapters list` show it."""
    waiting = pending(session, settings)
    return {
        "examples": waiting.examples,
        "method": waiting.method,
        "pairs": waiting.dpo,
        "kto_rows": waiting.kto,
        "round_starts_at": settings.min_new_examples,
        "round_takes_at_most": settings.max_round_examples,
    }


def count_new(session: Session, settings: TrainerSettings) -> int:
    """Usable training examples (of the next round's loss) that no round has taken yet: the backlog."""
    return pending(session, settings).examples


@dataclass
class RoundData:
    method: str
    """`dpo` or `kto`."""
    train: list[Row]
    eval: list[Row]
    new_examples: int
    """New training rows (before the judge cap)."""
    replayed: int
    capped: int
    data_until: dt.datetime | None
    """The newest event this round took: what its adapter can have learned from."""
    judges: dict[str, int] = field(default_factory=dict)
    taken: list[str] = field(default_factory=list)
    """Ids of the pending events this round takes as new (those the judge cap dropped included)."""
    backlog: int = 0
    """Pending examples this round leaves for the next (over `max_round_examples`, at most `max_backlog`)."""
    passed_over: int = 0
    """Pending events over `max_backlog` that this round moved to the replay pool (set by `take`)."""
    selected_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

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
            "backlog": self.backlog,
            "passed_over": self.passed_over,
            "judges": len(self.judges),
            "examples_sha256": self.digest(),
        }


def _rows(method: str, events: Sequence[Event]) -> list[Row]:
    return (dpo_rows_of if method == "dpo" else kto_rows_of)(events)[0]


def _opposites(session: Session, events: Sequence[Event]) -> dict[tuple[str, str, str], list[Event]]:
    """The `down` ratings that pair with the `up` ratings among `events` (one query, or none), by completion and
    judge: a DPO rating pair needs both."""
    ups = {
        (f.completion_id, f.judge_key_id, f.judge_user) for f, _ in events if f.kind == "rating" and f.rating == "up"
    }
    found: dict[tuple[str, str, str], list[Event]] = {}
    if not ups:
        return found
    query = (
        select(Feedback, Completion)
        .join(Completion, Feedback.completion_id == Completion.id)
        .where(
            Feedback.kind == "rating",
            Feedback.rating == "down",
            Feedback.completion_id.in_(sorted({cid for cid, _, _ in ups})),
        )
    )
    for f, c in session.execute(query).tuples():
        if (judge := (f.completion_id, f.judge_key_id, f.judge_user)) in ups:
            found.setdefault(judge, []).append((f, c))
    return found


def _rows_by_event(session: Session, method: str, events: Sequence[Event]) -> list[list[Row]]:
    """Each event's training rows (a DPO rating pair with its opposite, fetched in one query)."""
    opposites = _opposites(session, events) if method == "dpo" else {}
    return [
        _rows(method, [(f, c), *opposites.get((f.completion_id, f.judge_key_id, f.judge_user), [])]) for f, c in events
    ]


def _events(session: Session, where: list[ColumnElement[bool]], order: Any, limit: int) -> list[Event]:
    query = (
        select(Feedback, Completion)
        .join(Completion, Feedback.completion_id == Completion.id)
        .where(*where)
        .order_by(*order)
        .limit(limit)
    )
    return list(session.execute(query).tuples())


def _split_run(
    session: Session, where: list[ColumnElement[bool]], lo: float, hi: float, start: float, n: int
) -> list[Event]:
    """Up to `n` events with split in [lo, hi), in split order from `start`, wrapping around at `hi`."""
    if n <= 0:
        return []
    first = _events(session, [*where, Feedback.split >= start, Feedback.split < hi], [Feedback.split, Feedback.id], n)
    if len(first) < n:
        first += _events(
            session,
            [*where, Feedback.split >= lo, Feedback.split < start],
            [Feedback.split, Feedback.id],
            n - len(first),
        )
    return first


def select_round(session: Session, settings: TrainerSettings, salt: int = 0) -> RoundData:
    """The round's rows: the newest pending examples (up to their share of `max_round_examples`), a replay sample
    of earlier rounds' examples, and held-out evaluation rows. A bounded number of indexed queries; the caller
    records what it took with `take`. `salt` (the round's version) varies the replay sample from round to round."""
    config = settings.train
    holdout = settings.holdout_fraction
    selected_at = dt.datetime.now(dt.UTC)
    waiting = pending(session, settings)
    method = waiting.method
    is_usable = usable(method)
    cap = settings.max_round_examples
    new_cap = max(1, math.ceil(cap / (1 + settings.replay_fraction)))

    # Newest first: an event makes one DPO row, or one or two KTO rows (those of one event stay together).
    fresh = _events(
        session,
        [_pending(), Feedback.split >= holdout, is_usable],
        [Feedback.received_at.desc(), Feedback.id.desc()],
        new_cap,
    )
    meta = {f.id: (f"{f.judge_key_id}:{f.judge_user}", aware(f.received_at)) for f, _ in fresh}
    train_new: list[Row] = []
    taken: list[str] = []
    seen: set[tuple[Any, ...]] = set()  # a KTO row a judge gave twice (a thumb and a vote for the same answer)
    for (f, _), rows in zip(fresh, _rows_by_event(session, method, fresh), strict=True):
        if len(train_new) + len(rows) > new_cap:
            break
        if method == "kto":
            keys = [(r["completion_id"], meta[f.id][0], r["completion"][0]["content"], r["label"]) for r in rows]
            rows = [r for r, key in zip(rows, keys, strict=True) if key not in seen]
            seen.update(keys)
        train_new += rows
        taken.append(f.id)
    newest = max((meta[i][1] for i in taken), default=None)

    rng = random.Random(f"{config.seed}:{salt}")
    want = min(cap - len(train_new), int(len(train_new) * settings.replay_fraction))
    earlier = _split_run(
        session, [Feedback.round_id.is_not(None), is_usable], holdout, 1.0, rng.uniform(holdout, 1.0), want
    )
    replay = [r for rows in _rows_by_event(session, method, earlier) for r in rows][:want]
    for f, _ in earlier:
        meta[f.id] = (f"{f.judge_key_id}:{f.judge_user}", aware(f.received_at))

    start = random.Random(config.seed).uniform(0.0, holdout)
    held = _split_run(session, [is_usable], 0.0, holdout, start, settings.max_eval_examples)
    evaluation = [r for rows in _rows_by_event(session, method, held) for r in rows][: settings.max_eval_examples]

    chosen, capped = _cap(
        [{**r, "judge": meta[r["feedback_id"]][0]} for r in train_new + replay],
        settings.max_user_share,
        settings.max_key_share,
    )
    rng.shuffle(chosen)
    judges: dict[str, int] = {}
    for row in chosen:
        judges[row["judge"]] = judges.get(row["judge"], 0) + 1
    left = waiting.examples - len(train_new)
    return RoundData(
        method=method,
        train=chosen,
        eval=evaluation,
        new_examples=len(train_new),
        replayed=len(replay),
        capped=capped,
        data_until=newest,
        judges=judges,
        taken=taken,
        backlog=max(0, left),
        selected_at=selected_at,
    )


def take(session: Session, round_id: int, data: RoundData, settings: TrainerSettings) -> None:
    """Mark what round `round_id` took as new, the pending events received before its selection that no round will
    use (held out, or of no use to its loss), and the oldest pending events over `max_backlog` (they join
    the replay pool): none of them is pending any more. The caller commits."""
    for i in range(0, len(data.taken), 500):
        batch = data.taken[i : i + 500]
        session.execute(update(Feedback).where(Feedback.id.in_(batch)).values(round_id=round_id))
    until = data.selected_at
    if session.get_bind().dialect.name == "sqlite":
        until = until.replace(tzinfo=None)  # SQLite keeps UTC times as naive text
    unused = (
        select(Feedback.id)
        .join(Completion, Feedback.completion_id == Completion.id)
        .where(
            _pending(),
            Feedback.received_at <= until,
            or_(Feedback.split < settings.holdout_fraction, ~usable(data.method)),
        )
    )
    session.execute(
        update(Feedback)
        .where(Feedback.id.in_(unused.scalar_subquery()))
        .values(round_id=round_id)
        .execution_options(synchronize_session=False)
    )
    # Over the backlog's bound, the oldest pending examples join the replay pool (the newest wait for the next round).
    bound = (
        select(Feedback.received_at)
        .join(Completion, Feedback.completion_id == Completion.id)
        .where(_pending(), Feedback.split >= settings.holdout_fraction, usable(data.method))
        .order_by(Feedback.received_at.desc(), Feedback.id.desc())
        .offset(settings.max_backlog)
        .limit(1)
    )
    oldest_kept = session.scalar(bound)
    if oldest_kept is not None:
        over = session.execute(
            update(Feedback)
            .where(_pending(), Feedback.received_at <= oldest_kept)
            .values(round_id=round_id)
            .execution_options(synchronize_session=False)
        )
        data.passed_over = int(over.rowcount or 0)  # type: ignore[attr-defined]
        data.backlog = pending(session, settings).examples


def give_back(session: Session, round_ids: list[int]) -> None:
    """What rounds that never ran to the end took is pending again (the next round offers it anew)."""
    if round_ids:
        session.execute(update(Feedback).where(Feedback.round_id.in_(round_ids)).values(round_id=None))


def _cap(rows: list[Row], share: float, key_share: float = 1.0) -> tuple[list[Row], int]:
    """At most `share` of the rows from any one judge and, when more than one API key gave rows, at most
    `key_share` from any one key (at least one each); how many were dropped. A row's judge is `key:user`."""
    if not rows:
        return rows, 0
    keys = [row["judge"].split(":", 1)[0] for row in rows]
    judge_limit = max(1, int(share * len(rows))) if share < 1 else len(rows)
    key_limit = max(1, int(key_share * len(rows))) if key_share < 1 and len(set(keys)) > 1 else len(rows)
    kept: list[Row] = []
    per_judge: Counter[str] = Counter()
    per_key: Counter[str] = Counter()
    for row, key in zip(rows, keys, strict=True):  # new rows first, newest first: a judge keeps its newest
        if per_judge[row["judge"]] < judge_limit and per_key[key] < key_limit:
            kept.append(row)
            per_judge[row["judge"]] += 1
            per_key[key] += 1
    return kept, len(rows) - len(kept)
