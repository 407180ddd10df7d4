"""What does a hot-swap cost the requests around it? Measured side by side in one run.

    .venv/bin/python bench/swap.py [--windows 12] [--window-s 3] [--concurrency 8] [--model DIR]   (make bench)

Starts vLLM on the tiny model and `pairloop up` in front of it, makes three LoRA adapters (random
weights, no training), and keeps `--concurrency` clients sending chat requests for the whole run. The
run alternates steady windows and swap windows; each swap window starts with a promotion, rotating
through the adapters, alternately made
  admin    by `POST /admin/adapters/{name}/promote` on the gateway (it switches at once), and
  record   by a swap written from outside the gateway (as the training worker does it), which the gateway
           follows within its poll interval (`PAIRLOOP_ADAPTER_POLL_S`, 0.1 s).
Prints, per kind of promotion, the time from the promotion call to the first response (of any client)
served by the new adapter, and how much of it was loading and probing; the p99
latency of the concurrent requests in swap windows against steady windows, and the failed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway import start_gateway  # noqa: E402
from bench.pairs import NAME, pick_model  # noqa: E402
from deploy.local.engine import EngineConfig, EngineProcess  # noqa: E402

BODY = {"model": NAME, "messages": [{"role": "user", "content": "Tell me about tea."}], "max_tokens": 12}


def make_adapters(model: str, data_dir: Path, count: int) -> list[str]:
    """`count` random LoRA adapters, saved under the data dir and registered in its store as candidates."""
    import torch
    from peft import LoraConfig, get_peft_model
    from sqlalchemy.orm import Session
    from transformers import AutoModelForCausalLM

    from feedback.store import make_engine
    from serving.settings import default_database_url
    from trainer import registry

    names = []
    engine = make_engine(default_database_url(data_dir))
    for version in range(1, count + 1):
        torch.manual_seed(version)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        staging = data_dir / "adapters" / f".staging-{version}"
        peft_model.save_pretrained(str(staging))
        name = registry.adapter_name(
            version, hashlib.sha256((staging / "adapter_model.safetensors").read_bytes()).hexdigest()
        )
        staging.rename(staging.with_name(name))
        with Session(engine) as session:
            now = registry.now()
            session.add(
                registry.Adapter(
                    name=name,
                    version=version,
                    status="candidate",
                    path=str(staging.with_name(name)),
                    method="dpo",
                    metrics={},
                    created_at=now,
                    updated_at=now,
                )
            )
            session.commit()
        names.append(name)
    engine.dispose()
    return names


def served(data: dict[str, Any]) -> str:
    return str(data["pairloop"]["choices"][0]["adapter"])


async def record_swap(redis_url: str, name: str, path: str) -> float:
    """The training worker's way: load and probe through the registered backends, then write the record."""
    from redis.asyncio import Redis

    from serving.adapters.routing import promoting, registered_backends, swap
    from serving.adapters.vllm_admin import VllmAdmin

    async with Redis.from_url(redis_url) as client, httpx.AsyncClient() as http:
        result = await swap(client, VllmAdmin(http), await registered_backends(client), promoting(name, path))
    return result.load_s


async def run(
    base: str,
    key: str,
    redis_url: str,
    names: list[str],
    paths: dict[str, str],
    windows: int,
    window_s: float,
    concurrency: int,
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    latencies: dict[str, list[float]] = {"steady": [], "admin": [], "record": []}
    failures: dict[str, int] = {"steady": 0, "admin": 0, "record": 0}
    served_at: list[tuple[float, str]] = []  # (end of a response, its adapter), for every response
    window = "steady"
    stop = asyncio.Event()

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:

        async def load() -> None:
            while not stop.is_set():
                began = time.perf_counter()
                current = window
                try:
                    r = await client.post("/v1/chat/completions", json=BODY)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    ended = time.perf_counter()
                    latencies[current].append(ended - began)
                    served_at.append((ended, served(r.json())))
                else:
                    failures[current] += 1

        workers = [asyncio.create_task(load()) for _ in range(concurrency)]
        await asyncio.sleep(2)  # warm-up, not counted
        for v in latencies.values():
            v.clear()
        to_served: dict[str, list[float]] = {"admin": [], "record": []}
        load_probe: dict[str, list[float]] = {"admin": [], "record": []}
        for i in range(windows):
            window = "steady"
            await asyncio.sleep(window_s)
            name = names[i % len(names)]
            kind = "admin" if i % 2 == 0 else "record"
            window = kind
            began = time.perf_counter()
            if kind == "admin":
                r = await client.post(f"/admin/adapters/{name}/promote")
                assert r.status_code == 200, r.text
                load_probe[kind].append(r.json()["load_s"])
            else:
                load_probe[kind].append(await record_swap(redis_url, name, paths[name]))
            await asyncio.sleep(max(0.0, window_s - (time.perf_counter() - began)))
            first = min((t for t, adapter in served_at if t >= began and adapter == name), default=None)
            assert first is not None, f"no response by {name} within the window"
            to_served[kind].append(first - began)
        stop.set()
        await asyncio.gather(*workers)

    def p99(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=100)[98] * 1000

    for kind, xs in to_served.items():
        if xs:
            print(
                f"promotion call -> first response by the new adapter ({kind}): "
                f"median {statistics.median(xs) * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms "
                f"over {len(xs)} swaps (goal < 500 ms); of which loading and probing: median "
                f"{statistics.median(load_probe[kind]) * 1000:.0f} ms"
            )
    swaps = latencies["admin"] + latencies["record"]
    steady = p99(latencies["steady"])
    median = statistics.median(latencies["steady"]) * 1000
    print(
        f"latency, {concurrency} concurrent clients: median steady {median:.1f} ms, "
        f"swap windows {statistics.median(swaps) * 1000:.1f} ms"
    )
    print(
        f"p99 latency: steady {steady:.1f} ms ({len(latencies['steady'])} requests), swap windows {p99(swaps):.1f} ms "
        f"({len(swaps)} requests), ratio {p99(swaps) / steady:.2f} (goal <= 1.5); by kind: admin "
        f"{p99(latencies['admin']) / steady:.2f}, record {p99(latencies['record']) / steady:.2f}"
    )
    print(
        f"failed requests: steady {failures['steady']}, swap windows {failures['admin'] + failures['record']} (goal 0)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--window-s", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default=None, help="model dir or id (default: the tiny model)")
    args = parser.parse_args()

    model = pick_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="pairloop-bench-swap-"))
    engine = EngineProcess(
        EngineConfig(model=model, served_model_name=NAME, log_path=tmp / "vllm.log", adapter_dirs=[tmp])
    )
    engine.start()
    gateway = None
    try:
        if not engine.wait_ready(600):
            raise SystemExit(f"vLLM did not start; see {tmp / 'vllm.log'}")
        data_dir = tmp / "data"
        gateway, base, key = start_gateway(engine.url, data_dir, NAME, args=("--workers", "0", "--no-training"))
        names = make_adapters(model, data_dir, 3)
        paths = {n: str(data_dir / "adapters" / n) for n in names}
        redis_url = (data_dir / "run" / "redis-url").read_text().strip()
        time.sleep(1.5)  # the gateway lists its backend in Redis once a second
        asyncio.run(run(base, key, redis_url, names, paths, args.windows, args.window_s, args.concurrency))
    finally:
        if gateway:
            gateway.terminate()
            try:
                gateway.wait(60)
            except subprocess.TimeoutExpired:
                print("the gateway did not stop within 60 s of SIGTERM; killed it", file=sys.stderr)
                gateway.kill()
        engine.stop()


if __name__ == "__main__":
    main()
