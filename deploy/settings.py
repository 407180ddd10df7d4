"""Every `PAIRLOOP_*` variable any part reads, and the start-up check that names the ones nobody reads.

pydantic-settings ignores environment variables it does not know, so a misspelled `PAIRLOOP_AB_MIN_VOTE`
would silently leave the default in force. Every `pairloop` command checks the environment first and warns,
by name, with the closest known name.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping

from pydantic_settings import BaseSettings

from feedback.settings import FeedbackSettings
from serving.settings import ENV_PREFIX, ServingSettings
from trainer.settings import TrainConfig, TrainerSettings
from workers.settings import WorkerSettings

SETTINGS: tuple[type[BaseSettings], ...] = (ServingSettings, FeedbackSettings, WorkerSettings, TrainerSettings)
"""Each part's settings (each extends `serving.settings.PairloopSettings`)."""

TEST_PREFIX = ENV_PREFIX + "TEST_"
"""Read by the test suite only (tests/conftest.py), never by the service."""


def known_variables() -> set[str]:
    """The names of every variable some part reads."""
    names = {f"{ENV_PREFIX}{name.upper()}" for cls in SETTINGS for name in cls.model_fields}
    names |= {f"{ENV_PREFIX}TRAIN__{name.upper()}" for name in TrainConfig.help()}
    return names


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """`PAIRLOOP_*` variables in `environ` (default: this process's) that no part reads, each with the closest
    known name (None when nothing is close)."""
    env = os.environ if environ is None else environ
    known = known_variables()
    out = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in known or name.startswith(TEST_PREFIX):
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        out.append((name, close[0] if close else None))
    return out


def warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per unknown variable, for the operator."""
    return [
        f"warning: {name} is not a pairloop setting and is ignored"
        + (f"; did you mean {close}?" if close else " (README.md, 'Configuration', lists them all)")
        for name, close in unknown_variables(environ)
    ]
