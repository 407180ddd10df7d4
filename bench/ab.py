"""Monte Carlo of the live A/B rule as the service runs it (`trainer.ab.decide`), beside the rule it replaced.

    .venv/bin/python bench/ab.py [--runs 20000] [--seed 0] [--min-votes 30] [--max-votes 300] [--alpha 0.05]

Each run is one challenger on trial: decisive votes arrive one at a time, each a win with the challenger's true
win rate; the rule is evaluated after every vote (or every `k`), as the cron check may, until it decides or
`max_votes` is reached. With a true win rate of 0.5 every promotion is a false one. Printed: the share promoted
(with its standard error), the share retired, and the median number of votes to a decision.

The old rule promoted once the 95% Wilson interval's lower bound passed 0.5, and retired once its upper bound fell
below 0.5: re-checked at every look, its false-promotion rate is far above the 2.5% a one-sided bound suggests.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.ab import decide, wilson

Rule = Callable[[int, int], str]


def new_rule(min_votes: int, max_votes: int, alpha: float) -> Rule:
    def rule(wins: int, losses: int) -> str:
        return decide(wins, losses, min_votes, alpha, max_votes).decision

    return rule


def old_rule(min_votes: int, max_votes: int, confidence: float = 0.95) -> Rule:
    """The Wilson rule of the first spec, as it was in trainer/ab.py (workers/promotion.py before it)."""

    def rule(wins: int, losses: int) -> str:
        n = wins + losses
        lower, upper = wilson(wins, n, confidence)
        if lower > 0.5 and n >= min_votes:
            return "promote"
        if upper < 0.5 or n >= max_votes:
            return "retire"
        return "wait"

    return rule


def trial(rule: Rule, p: float, every: int, max_votes: int, rng: random.Random) -> tuple[str, int]:
    """One challenger's trial: (decision, votes when it was made)."""
    wins = losses = 0
    for n in range(1, max_votes + 1):
        if rng.random() < p:
            wins += 1
        else:
            losses += 1
        if n % every == 0 or n == max_votes:
            decision = rule(wins, losses)
            if decision != "wait":
                return decision, n
    return "wait", max_votes


def measure(rule: Rule, p: float, every: int, max_votes: int, runs: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    outcomes = [trial(rule, p, every, max_votes, rng) for _ in range(runs)]
    promoted = sum(d == "promote" for d, _ in outcomes) / runs
    return {
        "promoted": promoted,
        "se": math.sqrt(promoted * (1 - promoted) / runs),
        "retired": sum(d == "retire" for d, _ in outcomes) / runs,
        "median_votes": statistics.median(n for _, n in outcomes),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-votes", type=int, default=30)
    parser.add_argument("--max-votes", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args(argv)
    rules = {
        f"mSPRT, alpha {args.alpha}": new_rule(args.min_votes, args.max_votes, args.alpha),
        "old: Wilson 95% at every look": old_rule(args.min_votes, args.max_votes),
    }
    print(
        f"{args.runs} seeded runs each (seed {args.seed}), min {args.min_votes} and max {args.max_votes} votes; "
        "decisive votes only (ties and both-bad do not count)"
    )
    print(f"{'rule':<32} {'true p':>6} {'looks':>7} {'promoted':>15} {'retired':>8} {'median votes':>12}")
    started = time.perf_counter()
    for name, rule in rules.items():
        for p, every in ((0.5, 1), (0.5, 10), (0.6, 1), (0.7, 1), (0.8, 1)):
            m = measure(rule, p, every, args.max_votes, args.runs, args.seed)
            looks = "every" if every == 1 else f"each {every}"
            promoted = f"{m['promoted']:.4f} ± {m['se']:.4f}"
            print(f"{name:<32} {p:>6} {looks:>7} {promoted:>15} {m['retired']:>8.4f} {m['median_votes']:>12.0f}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
