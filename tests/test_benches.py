"""Every script in bench/ starts and parses its options: an import that broke (a module moved, a helper renamed)
fails here, not in front of the next person who measures. What they measure is in docs/PERFORMANCE.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in ("__init__.py", "gateway.py"))
"""gateway.py is the helpers the others share (they import it)."""


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_bench_starts_and_parses_its_options(script: str) -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120, cwd=BENCH.parent
    )
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
