"""Parts of the test environment that `make test` provides: a test that needs a missing one fails.

A person who knows a part is missing on their machine opts out of it by name, for example
`PAIRLOOP_TEST_SKIP=postgres,cluster make test`: the tests that need it are skipped and the run's summary lists
the opt-outs taken. `.ci/run` opts out of nothing.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

PARTS = {
    "postgres": "the machine's PostgreSQL (PAIRLOOP_TEST_POSTGRES_URL)",
    "cluster": "root and unshare, for the cluster test's gateway hosts (a mount namespace each)",
    "kubectl": "kubectl, to render the Kustomize overlays (the dev extra installs it into .venv/bin)",
}
"""Every part a run may opt out of, and what it is."""

VARIABLE = "PAIRLOOP_TEST_SKIP"
MARK = f"opted out ({VARIABLE})"
"""Every opt-out's skip reason starts so: the run's summary counts them by it."""


def opted_out() -> set[str]:
    names = {name.strip() for name in os.environ.get(VARIABLE, "").split(",") if name.strip()}
    unknown = names - PARTS.keys()
    if unknown:
        raise pytest.UsageError(f"{VARIABLE} names unknown parts {sorted(unknown)}; known: {sorted(PARTS)}")
    return names


def missing(part: str, detail: str) -> NoReturn:
    """The test needs `part` and it is not there: skip when the run opted out of it, else fail saying how to."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}")
    if part in opted_out():
        pytest.skip(f"{MARK}: {part}: {detail}")
    pytest.fail(f"{PARTS[part]} is missing: {detail}. Provide it, or opt out: {VARIABLE}={part}", pytrace=False)
