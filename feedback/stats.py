"""`GET /v1/feedback/stats`: what the store holds, and the biases a training run should know about."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from feedback.store import Completion, Feedback


def compute(session: Session, *, top_users: int = 20) -> dict[str, Any]:
    total = session.scalar(select(func.count()).select_from(Feedback)) or 0
    by_kind = dict(session.execute(select(Feedback.kind, func.count()).group_by(Feedback.kind)).tuples().all())
    prefs = dict(
        session.execute(
            select(Feedback.preference, func.count()).where(Feedback.kind == "pairwise").group_by(Feedback.preference)
        )
        .tuples()
        .all()
    )
    wins_a, wins_b = prefs.get("0", 0), prefs.get("1", 0)
    decisive = wins_a + wins_b

    # Per adapter: pairwise wins and losses (the adapter of the chosen and of the other choice), and thumbs.
    winner = case((Feedback.preference == "0", Completion.adapter_a), else_=Completion.adapter_b)
    loser = case((Feedback.preference == "0", Completion.adapter_b), else_=Completion.adapter_a)
    rated = case((Feedback.choice == 0, Completion.adapter_a), else_=Completion.adapter_b)
    joined = select().select_from(Feedback).join(Completion, Feedback.completion_id == Completion.id)
    decisive_votes = Feedback.kind == "pairwise", Feedback.preference.in_(["0", "1"])
    adapters: dict[str, dict[str, int]] = {}

    def add(rows: Any, field: str) -> None:
        for name, count in rows:
            entry = adapters.setdefault(name or "?", {"wins": 0, "losses": 0, "up": 0, "down": 0})
            entry[field] += count

    add(session.execute(joined.add_columns(winner, func.count()).where(*decisive_votes).group_by(winner)), "wins")
    add(session.execute(joined.add_columns(loser, func.count()).where(*decisive_votes).group_by(loser)), "losses")
    for rating in ("up", "down"):
        add(
            session.execute(
                joined.add_columns(rated, func.count())
                .where(Feedback.kind == "rating", Feedback.rating == rating)
                .group_by(rated)
            ),
            rating,
        )

    judge = select(Feedback.judge_key_id, Feedback.judge_user, func.count().label("n")).group_by(
        Feedback.judge_key_id, Feedback.judge_user
    )
    users = [
        {"key_id": key_id, "user": user or None, "events": n, "share": round(n / total, 4) if total else 0.0}
        for key_id, user, n in session.execute(judge.order_by(func.count().desc()).limit(top_users)).tuples()
    ]
    return {
        "object": "feedback.stats",
        "events": total,
        "completions": session.scalar(select(func.count()).select_from(Completion)) or 0,
        "by_kind": by_kind,
        "pairwise": {
            "a_wins": wins_a,
            "b_wins": wins_b,
            "tie": prefs.get("tie", 0),
            "both_bad": prefs.get("both_bad", 0),
            # Position bias: with randomly ordered pairs this stays near 0.5.
            "a_win_rate": round(wins_a / decisive, 4) if decisive else None,
        },
        "by_adapter": adapters,
        "top_users": users,
    }
