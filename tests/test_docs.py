"""The documented settings are the code's: docs/SETTINGS.md is what the code generates, and the hyperparameters are
in docs/LEARNING.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from deploy.settings import SETTINGS, settings_doc
from trainer.settings import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def test_the_settings_table_is_the_codes() -> None:
    written = (ROOT / "docs" / "SETTINGS.md").read_text()
    assert written == settings_doc(), "docs/SETTINGS.md is stale: run `python -m deploy.settings > docs/SETTINGS.md`"


@pytest.mark.parametrize("settings", SETTINGS)
def test_every_setting_is_in_the_table(settings: type[BaseSettings]) -> None:
    table = settings_doc()
    missing = [
        f"PAIRLOOP_{name.upper()}" for name in settings.model_fields if f"`PAIRLOOP_{name.upper()}`" not in table
    ]
    assert not missing, f"docs/SETTINGS.md lacks {missing}"
    readme = (ROOT / "README.md").read_text()
    assert "docs/SETTINGS.md" in readme


def test_every_hyperparameter_is_documented() -> None:
    learning = (ROOT / "docs" / "LEARNING.md").read_text()
    missing = [name for name in TrainConfig.help() if f"`{name}`" not in learning]
    assert not missing, f"docs/LEARNING.md's hyperparameter table lacks {missing}"
