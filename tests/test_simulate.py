"""`pairloop simulate`: the judges of the simulated users (pure), and one real round of the whole loop."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.simulate.preferences import Matchup, Preference
from deploy.simulate.run import prompt_sets

POLITE = "Thank you for your question. Coffee is warm. I hope this helps!"
CURT = "Okay. Coffee is warm and bitter. Many people find coffee warm."


def test_each_preference_judges_by_its_property() -> None:
    assert Preference("polite").compare(POLITE, CURT) == 1 and Preference("polite").compare(CURT, POLITE) == -1
    assert Preference("polite").compare(CURT, CURT) == 0
    assert Preference("shorter").compare("Coffee is warm.", CURT) == 1
    assert Preference("longer").compare("Coffee is warm.", CURT) == -1
    word = Preference("word", word="indeed")
    assert word.compare("Indeed, coffee is warm.", CURT) == 1 and not word.has("Indeedly warm.")
    assert Preference("shorter", threshold=3).has("Coffee is warm.") and not Preference("longer", threshold=3).has(
        "Coffee is warm."
    )


def test_win_rate_leaves_ties_out_and_the_other_counts_them_half() -> None:
    m = Matchup.judge(Preference("polite"), [POLITE, POLITE, CURT, CURT], [CURT, POLITE, POLITE, CURT])
    assert (m.wins, m.losses, m.ties) == (1, 1, 2)
    assert m.win_rate == 0.5 and m.win_rate_ties_half == 0.5
    assert Matchup(3, 1, 4).win_rate == 0.75 and Matchup(3, 1, 4).win_rate_ties_half == 0.625
    assert Matchup(0, 0, 5).win_rate is None


def test_held_out_prompts_are_never_voted_on() -> None:
    voting, held_out = prompt_sets()
    assert len(held_out) == 80 and len(voting) == 320 and not set(voting) & set(held_out)


@pytest.mark.slow
def test_one_round_moves_the_polite_rate_up(tiny_model: Path, tmp_path: Path) -> None:
    """The whole loop on its own `pairloop up`: simulated users vote through the public API, the cron check starts
    a round, the training worker trains and gates it, it is hot-swapped in, and the champion is measured."""
    out = tmp_path / "sim"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}
    cmd = [sys.executable, "-m", "deploy", "simulate", "--prefer", "polite", "--rounds", "1"]
    # the gate alone promotes here (the live A/B test has tests of its own), so that one round is measured
    cmd += ["--examples-per-round", "48", "--ab-fraction", "0", "--time-limit", "600"]
    cmd += ["--data-dir", str(tiny_model.parent.parent), "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "polite" / "results.json").read_text())
    before, after = result["rounds"]
    assert before["champion"] == "base" and after["champion"].startswith("pl-v0001-")
    assert after["training_round"]["status"] == "promoted"
    assert after["property_rate"] > before["property_rate"], result
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "polite" / "results.csv").open() as f:
        assert [row["round"] for row in csv.DictReader(f)] == ["0", "1"]
    assert "win rate" in r.stdout and "champion pl-v0001-" in r.stdout  # one line per round (tqdm.write)
