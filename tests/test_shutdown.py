"""`pairloop up` and `pairloop gateway` stop within a bound after SIGTERM, whatever they are doing, and a second
signal stops them at once.

A client that has sent a request's headers but not its body holds uvicorn's graceful shutdown for as long as it
likes (uvicorn's default waits for every connection): PAIRLOOP_SHUTDOWN_TIMEOUT_S bounds it. `pairloop up`
under chat load stops its children too, and leaves none behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from deploy.local.engine import EngineProcess
from deploy.local.process import free_port
from deploy.local.stack import APP_SHUTDOWN_S
from tests.gateway_helpers import KEYS, MODEL_NAME, SECRET, GatewayFactory, keys_json

KEY = KEYS["full"].key.get_secret_value()


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


def _stuck_request(port: int) -> socket.socket:
    """A client that sends a chat request's headers and the start of its body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"model": ')
    return sock


@pytest.fixture
def gateway_process(
    engine: EngineProcess, redis_url: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`pairloop gateway` over the session's vLLM server; (process, port). PAIRLOOP_SHUTDOWN_TIMEOUT_S is 2."""
    port = free_port()
    env = _clean_env() | {
        "PAIRLOOP_DATA_DIR": str(tmp_path),
        "PAIRLOOP_VLLM_URLS": engine.url,
        "PAIRLOOP_REDIS_URL": redis_url,
        "PAIRLOOP_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "PAIRLOOP_SECRET": SECRET,
        "PAIRLOOP_API_KEYS": keys_json(),
        "PAIRLOOP_SERVED_MODEL_NAME": MODEL_NAME,
        "PAIRLOOP_SHUTDOWN_TIMEOUT_S": "2",
    }
    subprocess.run([sys.executable, "-m", "deploy", "db", "upgrade"], env=env, check=True, capture_output=True)
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy", "gateway", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc, 60)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


def _signal_while_stuck(proc: subprocess.Popen[bytes], port: int, signals: int) -> tuple[int, float]:
    """SIGTERM `signals` times, 0.3 s apart, while a client holds a half-sent request: the exit status, and the
    seconds from the last signal to the exit."""
    sock = _stuck_request(port)
    time.sleep(0.5)  # the request reaches the app
    for _ in range(signals - 1):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    took = time.monotonic() - started
    sock.close()
    return code, took


def test_a_gateway_stops_within_its_grace_while_a_client_holds_a_request(
    gateway_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    code, took = _signal_while_stuck(*gateway_process, signals=1)
    assert code == 0
    # 2 s of grace for the stuck request, then at most APP_SHUTDOWN_S for the application's own shutdown
    assert 1.5 <= took < 2 + APP_SHUTDOWN_S + 1, f"stopped {took:.1f} s after SIGTERM"


def test_a_second_signal_stops_a_gateway_at_once(gateway_process: tuple[subprocess.Popen[bytes], int]) -> None:
    code, took = _signal_while_stuck(*gateway_process, signals=2)
    assert code == 130
    assert took < 1.5, f"stopped {took:.1f} s after the second signal (the grace is 2 s)"


def check_private(data_dir: Path, children: list[psutil.Process]) -> None:
    """What `pairloop up` keeps is its own: the data dir is the owner's only, and its vLLM child takes requests
    on /v1/* (the adapter endpoints included) only with the key that the gateway and the trainer hold."""
    assert data_dir.stat().st_mode & 0o077 == 0
    for path in data_dir.rglob("*"):
        assert path.is_symlink() or path.stat().st_mode & 0o077 == 0, path
    vllm = next(c for c in children if "vllm.entrypoints.openai.api_server" in " ".join(c.cmdline()))
    cmd = vllm.cmdline()
    assert not any("pl-vllm-" in a for a in cmd), "the key is not on the command line"
    url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
    key = (data_dir / "secrets" / "vllm-api-key").read_text().strip()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    body = {"lora_name": "intruder", "lora_path": str(data_dir)}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=10).status_code == 401
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "x"}, timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200


def test_pairloop_up_stops_under_load_and_leaves_no_child(tiny_model: Path, tmp_path: Path) -> None:
    """(And, while it runs, its data dir and its vLLM are private: `check_private`.)"""
    port = free_port()
    env = _clean_env() | {
        "PAIRLOOP_DATA_DIR": str(tmp_path),
        "PAIRLOOP_MODEL": str(tiny_model),
        "PAIRLOOP_SERVED_MODEL_NAME": MODEL_NAME,
        "PAIRLOOP_SHUTDOWN_TIMEOUT_S": "3",
        "PAIRLOOP_CHAT_LIMIT_PER_USER": '{"per_s": 0, "burst": 1}',
    }
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy", "up", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    stop = threading.Event()
    answered: list[int] = []
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", proc, 300)
        key = (tmp_path / "secrets" / "dev-api-key").read_text().strip()

        def client(i: int) -> None:
            body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Tea {i}?"}], "max_tokens": 64}
            with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as c:
                while not stop.is_set():
                    try:
                        with c.stream(
                            "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body | {"stream": True}
                        ) as r:
                            for _ in r.iter_bytes():
                                pass
                            answered.append(r.status_code)
                    except httpx.HTTPError:
                        answered.append(0)
                        time.sleep(0.1)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        while answered.count(200) < 3:
            assert proc.poll() is None
            time.sleep(0.1)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "vllm" in names and "worker" in names and "valkey" in names, names
        check_private(tmp_path, children)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        took = time.monotonic() - started
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    # The bound by construction (deploy/local/stack.py), 12 s at a 3 s grace: the grace for requests in flight,
    # APP_SHUTDOWN_S for the application, the grace for the children together (vLLM, workers, cron; SIGKILL
    # after it), the grace for Redis; and 1 s for the process to start and end.
    assert took < 3 + APP_SHUTDOWN_S + 3 + 3 + 1, f"stopped {took:.1f} s after SIGTERM"
    time.sleep(0.5)
    left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, [" ".join(c.cmdline()) for c in left]


def test_a_gateway_killed_mid_stream_leaves_nothing_a_vote_could_bind_to(
    gateway_process: tuple[subprocess.Popen[bytes], int],
    rdb: redis.Redis,
    make_gateway: GatewayFactory,
    engine: EngineProcess,
) -> None:
    proc, port = gateway_process
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me about tea."}]}
    body |= {"max_tokens": 200, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        proc.kill()  # SIGKILL: nothing in the gateway runs after this
        proc.wait()
        with contextlib.suppress(httpx.HTTPError):
            for _ in lines:
                pass
    cid = json.loads(first[5:])["id"]
    assert rdb.get(f"pairloop:completion:{cid}") is None, "a completion is recorded only once it is complete"
    # A vote naming it is refused by a gateway that is up: there is nothing to bind it to.
    other = make_gateway([engine.url])
    vote = {"completion_id": cid, "feedback_token": "v1.e30.AAAA", "kind": "pairwise", "preference": 0}
    r = httpx.post(f"{other.url}/v1/feedback", json=vote, headers=headers, timeout=30)
    assert r.status_code == 404, r.text
