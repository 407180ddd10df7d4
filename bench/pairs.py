"""What does a pair cost, and what does the gateway add? Measured side by side in one run.

    .venv/bin/python bench/pairs.py [--rounds 60] [--max-tokens 12] [--model DIR]   (make bench)

Starts vLLM (CPU or GPU build, whichever is installed) on the tiny model and `pairloop up` in front of it,
then, round by round and in rotating order, sends the same prompt as:
  direct-2   n=2 straight to vLLM (the gateway's own upstream request)
  gateway-2  n=2 through the gateway
  gateway-1  n=1 through the gateway
All three use the same seed, so vLLM generates the same tokens for direct-2 and gateway-2, and a
`max_tokens` below the typical answer length, so nearly every choice stops at that length (the share is
printed). Absolute times drift on a shared machine; the ratios of medians from one run are what to compare.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway import engine_and_gateway  # noqa: E402
from serving.settings import default_data_dir  # noqa: E402
from trainer.tiny import corpus  # noqa: E402
from trainer.tiny.build import default_model_dir, ensure_built  # noqa: E402

NAME = "pairloop-tiny"


def pick_model(arg: str | None) -> str:
    if arg:
        return arg
    cached = default_model_dir(ROOT / ".cache")  # the tests' build, if there is one
    return str(
        cached if (cached / "pairloop-build.json").exists() else ensure_built(default_model_dir(default_data_dir()))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--model", default=None, help="model dir or id (default: the tiny model)")
    args = parser.parse_args()

    model = pick_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="pairloop-bench-"))
    with engine_and_gateway(model, tmp, NAME) as (engine, gw_url, key):
        rng = random.Random(0)
        prompts = [corpus.make_prompt(rng) for _ in range(args.rounds)]
        auth = {"Authorization": f"Bearer {key}"}
        times: dict[str, list[float]] = {"direct-2": [], "gateway-2": [], "gateway-1": []}
        finish_length = choices = 0
        with httpx.Client(timeout=120) as client:

            def call(kind: str, prompt: str, seed: int) -> dict:
                n = 1 if kind.endswith("-1") else 2
                body = {
                    "messages": [{"role": "user", "content": prompt}],
                    "n": n,
                    "temperature": 1.0,
                    "max_tokens": args.max_tokens,
                    "seed": seed,
                }
                if kind.startswith("direct"):
                    url, headers, body = f"{engine.url}/v1/chat/completions", {}, {**body, "model": NAME}
                else:
                    url, headers = f"{gw_url}/v1/chat/completions", auth
                start = time.perf_counter()
                r = client.post(url, json=body, headers=headers)
                elapsed = time.perf_counter() - start
                r.raise_for_status()
                times[kind].append(elapsed)
                return r.json()

            for i in range(5):  # warm-up: compile paths, fill caches, open connections
                for kind in times:
                    call(kind, prompts[i], 10_000 + i)
            for kind in times:
                times[kind].clear()
            kinds = list(times)
            for i, prompt in enumerate(prompts):
                order = kinds[i % 3 :] + kinds[: i % 3]
                for kind in order:
                    data = call(kind, prompt, seed=i)
                    if kind == "gateway-2":
                        choices += len(data["choices"])
                        finish_length += sum(c["finish_reason"] == "length" for c in data["choices"])
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        overhead = [g - d for g, d in zip(times["gateway-2"], times["direct-2"], strict=True)]
        over_ms = statistics.median(overhead) * 1000
        print(
            f"\nmodel {model}, {args.rounds} rounds, max_tokens {args.max_tokens}, "
            f"{finish_length}/{choices} pair choices stopped at max_tokens\n"
        )
        print(f"{'request':<12}{'median ms':>12}")
        for k, v in med.items():
            print(f"{k:<12}{v:>12.1f}")
        ratio = med["gateway-2"] / med["gateway-1"]
        print(f"\npair / single through the gateway (median gateway-2 / gateway-1): {ratio:.2f}")
        print(
            f"gateway added latency, median of per-round differences:     {over_ms:.2f} ms "
            f"({over_ms / med['gateway-2'] * 100:.1f}% of the gateway's median end-to-end)"
        )
        diff = med["gateway-2"] - med["direct-2"]
        print(
            f"gateway added latency, difference of the medians:           {diff:.2f} ms ({diff / med['gateway-2']:.1%})"
        )


if __name__ == "__main__":
    main()
