"""The live A/B test of a challenger against the champion: its record from the store and the decision.

Only pairs in which the challenger played against another adapter count, and only decisive votes (ties and
`both_bad` carry no preference). Each decisive vote is a coin with the challenger's win rate `p`.

The rule is a **mixture sequential probability ratio test** (mSPRT; Robbins 1970, "Statistical methods related
to the law of the iterated logarithm"; Johari, Koomen, Pekelis and Walsh 2017, "Peeking at A/B tests: why it
matters, and what to do about it", the always-valid p-values of online experimentation platforms). Against
`p = 1/2` it weighs the likelihood of every `p` above 1/2, mixed uniformly:

    evidence_better(W, L) = ∫_{1/2}^{1} 2 · p^W (1-p)^L dp  /  (1/2)^(W+L)

(and `evidence_worse` the same below 1/2). When the challenger is no better (`p <= 1/2`) this is a nonnegative
supermartingale with mean at most 1, so by Ville's inequality it ever reaches `1/alpha` with probability at
most `alpha`, however often it is looked at: after every vote, every 10, or at random times. A Wilson interval
re-checked at every look has no such bound (bench/ab.py measures both). The challenger is promoted once
`evidence_better >= 1/alpha` with at least `min_votes` votes, retired once `evidence_worse >= 1/alpha`, or once
`max_votes` votes have not shown it better. `decide` is the rule itself, a pure function of the record.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from feedback.store import Completion, Feedback

Decision = Literal["promote", "retire", "wait"]

STATISTIC = "mixture SPRT likelihood ratio (uniform mixture over win rates above 1/2)"
"""What `evidence` is, for the dashboard and the CLI."""


@dataclass
class AbResult:
    wins: int
    losses: int
    evidence: float
    """Mixture likelihood ratio that the challenger is better (promote at `threshold`)."""
    evidence_worse: float
    """Mixture likelihood ratio that it is worse (retire at `threshold`)."""
    threshold: float
    """1 / alpha."""
    decision: Decision
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "wins": self.wins,
            "losses": self.losses,
            "statistic": STATISTIC,
            "evidence": round(self.evidence, 4),
            "evidence_worse": round(self.evidence_worse, 4),
            "threshold": round(self.threshold, 4),
            "decision": self.decision,
            "reason": self.reason,
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


def _log_binomial_cdf_half(k: int, m: int) -> float:
    """log P(Binomial(m, 1/2) <= k)."""
    terms = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) for i in range(k + 1)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms)) - m * math.log(2)


@functools.lru_cache(maxsize=1 << 16)
def log_evidence(wins: int, losses: int) -> float:
    """log of the mixture likelihood ratio that the win rate is above 1/2, after `wins` and `losses`.

    ∫_{1/2}^{1} p^W (1-p)^L dp = B(W+1, L+1) · P(Binomial(W+L+1, 1/2) <= W), so the ratio is
    2 · 2^n · W! L! / (n+1)! · P(Binomial(n+1, 1/2) <= W), with n = W + L. It is 1 before any vote.
    """
    n = wins + losses
    log_beta = math.lgamma(wins + 1) + math.lgamma(losses + 1) - math.lgamma(n + 2)
    return (n + 1) * math.log(2) + log_beta + _log_binomial_cdf_half(wins, n + 1)


def decide(wins: int, losses: int, min_votes: int, alpha: float, max_votes: int | None = None) -> AbResult:
    """Promote once the evidence that the challenger is better reaches 1/alpha (with `min_votes` decisive votes),
    retire once the evidence that it is worse does, or once `max_votes` votes have not shown it better; else
    wait. Valid at any number of looks: the chance of promoting a challenger that is no better is at most alpha."""
    n = wins + losses
    threshold = 1 / alpha
    better, worse = math.exp(log_evidence(wins, losses)), math.exp(log_evidence(losses, wins))
    record = f"{wins}-{losses}, evidence {better:.3g} for and {worse:.3g} against (threshold {threshold:.3g})"
    decision: Decision = "wait"
    reason = ""
    if better >= threshold and n >= min_votes:
        decision, reason = "promote", f"won the live A/B test: {record}"
    elif worse >= threshold:
        decision, reason = "retire", f"lost the live A/B test: {record}"
    elif max_votes is not None and n >= max_votes:
        decision, reason = "retire", f"no clear win in {n} live votes: {record}"
    return AbResult(wins, losses, better, worse, threshold, decision, reason)


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


def live_record(
    session: Session, challenger: str, *, min_votes: int, alpha: float, max_votes: int | None, confidence: float
) -> dict[str, Any]:
    """The challenger's record as the dashboard and `pairloop adapters list` show it: the votes, the statistic
    that decides with its threshold, what it would decide now, and a Wilson interval to read."""
    wins, losses = ab_votes(session, challenger)
    result = decide(wins, losses, min_votes, alpha, max_votes)
    lower, upper = wilson(wins, wins + losses, confidence)
    return {
        "challenger": challenger,
        **result.as_dict(),
        "alpha": alpha,
        "min_votes": min_votes,
        "max_votes": max_votes,
        "confidence": confidence,
        "lower": round(lower, 4),
        "upper": round(upper, 4),
    }
