"""Settings of the workers that drain the feedback queue. Environment prefix `PAIRLOOP_`."""

from __future__ import annotations

from pydantic import Field

from feedback.settings import QueueSettings


class WorkerSettings(QueueSettings):
    """How `pairloop worker` drains the feedback queue (the queue itself: `feedback.settings.QueueSettings`)."""

    job_abandoned_after_s: int = Field(
        10,
        ge=1,
        description="Seconds after its timeout that a job whose worker died (SIGKILL, power loss) is run again.",
    )
    maintenance_interval_s: int = Field(
        15, ge=1, description="How often a worker looks for abandoned jobs and due retries."
    )
