"""An exported DPO file is what TRL expects: `datasets` loads it and `DPOTrainer` takes a step on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from deploy.local.engine import EngineProcess
from feedback.export import export
from tests.feedback_helpers import chat_pair, drain, send, vote
from tests.gateway_helpers import GatewayFactory

pytestmark = pytest.mark.slow


def test_exported_dpo_file_trains_one_step(
    engine: EngineProcess,
    make_gateway: GatewayFactory,
    redis_url: str,
    rdb: redis.Redis,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    gw = make_gateway([engine.url])
    for i in range(4):
        assert send(gw.url, vote(chat_pair(gw.url, user=f"u{i}"), preference=i % 2)).status_code == 202
    store_url = f"sqlite:///{tmp_path / 'pairloop.db'}"
    drain(redis_url, store_url)
    out = tmp_path / "dpo.jsonl"
    db = create_engine(store_url)
    with Session(db) as session:
        assert export(session, "dpo", out, "jsonl").rows == 4
    db.dispose()

    dataset = datasets.load_dataset("json", data_files=str(out), split="train")
    assert dataset.num_rows == 4 and {"prompt", "chosen", "rejected"} <= set(dataset.column_names)

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    result = trainer.train()

    assert trainer.state.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    lora_after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before), "LoRA weights did not change"
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            original = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base_before[original]), f"base weight {name} changed"
