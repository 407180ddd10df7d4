"""Errors of the learning loop."""

from __future__ import annotations


class TrainerError(Exception):
    """Base of the trainer's errors; `message` is meant for the operator."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RoundFailed(TrainerError):
    """A round made no adapter (a crash, an injected failure, no data); the champion stays."""


class RoundOverBudget(RoundFailed):
    """A round ran past its wall-clock budget (`round_budget_s`) and stopped; no adapter, the champion stays."""


class RoundBusy(TrainerError):
    """Another round holds the lock."""
