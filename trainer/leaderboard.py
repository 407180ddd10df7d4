"""A leaderboard of every variant that ever served (the base model and each adapter), from all pairwise votes
between two different variants: a Bradley-Terry fit with a position effect, and bootstrap intervals.

The model: the chance that variant `i`, shown as choice A (index 0), is preferred to `j`, shown as B, is

    P(i over j | i shown first) = 1 / (1 + exp(-(theta_i - theta_j + h)))

`h` is the advantage of being shown first (position bias). Fitting it with the strengths means the side a variant
happened to be shown on does not move its strength, even when sides were not balanced. A `tie` or `both_bad` vote
counts as half a win for each side (both say neither answer is better; Chatbot Arena counts them the same way).
Votes on pairs from one variant say nothing about strengths and are left out.

The fit maximises the likelihood with a weak Gaussian prior on each strength (`PRIOR_SD`), which keeps a variant
that won or lost every vote finite, by Newton's method. Strengths are shown on the Elo scale (400 points: ten to one
odds) with the base model at 1000 (or, when it has no vote, the mean at 1000). Intervals: the 2.5th and 97.5th
percentiles over `bootstrap` refits on votes resampled with replacement (seeded, so the same votes give the same
table).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.store import Completion, Feedback

ELO = 400 / math.log(10)
PRIOR_SD = 10.0
"""Standard deviation of the prior on each strength (natural units: 10 is a 1:22,000 odds ratio), weak on purpose."""

Vote = tuple[str, str, float]
"""(variant shown as A, variant shown as B, score of A: 1 a win, 0 a loss, 0.5 a tie)."""


def fit(votes: Sequence[Vote], variants: Sequence[str]) -> tuple[dict[str, float], float]:
    """Strengths (natural units, summing to 0) and the first-position effect `h`, by penalised maximum likelihood."""
    index = {v: i for i, v in enumerate(variants)}
    k = len(variants)
    cells: Counter[tuple[int, int]] = Counter()
    scores: dict[tuple[int, int], float] = {}
    for first, second, score in votes:
        cell = index[first], index[second]
        cells[cell] += 1
        scores[cell] = scores.get(cell, 0.0) + score
    params = [0.0] * (k + 1)  # strengths, then h
    for _ in range(100):
        grad = [-p / PRIOR_SD**2 for p in params[:k]] + [0.0]
        hess = [[0.0] * (k + 1) for _ in range(k + 1)]
        for i in range(k):
            hess[i][i] = -1 / PRIOR_SD**2
        for (i, j), n in cells.items():
            p = 1 / (1 + math.exp(-(params[i] - params[j] + params[k])))
            residual = scores[i, j] - n * p
            weight = n * p * (1 - p)
            for r, sign_r in ((i, 1.0), (j, -1.0), (k, 1.0)):
                grad[r] += sign_r * residual
                for c, sign_c in ((i, 1.0), (j, -1.0), (k, 1.0)):
                    hess[r][c] -= sign_r * sign_c * weight
        step = _solve([[-x for x in row] for row in hess], grad)
        params = [p + s for p, s in zip(params, step, strict=True)]
        if max(abs(s) for s in step) < 1e-9:
            break
    mean = sum(params[:k]) / k if k else 0.0
    return {v: params[i] - mean for v, i in index.items()}, params[k]


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """x with matrix @ x = vector (Gaussian elimination with partial pivoting; the matrix is small)."""
    n = len(vector)
    m = [[*row, v] for row, v in zip(matrix, vector, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            factor = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= factor * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


@dataclass
class Standing:
    name: str
    rating: float
    lower: float
    upper: float
    votes: int
    wins: float
    losses: float
    ties: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rating": round(self.rating, 1),
            "lower": round(self.lower, 1),
            "upper": round(self.upper, 1),
            "votes": self.votes,
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
        }


def leaderboard(
    votes: Sequence[Vote], *, base: str | None = None, bootstrap: int = 200, seed: int = 0
) -> dict[str, Any]:
    """The ranked table: Elo-scale ratings with bootstrap intervals, each variant's record, the position effect."""
    variants = sorted({v for a, b, _ in votes for v in (a, b)})
    if not variants:
        return {"object": "leaderboard", "votes": 0, "position_effect": None, "variants": []}
    anchor = base if base in variants else None

    def ratings(sample: Sequence[Vote]) -> tuple[dict[str, float], float]:
        strengths, h = fit(sample, variants)
        zero = strengths[anchor] if anchor else 0.0
        return {v: 1000 + ELO * (s - zero) for v, s in strengths.items()}, h

    point, h = ratings(votes)
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(bootstrap):
        sample = [votes[rng.randrange(len(votes))] for _ in votes]
        resampled, _ = ratings(sample)
        for v in variants:
            draws[v].append(resampled[v])
    record = _records(votes)
    table = []
    for v in variants:
        ordered = sorted(draws[v])
        lower = ordered[int(0.025 * (len(ordered) - 1))] if ordered else point[v]
        upper = ordered[int(0.975 * (len(ordered) - 1))] if ordered else point[v]
        table.append(Standing(v, point[v], lower, upper, *record[v]))
    table.sort(key=lambda s: -s.rating)
    return {
        "object": "leaderboard",
        "model": "Bradley-Terry with a first-position effect; ties and both_bad count half to each side",
        "scale": f"Elo (400 points = 10:1 odds), {anchor or 'the mean'} at 1000",
        "votes": len(votes),
        "bootstrap": bootstrap,
        "position_effect": round(1 / (1 + math.exp(-h)), 4),
        "variants": [dict(rank=i + 1, **s.as_dict()) for i, s in enumerate(table)],
    }


def _records(votes: Iterable[Vote]) -> dict[str, tuple[int, float, float, int]]:
    """(votes, wins, losses, ties) of each variant; a tie counts in `ties` only."""
    out: dict[str, list[float]] = {}
    for a, b, score in votes:
        for name, s in ((a, score), (b, 1 - score)):
            entry = out.setdefault(name, [0, 0, 0, 0])
            entry[0] += 1
            if s == 0.5:
                entry[3] += 1
            elif s == 1:
                entry[1] += 1
            else:
                entry[2] += 1
    return {k: (int(v[0]), v[1], v[2], int(v[3])) for k, v in out.items()}


SCORES = {"0": 1.0, "1": 0.0, "tie": 0.5, "both_bad": 0.5}


def stored_votes(session: Session) -> list[Vote]:
    """Every pairwise vote on a pair of two different variants, as (shown as A, shown as B, score of A)."""
    query = (
        select(Completion.adapter_a, Completion.adapter_b, Feedback.preference)
        .join(Completion, Feedback.completion_id == Completion.id)
        .where(
            Feedback.kind == "pairwise", Completion.adapter_b.is_not(None), Completion.adapter_a != Completion.adapter_b
        )
    )
    return [(a, b, SCORES[p]) for a, b, p in session.execute(query) if b is not None and p in SCORES]


def from_store(session: Session, *, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """The leaderboard of the store's votes; the base model is the variant that is not a registered adapter."""
    from trainer import registry

    votes = stored_votes(session)
    adapters = {a.name for a in registry.listing(session)}
    base = next((v for a, b, _ in votes for v in (a, b) if v not in adapters), None)
    board = leaderboard(votes, base=base, bootstrap=bootstrap, seed=seed)
    for row in board["variants"]:
        row["kind"] = "adapter" if row["name"] in adapters else "base"
    return board
