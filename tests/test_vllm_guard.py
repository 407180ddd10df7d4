"""vLLM answers no one but the gateway and the trainer: the route filter pairloop runs inside it
(serving/vllm_guard.py), alone and in the vLLM child of a real `pairloop up`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from deploy.local.engine import child_environment
from deploy.local.process import free_port
from serving.vllm_guard import ADAPTER_DIRS_ENV, Receive, Scope, Send, VllmGuard
from tests.cli_helpers import cli
from tests.gateway_helpers import MODEL_NAME
from tests.loop_helpers import make_adapter

KEY = "vllm-key-for-the-guard-test"


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Stands for vLLM: answers 200 with the body it received."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body or b"ok"})


@pytest.fixture
def guarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _SyncOverAsgi:
    (tmp_path / "adapters" / "pl-v0001").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "adapters" / "escape").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    monkeypatch.setenv(ADAPTER_DIRS_ENV, str(tmp_path / "adapters"))
    return _SyncOverAsgi(httpx.ASGITransport(app=VllmGuard(_echo)))


class _SyncOverAsgi:
    """A blocking view of an ASGI app through httpx's ASGI transport (each call in its own event loop)."""

    def __init__(self, transport: httpx.ASGITransport) -> None:
        self.transport = transport

    def request(self, method: str, path: str, *, key: str | None = KEY, **kw: object) -> httpx.Response:
        async def go() -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with httpx.AsyncClient(transport=self.transport, base_url="http://vllm") as client:
                return await client.request(method, path, headers=headers, **kw)  # type: ignore[arg-type]

        return asyncio.run(go())


def test_the_guard_lets_through_only_what_pairloop_uses(guarded: _SyncOverAsgi, tmp_path: Path) -> None:
    g = guarded
    # vLLM's routes outside its key-checked prefixes, and the ones under them that pairloop does not use
    for method, path in [
        ("POST", "/adapters?name=x&src=/tmp"),
        ("DELETE", "/adapters/pl-v0001"),
        ("POST", "/invocations"),
        ("GET", "/ping"),
        ("POST", "/v1/completions"),
        ("POST", "/tokenize"),
        ("GET", "/v1/models/"),
        ("OPTIONS", "/v1/chat/completions"),
    ]:
        r = g.request(method, path, json={"prompt": "hi"})
        assert r.status_code == 404, (method, path, r.status_code)
        assert r.json() == {"error": "not found"}
    # the routes pairloop uses: without the key refused, with it passed on
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/unload_lora_adapter"),
        ("POST", "/v1/load_lora_adapter"),
        ("GET", "/metrics"),
    ]:
        assert g.request(method, path, key=None).status_code == 401, path
        assert g.request(method, path, key="wrong").status_code == 401, path
    assert g.request("GET", "/v1/models").status_code == 200
    assert g.request("GET", "/health", key=None).status_code == 200
    chat = g.request("POST", "/v1/chat/completions", json={"model": "m"})
    assert chat.status_code == 200 and chat.json() == {"model": "m"}, "the body reaches vLLM untouched"
    # loads: only from the adapter directories, links resolved
    inside = {"lora_name": "pl-v0001", "lora_path": str(tmp_path / "adapters" / "pl-v0001")}
    r = g.request("POST", "/v1/load_lora_adapter", json=inside)
    assert r.status_code == 200 and r.json() == inside, "the body is passed on as it came"
    paths: list[Path | str] = [
        tmp_path / "elsewhere",
        tmp_path / "adapters",
        tmp_path / "adapters" / ".." / "elsewhere",
        tmp_path / "adapters" / "escape",
        "/etc",
    ]
    for where in paths:
        r = g.request("POST", "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(where)})
        assert r.status_code == 403 and "outside the adapter directories" in r.json()["error"], where
    for body in [b"not json", b"[]", b'{"lora_name": "x"}', b'{"lora_path": 5}']:
        assert g.request("POST", "/v1/load_lora_adapter", content=body).status_code == 400, body
    assert g.request("POST", "/v1/load_lora_adapter", content=b"x" * 20_000).status_code == 413


def test_a_guard_with_no_adapter_directories_loads_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv(ADAPTER_DIRS_ENV, raising=False)
    g = _SyncOverAsgi(httpx.ASGITransport(app=VllmGuard(_echo)))
    assert g.request("GET", "/v1/models", key=None).status_code == 200, "no key configured: none asked for"
    assert g.request("POST", "/invocations", key=None).status_code == 404
    body = {"lora_name": "x", "lora_path": str(tmp_path)}
    assert g.request("POST", "/v1/load_lora_adapter", json=body, key=None).status_code == 403


def test_the_vllm_child_inherits_no_secret() -> None:
    parent = {
        "PATH": "/usr/bin",
        "HOME": "/home/u",
        "LC_ALL": "C.UTF-8",
        "HF_HOME": "/hf",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "CUDA_VISIBLE_DEVICES": "0",
        "OMP_NUM_THREADS": "2",
        "VLLM_API_KEY": "someone else's",
        "PAIRLOOP_SECRET": "s" * 40,
        "PAIRLOOP_DATABASE_URL": "postgresql://u:pw@db/p",
        "PAIRLOOP_API_KEYS": "[]",
        "AWS_SECRET_ACCESS_KEY": "x",
        "REDIS_PASSWORD": "x",
        "DATABASE_URL": "x",
    }
    assert sorted(child_environment(parent)) == [
        "CUDA_VISIBLE_DEVICES",
        "HF_HOME",
        "HOME",
        "LC_ALL",
        "OMP_NUM_THREADS",
        "PATH",
        "VLLM_CPU_KVCACHE_SPACE",
    ]


def test_pairloop_vllm_on_a_network_address_needs_a_key(tmp_path: Path) -> None:
    r = cli("vllm", "--host", "0.0.0.0", PAIRLOOP_DATA_DIR=str(tmp_path), PAIRLOOP_MODEL=str(tmp_path / "none"))
    assert r.returncode == 1 and "needs a key" in r.stderr and "PAIRLOOP_VLLM_API_KEY" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def _vllm_child(pid: int) -> psutil.Process | None:
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "vllm.entrypoints.openai.api_server" in child.cmdline():
                return child
    return None


def _served(gateway: str, key: str, adapters: list[str], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    served: list[str] = []
    while time.monotonic() < deadline and served != adapters:
        r = httpx.post(f"{gateway}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        served = [c["adapter"] for c in r.json()["pairloop"]["choices"]]
    return served == adapters


@pytest.mark.slow
def test_pairloop_up_vllm_answers_only_the_gateway_and_trainer(tiny_model: Path, tmp_path: Path) -> None:
    """From another process (this test), nothing of vLLM outside the gateway's use answers; the gateway still serves,
    swaps and rolls back; a routing record that points outside the adapter directory loads nothing."""
    port, vllm_port = free_port(), free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}
    env |= {
        "PAIRLOOP_MODEL": str(tiny_model),
        "PAIRLOOP_SERVED_MODEL_NAME": MODEL_NAME,
        "PAIRLOOP_VLLM_PORT": str(vllm_port),
        "PAIRLOOP_VLLM_CPU_CORES": str(1 % (os.cpu_count() or 1)),  # the session's engine binds the first core
        "PAIRLOOP_SECRET": "a-token-secret-of-this-test-0123456789",
        "AWS_SECRET_ACCESS_KEY": "an-s3-key-vllm-must-not-see",
    }
    cmd = [sys.executable, "-m", "deploy", "up", "--port", str(port), "--data-dir", str(data), "--workers", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gateway, vllm = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vllm_port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{gateway}/readyz").status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "pairloop up did not become ready"
            time.sleep(0.5)
        key = (data / "secrets" / "dev-api-key").read_text().strip()
        vllm_key = (data / "secrets" / "vllm-api-key").read_text().strip()
        child = _vllm_child(proc.pid)
        assert child is not None
        environ = child.environ()
        assert environ["VLLM_API_KEY"] == vllm_key
        assert "PAIRLOOP_SECRET" not in environ and "AWS_SECRET_ACCESS_KEY" not in environ
        assert not [k for k in environ if k.startswith("PAIRLOOP_") and k != ADAPTER_DIRS_ENV], environ

        # Everything of vLLM outside the gateway's use is refused, with or without its key.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        for auth in ({}, {"Authorization": f"Bearer {vllm_key}"}):
            assert (
                httpx.post(f"{vllm}/adapters", params={"name": "x", "src": str(elsewhere)}, headers=auth).status_code
                == 404
            )
            assert httpx.delete(f"{vllm}/adapters/{MODEL_NAME}", headers=auth).status_code == 404
            invocation = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            assert httpx.post(f"{vllm}/invocations", json=invocation, headers=auth).status_code == 404
            assert httpx.post(f"{vllm}/v1/completions", json={"prompt": "Hi"}, headers=auth).status_code == 404
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/load_lora_adapter"),
            ("POST", "/v1/unload_lora_adapter"),
        ]:
            assert httpx.request(method, f"{vllm}{path}", json={}).status_code == 401, path
        outside = {"lora_name": "intruder", "lora_path": str(elsewhere)}
        refused = httpx.post(
            f"{vllm}/v1/load_lora_adapter", json=outside, headers={"Authorization": f"Bearer {vllm_key}"}
        )
        assert refused.status_code == 403, refused.text
        assert httpx.get(f"{vllm}/health").status_code == 200

        # The gateway still serves, swaps and rolls back.
        store = f"sqlite:///{data / 'pairloop.db'}"
        (data / "adapters").mkdir(exist_ok=True)
        champion = make_adapter(tiny_model, store, data / "adapters", 1, seed=21)
        cli_env = {"PAIRLOOP_DATA_DIR": str(data)}
        assert _served(gateway, key, [MODEL_NAME, MODEL_NAME])
        r = cli("adapters", "promote", champion, **cli_env)
        assert r.returncode == 0, r.stderr
        assert _served(gateway, key, [champion, champion])
        # A registered adapter whose files lie outside the adapter directory is refused by vLLM: the champion stays.
        stray = make_adapter(tiny_model, store, elsewhere, 2, seed=22)
        r = cli("adapters", "promote", stray, **cli_env)
        assert r.returncode == 1 and "outside the adapter directories" in r.stderr, r.stderr
        assert _served(gateway, key, [champion, champion], timeout_s=2.0)
        r = cli("adapters", "rollback", **cli_env)
        assert r.returncode == 0, r.stderr
        assert _served(gateway, key, [MODEL_NAME, MODEL_NAME])
        models = httpx.get(f"{vllm}/v1/models", headers={"Authorization": f"Bearer {vllm_key}"}).json()
        assert "intruder" not in json.dumps(models) and stray not in json.dumps(models)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out[-3000:]
