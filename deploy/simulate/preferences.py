"""The declared preferences of simulated users: deterministic judges of two answers.

Each preference compares two answers (`compare`) and names a property whose rate the simulation follows
(`has`). The judges read words the way the tiny model's corpus writes them (`trainer.tiny.corpus.words`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.tiny.corpus import POLITE_MARKERS, words

Kind = Literal["polite", "shorter", "longer", "word"]
KINDS: tuple[Kind, ...] = ("polite", "shorter", "longer", "word")


def is_polite(text: str) -> bool:
    lowered = " ".join(words(text))
    return any(marker in lowered for marker in POLITE_MARKERS)


@dataclass(frozen=True)
class Preference:
    """What a simulated user wants. `threshold` (length preferences) is the word count that separates a
    short answer from a long one; the simulation sets it to the base model's median."""

    kind: Kind
    word: str = "indeed"
    threshold: int = 20

    @property
    def label(self) -> str:
        return {
            "polite": "prefers polite answers",
            "shorter": "prefers shorter answers",
            "longer": "prefers longer answers",
            "word": f"prefers answers containing '{self.word}'",
        }[self.kind]

    @property
    def property_label(self) -> str:
        """What `has` tests, for tables and plots."""
        return {
            "polite": "polite",
            "shorter": f"at most {self.threshold} words",
            "longer": f"more than {self.threshold} words",
            "word": f"contains '{self.word}'",
        }[self.kind]

    def score(self, text: str) -> float:
        n = len(words(text))
        if self.kind == "polite":
            return float(is_polite(text))
        if self.kind == "shorter":
            return -float(n)
        if self.kind == "longer":
            return float(n)
        return float(self.word in words(text))

    def compare(self, a: str, b: str) -> int:
        """1 if `a` is preferred, -1 if `b` is, 0 for a tie."""
        sa, sb = self.score(a), self.score(b)
        return (sa > sb) - (sa < sb)

    def has(self, text: str) -> bool:
        n = len(words(text))
        if self.kind == "shorter":
            return n <= self.threshold
        if self.kind == "longer":
            return n > self.threshold
        return self.score(text) > 0


@dataclass(frozen=True)
class Matchup:
    """Answers of one model against another's to the same prompts, judged by one preference."""

    wins: int
    losses: int
    ties: int

    @classmethod
    def judge(cls, preference: Preference, ours: list[str], theirs: list[str]) -> Matchup:
        results = [preference.compare(a, b) for a, b in zip(ours, theirs, strict=True)]
        return cls(results.count(1), results.count(-1), results.count(0))

    @property
    def win_rate(self) -> float | None:
        """Wins among decisive comparisons (ties left out, as the live A/B test counts them)."""
        decisive = self.wins + self.losses
        return self.wins / decisive if decisive else None

    @property
    def win_rate_ties_half(self) -> float | None:
        """Wins plus half the ties, over all comparisons."""
        n = self.wins + self.losses + self.ties
        return (self.wins + self.ties / 2) / n if n else None
