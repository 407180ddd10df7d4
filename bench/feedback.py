"""Feedback intake: acknowledged events per second and latency, against a bare JSON echo as the ceiling.

    .venv/bin/python bench/feedback.py [--events 4000] [--concurrency 32] [--rounds 3]

Starts `pairloop up --workers 0` (embedded Valkey with AOF `always`, WAITAOF before each 202, SQLite
store; no vLLM: the completions are written into Redis the way the gateway records them) and a bare FastAPI
app under uvicorn that echoes a JSON body. Then, in alternating rounds with the same client and
concurrency, it posts feedback to the gateway and the same bodies to the echo. Last, a `pairloop worker`
drains the queue into the store, and the drain rate is timed. Everything runs on this machine's cores, the
load generator included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway import start_gateway  # noqa: E402
from deploy.local.process import free_port  # noqa: E402
from tests.feedback_helpers import seed_completions  # noqa: E402

ECHO_APP = """
from fastapi import FastAPI, Request
from fastapi.responses import Response
app = FastAPI()

@app.post("/echo")
async def echo(request: Request) -> Response:
    return Response(await request.body(), status_code=202, media_type="application/json")
"""
NO_LIMIT = json.dumps({"per_s": 0, "burst": 1})


def seed(redis_url: str, secret: str, n: int) -> list[dict[str, Any]]:
    """`n` completion records as the gateway writes them (the tests' helper), and a pairwise vote body for each."""
    served = seed_completions(redis_url, n, key_id="dev", users=50, secret=secret, ttl_s=86400)
    return [
        {
            "completion_id": c["id"],
            "feedback_token": c["pairloop"]["feedback_token"],
            "feedback_id": str(uuid.uuid4()),
            "kind": "pairwise",
            "preference": i % 2,
        }
        for i, c in enumerate(served)
    ]


async def load(url: str, key: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    """Post every body with `concurrency` requests in flight; throughput and latency percentiles."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = list(reversed(bodies))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def client() -> None:
            while queue:
                payload = json.dumps(queue.pop()).encode()
                start = time.perf_counter()
                async with session.post(url, data=payload) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if set(statuses) != {202}:
        raise SystemExit(f"unexpected statuses from {url}: {statuses}")
    latencies.sort()
    return {
        "rps": len(bodies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=4000, help="feedback events per round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating echo/feedback rounds")
    parser.add_argument("--appendfsync", choices=["always", "everysec"], default="always", help="embedded Redis")
    parser.add_argument("--no-drain", action="store_true", help="skip the worker's drain rate")
    parser.add_argument("--durability", choices=["aof", "none"], default="aof", help="PAIRLOOP_FEEDBACK_DURABILITY")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pairloop-bench-") as tmp:
        data_dir = Path(tmp)
        echo_port = free_port()
        (data_dir / "echo_app.py").write_text(ECHO_APP)
        echo = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "echo_app:app", "--port", str(echo_port), "--log-level", "warning"],
            cwd=data_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env = {f"PAIRLOOP_{k}_LIMIT_PER_{w}": NO_LIMIT for k in ("CHAT", "FEEDBACK") for w in ("KEY", "USER")}
        env |= {"PAIRLOOP_REDIS_APPENDFSYNC": args.appendfsync, "PAIRLOOP_FEEDBACK_DURABILITY": args.durability}
        gateway, url, key = start_gateway(
            "http://127.0.0.1:9",
            data_dir,
            "pairloop-tiny",
            args=("--workers", "0"),
            env_extra=env,
            ready_path="/healthz",
        )
        try:
            for _ in range(100):
                try:
                    httpx.post(f"http://127.0.0.1:{echo_port}/echo", json={})
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            redis_url = (data_dir / "run" / "redis-url").read_text().strip()
            secret = (data_dir / "secrets" / "token-secret").read_text().strip()
            bodies = seed(redis_url, secret, args.events * args.rounds + 200)
            # Warm-up: connections, the gateway's thread pool, the echo's imports.
            asyncio.run(load(f"{url}/v1/feedback", key, bodies[-200:], args.concurrency))
            asyncio.run(load(f"http://127.0.0.1:{echo_port}/echo", key, bodies[-200:], args.concurrency))
            results: dict[str, list[dict[str, float]]] = {"feedback": [], "echo": []}
            for r in range(args.rounds):
                chunk = bodies[r * args.events : (r + 1) * args.events]
                results["echo"].append(
                    asyncio.run(load(f"http://127.0.0.1:{echo_port}/echo", key, chunk, args.concurrency))
                )
                results["feedback"].append(asyncio.run(load(f"{url}/v1/feedback", key, chunk, args.concurrency)))

            acked = args.events * args.rounds + 200
            drain = None if args.no_drain else drain_rate(redis_url, data_dir, acked)
        finally:
            gateway.terminate()
            echo.terminate()
            gateway.wait(30)
            echo.wait(30)

    print(
        f"feedback intake, {args.rounds} alternating rounds of {args.events} events, concurrency {args.concurrency}, "
        f"appendfsync {args.appendfsync}, durability {args.durability}"
    )
    print(
        f"{'round':>5} {'echo rps':>9} {'fb rps':>8} {'ratio':>6} {'echo p50':>9} {'echo p99':>9} {'fb p50':>7} "
        f"{'fb p99':>7}"
    )
    for r in range(args.rounds):
        e, f = results["echo"][r], results["feedback"][r]
        print(
            f"{r + 1:>5} {e['rps']:>9.0f} {f['rps']:>8.0f} {f['rps'] / e['rps']:>6.2f} "
            f"{e['p50_ms']:>7.1f}ms {e['p99_ms']:>7.1f}ms {f['p50_ms']:>5.1f}ms {f['p99_ms']:>5.1f}ms"
        )
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("rps", "p50_ms", "p99_ms")} for k, v in results.items()}
    print(
        f"median: feedback {med['feedback']['rps']:.0f} acknowledged events/s (p50 {med['feedback']['p50_ms']:.1f} ms, "
        f"p99 {med['feedback']['p99_ms']:.1f} ms); echo ceiling {med['echo']['rps']:.0f} rps; "
        f"ratio {med['feedback']['rps'] / med['echo']['rps']:.2f}"
    )
    if drain is not None:
        print(f"drain: one worker stored {acked} events in {drain:.1f} s: {acked / drain:.0f} events/s (SQLite)")


def drain_rate(redis_url: str, data_dir: Path, expected: int) -> float:
    """Seconds for one `pairloop worker` to store `expected` queued events (from its start)."""
    from sqlalchemy import create_engine, func, select

    from feedback.store import Feedback

    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}
    env |= {"PAIRLOOP_REDIS_URL": redis_url, "PAIRLOOP_DATA_DIR": str(data_dir)}
    engine = create_engine(f"sqlite:///{data_dir / 'pairloop.db'}")
    start = time.perf_counter()
    worker = subprocess.Popen(
        [sys.executable, "-m", "deploy", "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while True:
            with engine.connect() as conn:
                if (conn.scalar(select(func.count()).select_from(Feedback)) or 0) >= expected:
                    return time.perf_counter() - start
            if worker.poll() is not None:
                raise SystemExit("the worker exited early")
            time.sleep(0.25)
    finally:
        worker.terminate()
        worker.wait(30)
        engine.dispose()


if __name__ == "__main__":
    main()
