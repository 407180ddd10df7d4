"""Settings of the feedback API and the preference store. Environment prefix `PAIRLOOP_`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.settings import default_data_dir

Durability = Literal["aof", "none"]


def default_database_url(data_dir: Path) -> str:
    """The embedded default: a SQLite file in the data dir."""
    return f"sqlite:///{data_dir / 'pairloop.db'}"


class FeedbackSettings(BaseSettings):
    """What the feedback endpoint accepts, how it makes events durable, and where the store lives."""

    model_config = SettingsConfigDict(env_prefix="PAIRLOOP_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir, description="Models, secrets, logs, databases.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the preference store (`postgresql+psycopg://…`); unset: SQLite in the data dir.",
    )
    feedback_durability: Durability = Field(
        "aof",
        description="`aof`: answer 202 only after `WAITAOF` confirms the queued event is fsynced (Redis >= 7.2 or "
        "Valkey with AOF on); `none`: once Redis holds it in memory (see docs/FEEDBACK.md for what that can lose).",
    )
    feedback_waitaof_timeout_ms: int = Field(2000, ge=1, description="Longest wait for the AOF fsync before a 503.")
    feedback_allow_edits: bool = Field(False, description="Accept `edit` feedback: a user-written corrected answer.")
    feedback_max_edit_chars: int = Field(8000, ge=1, le=100_000, description="Longest accepted edit text.")
    feedback_max_comment_chars: int = Field(2000, ge=0, le=20_000, description="Longest accepted comment.")

    def store_url(self) -> str:
        return self.database_url or default_database_url(self.data_dir)
