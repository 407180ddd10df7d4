"""The cluster topology of docs/DEPLOY.md under steady chat load: throughput with one vLLM host against two (side by
side in one run, the ratio), time from a promotion to every gateway serving it, and time for an added vLLM host to
serve the champion.

    .venv/bin/python bench/cluster.py [--seconds 20] [--concurrency 4]

Needs root (each gateway gets its own /etc/hosts in a mount namespace), the machine's PostgreSQL, and the dev extra
(SeaweedFS). The adapter promoted is made without training (random LoRA weights), published to the S3 store.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving.adapters.store import AdapterStore, store_ref
from tests.cluster_helpers import SteadyLoad, backends, cluster, vllm_address
from tests.gateway_helpers import KEYS, MODEL_NAME
from tests.postgres import postgres_database
from trainer import registry
from trainer.tiny.build import default_model_dir, ensure_built

AUTH = {"Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}"}


def make_adapter(model: Path, out: Path) -> tuple[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    staging = out / "staging"
    peft_model.save_pretrained(str(staging))
    digest = hashlib.sha256((staging / "adapter_model.safetensors").read_bytes()).hexdigest()
    return registry.adapter_name(1, digest), staging


def throughput(gateways: list[str], seconds: float, concurrency: int) -> float:
    with SteadyLoad(gateways, concurrency=concurrency) as load:
        time.sleep(2.0)  # warm
        start = time.monotonic()
        time.sleep(seconds)
        done = [o for o in load.since(start) if o.status == 200 and o.started + o.elapsed <= start + seconds]
    return len(done) / seconds


def served(gateway: str) -> str:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body["user"] = f"bench-{uuid.uuid4().hex[:8]}"
    resp = httpx.post(f"{gateway}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    resp.raise_for_status()
    return str(resp.json()["pairloop"]["choices"][0]["adapter"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    model = ensure_built(default_model_dir(Path(__file__).resolve().parent.parent / ".cache"))
    root = Path(tempfile.mkdtemp(prefix="pairloop-cluster-"))
    with postgres_database(f"pairloop_bench_{os.getpid()}") as pg_url, cluster(root, model, pg_url) as c:
        v1, v2 = c.add_vllm(1), c.add_vllm(2)
        c.pool = [vllm_address(1)]
        g1, g2 = c.add_gateway(1), c.add_gateway(2)
        gateways = [g1.url, g2.url]
        for g in (g1, g2):
            c.wait_http(g, "/readyz", timeout_s=420)
        for v in (v1, v2):
            c.wait_http(v, "/health", timeout_s=420)
        one = throughput(gateways, args.seconds, args.concurrency)
        c.write_pool([vllm_address(1), vllm_address(2)])
        while not all(sum(b["ready"] for b in backends(g)) == 2 for g in (g1, g2)):
            time.sleep(0.1)
        two = throughput(gateways, args.seconds, args.concurrency)

        name, staging = make_adapter(model, root / "made")
        assert c.s3 is not None
        AdapterStore(c.s3.url, c.s3.options()).publish(name, staging)
        with Session(create_engine(pg_url)) as session:
            now = registry.now()
            session.add(
                registry.Adapter(
                    name=name,
                    version=1,
                    status="candidate",
                    path=store_ref(name),
                    method="dpo",
                    metrics={},
                    created_at=now,
                    updated_at=now,
                )
            )
            session.commit()
        with SteadyLoad(gateways, concurrency=args.concurrency) as load:
            time.sleep(1.0)
            t0 = time.monotonic()
            resp = httpx.post(f"{g1.url}/admin/adapters/{name}/promote", headers=AUTH, timeout=120)
            resp.raise_for_status()
            t_swap = time.monotonic() - t0
            while not all(served(g) == name for g in gateways):
                time.sleep(0.02)
            t_all = time.monotonic() - t0
            t_add0 = time.monotonic()
            v3 = c.add_vllm(3)
            c.write_pool([vllm_address(1), vllm_address(2), vllm_address(3)])
            while not all(any(b["url"] == v3.url and b["ready"] for b in backends(g)) for g in (g1, g2)):
                time.sleep(0.1)
            t_add = time.monotonic() - t_add0
            failed = [o for o in load.outcomes if o.status != 200]
        print(f"chat throughput, {args.concurrency} clients over 2 gateways, {args.seconds:g} s each:")
        print(f"  1 vLLM host: {one:.2f} req/s   2 vLLM hosts: {two:.2f} req/s   ratio {two / one:.2f}")
        print(f"promotion (load+probe on 2 hosts, from S3 via the sidecars): {t_swap:.2f} s;")
        print(f"  from the admin call to both gateways serving it: {t_all:.2f} s")
        print(f"added vLLM host (process start to ready with the champion at both gateways): {t_add:.1f} s")
        print(f"requests that failed during promotion and addition: {len(failed)} of {len(load.outcomes)}")


if __name__ == "__main__":
    main()
