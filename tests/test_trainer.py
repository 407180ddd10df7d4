"""A training round on the tiny model: LoRA weights move, base weights stay bit-identical, the loss is finite,
the adapter is written under an immutable name with its metadata (the gate's and the split's rules:
test_logic.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from trainer.data import RoundData
from trainer.round import CANDIDATE, load_model, run_round, train
from trainer.settings import TrainConfig, TrainerSettings

pytestmark = pytest.mark.slow


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """Pairs that prefer a polite answer to a curt one (a rule the tiny model's corpus contains)."""
    out = []
    for i in range(start, start + n):
        out.append(
            {
                "prompt": [{"role": "user", "content": f"What is tea number {i}?"}],
                "chosen": [
                    {"role": "assistant", "content": "Thank you for asking! Tea is a warm drink. Hope it helps."}
                ],
                "rejected": [{"role": "assistant", "content": "Tea is a drink."}],
                "completion_id": f"c{i}",
                "feedback_id": f"f{i}",
                "judge": f"key:user{i}",
            }
        )
    return out


def settings(tmp: Path, tiny_model: Path, **train: Any) -> TrainerSettings:
    config = TrainConfig(learning_rate=5e-4, epochs=2, batch_size=8, **train)
    return TrainerSettings(data_dir=tmp, model=str(tiny_model), train=config, gate_length_prompts=4)


@pytest.mark.parametrize("sft_weight", [0.0, 1.0])
def test_a_round_changes_lora_weights_only(tiny_model: Path, tmp_path: Path, sft_weight: float) -> None:
    import torch

    s = settings(tmp_path, tiny_model, sft_weight=sft_weight)
    data = RoundData("dpo", rows(32), rows(8, 100), 32, 0, 0, None)
    model, tokenizer = load_model(str(tiny_model), None, s)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    figures = train(model, tokenizer, data, s, tmp_path / "run")

    assert math.isfinite(figures["loss"]) and figures["steps"] == 8
    assert figures["last_loss"] < figures["first_loss"]
    # DPO starts at ln 2 (the adapter starts as a no-op); the NLL term of the chosen answers comes on top
    assert (figures["first_loss"] > math.log(2) + 0.2) == (sft_weight > 0), figures
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n and f".{CANDIDATE}." in n]
    assert lora and any(not torch.equal(before[n], after[n]) for n in lora), "LoRA weights did not change"
    base = [n for n in before if "lora_" not in n]
    assert base and all(torch.equal(before[n], after[n]) for n in base), "a base weight changed"
    assert "ref" not in model.peft_config, "the reference must be the base model, not a copy of the adapter"


def test_a_round_writes_a_named_adapter_that_continues_the_champion(tiny_model: Path, tmp_path: Path) -> None:
    s = settings(tmp_path, tiny_model)
    data = RoundData("dpo", rows(32), rows(8, 100), 32, 0, 0, None)
    first = run_round(data, None, 1, s)
    assert first.name.startswith("pl-v0001-") and len(first.name) == len("pl-v0001-") + 8
    assert first.path == tmp_path / "adapters" / first.name
    assert {"adapter_config.json", "adapter_model.safetensors", "metadata.json"} <= {
        p.name for p in first.path.iterdir()
    }
    meta = json.loads((first.path / "metadata.json").read_text())
    assert meta["parent"] is None and meta["example_ids"] == sorted(f"f{i}" for i in range(32))
    assert {"trl", "peft", "transformers"} <= set(meta["versions"]) and meta["finished_at"] >= meta["started_at"]
    assert first.decision.passed, first.decision.reasons
    assert first.decision.candidate.accuracy > first.decision.champion.accuracy == 0.0

    second = run_round(data, (first.name, first.path), 2, s)
    # continued from the champion: the held-out margin starts where the first round left it and grows
    assert second.decision.champion.margin == pytest.approx(first.decision.candidate.margin, rel=1e-3)
    assert second.decision.candidate.margin > second.decision.champion.margin
    assert json.loads((second.path / "metadata.json").read_text())["parent"] == first.name
    assert not list((tmp_path / "adapters").glob(".round-*")), "the round left its work directory behind"


def test_a_non_finite_loss_is_rejected_but_kept(tiny_model: Path, tmp_path: Path) -> None:
    s = settings(tmp_path, tiny_model).model_copy(update={"inject_failure": "nan"})
    result = run_round(RoundData("dpo", rows(16), rows(4, 100), 16, 0, 0, None), None, 1, s)
    assert not result.decision.passed and "not finite" in result.decision.reasons[0]
    assert result.path.is_dir()


def test_a_kto_round_on_thumbs(tiny_model: Path, tmp_path: Path) -> None:
    """Unpaired thumbs train with KTO; the gate scores the sign of the implicit reward against the label."""
    thumbs = []
    for r in rows(24):
        for key, label in (("chosen", True), ("rejected", False)):
            thumbs.append({**r, "completion": r[key], "label": label, "feedback_id": f"{r['feedback_id']}{key[0]}"})
    held = [t for t in thumbs if t["completion_id"] in {"c20", "c21", "c22", "c23"}]
    train_rows = [t for t in thumbs if t not in held]
    result = run_round(
        RoundData("kto", train_rows, held, len(train_rows), 0, 0, None), None, 1, settings(tmp_path, tiny_model)
    )
    assert math.isfinite(result.metrics["loss"]) and result.metrics["method"] == "kto"
    assert result.decision.candidate.margin > 0, result.decision.as_dict()
