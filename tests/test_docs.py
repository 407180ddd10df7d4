"""The README's configuration table names every setting the code reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from feedback.settings import FeedbackSettings
from serving.settings import ServingSettings
from trainer.settings import TrainConfig, TrainerSettings
from workers.settings import WorkerSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("settings", [ServingSettings, FeedbackSettings, WorkerSettings, TrainerSettings])
def test_every_setting_is_documented(settings: type[BaseSettings]) -> None:
    missing = [
        f"PAIRLOOP_{name.upper()}" for name in settings.model_fields if f"`PAIRLOOP_{name.upper()}`" not in README
    ]
    assert not missing, f"README.md's configuration table lacks {missing}"


def test_every_hyperparameter_is_documented() -> None:
    learning = (Path(__file__).resolve().parent.parent / "docs" / "LEARNING.md").read_text()
    missing = [name for name in TrainConfig.help() if f"`{name}`" not in learning]
    assert not missing, f"docs/LEARNING.md's hyperparameter table lacks {missing}"
