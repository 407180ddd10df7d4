"""Settings of the feedback queue and its workers. Environment prefix `PAIRLOOP_`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from serving.settings import default_data_dir


class WorkerSettings(BaseSettings):
    """How events are queued (by the API) and drained (by `pairloop worker`)."""

    model_config = SettingsConfigDict(env_prefix="PAIRLOOP_", extra="ignore")

    redis_url: str | None = Field(None, description="Redis of the queue; unset: the one `pairloop up` runs.")
    data_dir: Path = Field(default_factory=default_data_dir, description="Models, secrets, logs, databases.")
    database_url: str | None = Field(None, description="The preference store; unset: SQLite in the data dir.")
    queue_name: str = Field("pairloop-feedback", pattern=r"^[A-Za-z0-9_.-]+$", description="RQ queue of events.")
    job_timeout_s: int = Field(30, ge=1, description="Longest run of one job before RQ stops it and retries.")
    job_retry_intervals_s: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [0, 5, 30, 120, 600],
        description="Comma-separated waits before each retry of a failed job (the first at once: its worker may "
        "have died), then it stays in the failed registry.",
    )
    job_abandoned_after_s: int = Field(
        10,
        ge=1,
        description="Seconds after its timeout that a job whose worker died (SIGKILL, power loss) is run again.",
    )
    maintenance_interval_s: int = Field(
        15, ge=1, description="How often a worker looks for abandoned jobs and due retries."
    )

    def store_url(self) -> str:
        from feedback.settings import default_database_url

        return self.database_url or default_database_url(self.data_dir)

    @field_validator("job_retry_intervals_s", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(v) for v in value.split(",") if v.strip()]
        return value
