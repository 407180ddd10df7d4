"""The live A/B test of a challenger against the champion: its record from the store and the decision.

Only pairs in which the challenger played against another adapter count, and only decisive votes (ties and
`both_bad` carry no preference). `decide` is the rule itself, a pure function of the record.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from feedback.store import Completion, Feedback

Decision = Literal["promote", "retire", "wait"]


@dataclass
class AbResult:
    wins: int
    losses: int
    lower: float
    upper: float
    decision: Decision
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "wins": self.wins,
            "losses": self.losses,
            "lower": self.lower,
            "upper": self.upper,
            "decision": self.decision,
        }


def wilson(wins: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a win rate (0, 1 with no votes)."""
    if n == 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def decide(wins: int, losses: int, min_votes: int, confidence: float, max_votes: int | None = None) -> AbResult:
    """Promote once the win rate's lower bound passes 0.5 (with `min_votes` votes), retire once the upper bound
    falls below 0.5, or when `max_votes` votes have not shown the challenger better; else wait."""
    n = wins + losses
    lower, upper = wilson(wins, n, confidence)
    interval = f"{wins}-{losses}, interval [{lower:.3f}, {upper:.3f}]"
    decision: Decision = "wait"
    reason = ""
    if lower > 0.5 and n >= min_votes:
        decision, reason = "promote", f"won the live A/B test: {interval}"
    elif upper < 0.5:
        decision, reason = "retire", f"lost the live A/B test: {interval}"
    elif max_votes is not None and n >= max_votes:
        decision, reason = "retire", f"no clear win in {n} live votes: {interval}"
    return AbResult(wins, losses, round(lower, 4), round(upper, 4), decision, reason)


def ab_votes(session: Session, challenger: str) -> tuple[int, int]:
    """(wins, losses) of `challenger` in pairwise votes on pairs it played in against another adapter."""
    query = (
        select(Feedback.preference, Completion.adapter_a, Completion.adapter_b)
        .join(Completion, Feedback.completion_id == Completion.id)
        .where(
            Feedback.kind == "pairwise",
            Feedback.preference.in_(("0", "1")),
            or_(
                and_(Completion.adapter_a == challenger, Completion.adapter_b != challenger),
                and_(Completion.adapter_b == challenger, Completion.adapter_a != challenger),
            ),
        )
    )
    wins = losses = 0
    for preference, a, b in session.execute(query):
        winner = a if preference == "0" else b
        if winner == challenger:
            wins += 1
        else:
            losses += 1
    return wins, losses
