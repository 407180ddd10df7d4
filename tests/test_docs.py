"""The README's configuration table names every setting the code reads."""

from __future__ import annotations

from pathlib import Path

from serving.settings import ServingSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [
        f"PAIRLOOP_{name.upper()}"
        for name in ServingSettings.model_fields
        if f"`PAIRLOOP_{name.upper()}`" not in README
    ]
    assert not missing, f"README.md's configuration table lacks {missing}"
