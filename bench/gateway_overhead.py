"""The gateway's own cost per request, with vLLM replaced by an upstream that answers at once.

    .venv/bin/python bench/gateway_overhead.py [--requests 600]

Starts a minimal ASGI app that returns a canned two-choice completion (standing in for vLLM), `pairloop up` in
front of it (embedded Redis, so the record is really written), and alternates requests straight to the fake
upstream and through the gateway. The difference of the medians is what the gateway adds: auth, validation, the
upstream call, the Redis record, the feedback token and the extra HTTP hop.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway import start_gateway  # noqa: E402
from deploy.local.process import free_port  # noqa: E402

FAKE_UPSTREAM = r"""
import json
COMPLETION = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "pairloop-tiny",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there. Coffee is warm."},
                 "finish_reason": "length"},
                {"index": 1, "message": {"role": "assistant", "content": "Okay. Coffee is bitter."},
                 "finish_reason": "length"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 24, "total_tokens": 33}}).encode()
MODELS = json.dumps({"data": [{"id": "pairloop-tiny", "parent": None}]}).encode()

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = MODELS if scope["path"] == "/v1/models" else COMPLETION
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pairloop-overhead-"))
    (tmp / "fake_upstream.py").write_text(FAKE_UPSTREAM)
    up_port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "fake_upstream:app", "--port", str(up_port), "--log-level", "warning"],
        cwd=tmp,
    )
    gateway = None
    try:
        gateway, gw_url, key = start_gateway(f"http://127.0.0.1:{up_port}", tmp / "data", "pairloop-tiny")
        body = {"messages": [{"role": "user", "content": "Tell me about coffee."}], "max_tokens": 12, "seed": 1}
        targets = {
            "direct": (f"http://127.0.0.1:{up_port}/v1/chat/completions", {}),
            "gateway": (f"{gw_url}/v1/chat/completions", {"Authorization": f"Bearer {key}"}),
        }
        times: dict[str, list[float]] = {k: [] for k in targets}
        with httpx.Client() as client:
            for i in range(args.requests + 50):
                for name, (url, headers) in targets.items():
                    start = time.perf_counter()
                    client.post(url, json=body, headers=headers).raise_for_status()
                    if i >= 50:  # the first 50 rounds warm up
                        times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        print(
            f"{args.requests} requests each, median: straight to the fake upstream {med['direct']:.2f} ms, "
            f"through the gateway {med['gateway']:.2f} ms"
        )
        print(f"the gateway's own time per request: {med['gateway'] - med['direct']:.2f} ms")
    finally:
        if gateway:
            gateway.terminate()
            gateway.wait(30)
        fake.terminate()
        fake.wait(30)


if __name__ == "__main__":
    main()
