"""Running `pairloop` as a user does: `python -m deploy ...` in a child process, with no PAIRLOOP_* variable
of the test process leaking into it."""

from __future__ import annotations

import os
import subprocess
import sys


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`pairloop ARGS` with only `env` as its PAIRLOOP_* settings; its output captured."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}
    return subprocess.run(
        [sys.executable, "-m", "deploy", *args], env=base | env, capture_output=True, text=True, timeout=120
    )
