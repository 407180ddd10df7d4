"""`pairloop up` in front of a given upstream, for the benchmarks: started, awaited, and its dev key read; and the
same in front of a vLLM engine of its own."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.local.engine import EngineConfig, EngineProcess  # noqa: E402
from deploy.local.process import free_port  # noqa: E402


def start_gateway(
    vllm_url: str,
    data_dir: Path,
    served_name: str,
    *,
    args: tuple[str, ...] = (),
    env_extra: dict[str, str] | None = None,
    ready_path: str = "/readyz",
) -> tuple[subprocess.Popen[bytes], str, str]:
    """(process, base URL, development API key) of a gateway over `vllm_url` with an embedded Redis in `data_dir`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}
    # Rate limits stay on (their Redis round trip is part of the gateway's cost) but far above the load.
    high = '{"per_s": 1000000, "burst": 1000000}'
    env |= {"PAIRLOOP_CHAT_LIMIT_PER_KEY": high, "PAIRLOOP_CHAT_LIMIT_PER_USER": high}
    env |= {"PAIRLOOP_VLLM_URLS": vllm_url, "PAIRLOOP_SERVED_MODEL_NAME": served_name, **(env_extra or {})}
    cmd = [sys.executable, "-m", "deploy", "up", "--port", str(port), "--data-dir", str(data_dir), *args]
    log = open(data_dir.parent / f"gateway-{port}.log", "wb")  # noqa: SIM115  (the child writes to it)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}{ready_path}").status_code == 200:
                return proc, url, (data_dir / "secrets" / "dev-api-key").read_text().strip()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the gateway did not become ready")


@contextlib.contextmanager
def engine_and_gateway(
    model: str, tmp: Path, served_name: str, *, args: tuple[str, ...] = ()
) -> Iterator[tuple[EngineProcess, str, str]]:
    """vLLM on `model` and `pairloop up` in front of it (data dir `tmp/data`): (engine, gateway URL, development API
    key). Both are stopped at the end."""
    engine = EngineProcess(
        EngineConfig(model=model, served_model_name=served_name, log_path=tmp / "vllm.log", adapter_dirs=[tmp])
    )
    engine.start()
    gateway = None
    try:
        if not engine.wait_ready(300):
            raise SystemExit(f"vLLM did not start; see {tmp / 'vllm.log'}")
        gateway, url, key = start_gateway(engine.url, tmp / "data", served_name, args=args)
        yield engine, url, key
    finally:
        if gateway:
            gateway.terminate()
            gateway.wait(30)
        engine.stop()
