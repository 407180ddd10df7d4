"""Helpers of the learning-loop tests: adapters made without training, the routing record, admin calls."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from serving.adapters.routing import BACKENDS_KEY, ROUTING_KEY
from tests.feedback_helpers import auth
from trainer import registry


def make_adapter(tiny_model: Path, store_url: str, root: Path, version: int, seed: int) -> str:
    """A LoRA adapter with random (not zero) weights, saved and registered as a candidate; its name.

    Random B matrices change the model's output, so which adapter served a request shows in the text too.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    staging = root / f".staging-{version}"
    peft_model.save_pretrained(str(staging))
    digest = hashlib.sha256((staging / "adapter_model.safetensors").read_bytes()).hexdigest()
    name = registry.adapter_name(version, digest)
    final = root / name
    staging.rename(final)
    engine = create_engine(store_url)
    with Session(engine) as session:
        session.add(
            registry.Adapter(
                name=name,
                version=version,
                status="candidate",
                path=str(final),
                method="dpo",
                metrics={},
                created_at=registry.now(),
                updated_at=registry.now(),
            )
        )
        session.commit()
    engine.dispose()
    return name


def clear_routing(redis_url: str) -> None:
    """Back to the base model for every gateway (the session's vLLM engine is shared by all tests)."""
    client = redis.Redis.from_url(redis_url)
    client.delete(ROUTING_KEY, BACKENDS_KEY)
    client.close()


def wait_for_backends(redis_url: str, timeout_s: float = 30.0) -> None:
    """Until a gateway has listed its vLLM backends in Redis (it does once a second): swaps made outside the
    gateway (the training worker, the CLI) go through them."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while not client.zrangebyscore(BACKENDS_KEY, time.time() - 15, "+inf"):
            assert time.monotonic() < deadline, "no gateway registered its vLLM backends"
            time.sleep(0.1)
    finally:
        client.close()


def admin(base: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{base}{path}", headers=auth("full"), timeout=120, **kw)


def statuses(store_url: str) -> dict[str, str]:
    engine = create_engine(store_url)
    with Session(engine) as session:
        out = {a.name: a.status for a in registry.listing(session)}
    engine.dispose()
    return out
