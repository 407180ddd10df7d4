"""Settings of the feedback API and its queue. Environment prefix `PAIRLOOP_` (the base: serving/settings.py).

`QueueSettings` is what both ends of the queue read (the gateway's feedback API puts jobs on it, `pairloop worker`
takes them: workers/settings.py extends it); `FeedbackSettings` adds what only the API reads.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from serving.settings import PairloopSettings

Durability = Literal["aof", "none"]


class QueueSettings(PairloopSettings):
    """The feedback queue: its name and how its jobs run, fail and are retried."""

    queue_name: str = Field("pairloop-feedback", pattern=r"^[A-Za-z0-9_.-]+$", description="RQ queue of events.")
    job_timeout_s: int = Field(30, ge=1, description="Longest run of one job before RQ stops it and retries.")
    job_failure_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=3600,
        description="How long a job that failed its every retry stays in RQ's failed registry (`pairloop queue "
        "retry-failed` runs it again), carrying its completion's record.",
    )
    job_retry_intervals_s: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [0, 5, 30, 120, 600],
        description="Comma-separated waits before each retry of a failed job (the first at once: its worker may "
        "have died), then it stays in the failed registry.",
    )

    @field_validator("job_retry_intervals_s", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(v) for v in value.split(",") if v.strip()]
        return value


class FeedbackSettings(QueueSettings):
    """What the feedback endpoint accepts and how it makes events durable, besides the queue it puts them on."""

    feedback_durability: Durability = Field(
        "aof",
        description="`aof`: answer 202 only after `WAITAOF` confirms the queued event is fsynced (Redis >= 7.2 or "
        "Valkey with AOF on); `none`: once Redis holds it in memory (see docs/FEEDBACK.md for what that can lose).",
    )
    feedback_waitaof_timeout_ms: int = Field(2000, ge=1, description="Longest wait for the AOF fsync before a 503.")
    feedback_allow_edits: bool = Field(False, description="Accept `edit` feedback: a user-written corrected answer.")
    feedback_max_edit_chars: int = Field(8000, ge=1, le=100_000, description="Longest accepted edit text.")
    feedback_max_comment_chars: int = Field(2000, ge=0, le=20_000, description="Longest accepted comment.")
    feedback_record_hold_s: int = Field(
        24 * 3600,
        ge=60,
        description="At least how long a completion's record stays in Redis after a vote on it is queued, so that "
        "a worker finds it after a wait in the queue (a job carries the event, not a second copy of the record).",
    )
