"""`pairloop up` pieces: the embedded Redis server, and the whole command as a user runs it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import redis
from rq import Queue

from deploy.local.engine import EngineProcess
from deploy.local.process import free_port
from deploy.local.redis_server import EmbeddedRedis
from tests.cli_helpers import cli
from tests.gateway_helpers import MODEL_NAME


def test_embedded_redis_is_durable_and_private(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, "pw-0123456789")
    server.start()
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        client.set("k", "v")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).set("k", "x")
        client.close()
    finally:
        server.stop()
    # AOF: the write survives a restart
    again = EmbeddedRedis(tmp_path, "pw-0123456789", port=server.port)
    again.start()
    try:
        assert redis.Redis.from_url(again.url).get("k") == b"v"
    finally:
        again.stop()


@pytest.mark.slow
def test_pairloop_up_serves_and_stops_its_children(engine: EngineProcess, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}
    env |= {"PAIRLOOP_VLLM_URLS": engine.url, "PAIRLOOP_SERVED_MODEL_NAME": MODEL_NAME}
    env |= {"PAIRLOOP_CHECK_INTERVAL_S": "1"}
    cmd = [sys.executable, "-m", "deploy", "up", "--port", str(port), "--data-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "pairloop up did not become ready"
            time.sleep(0.3)
        key = (tmp_path / "secrets" / "dev-api-key").read_text().strip()
        assert (tmp_path / "secrets" / "dev-api-key").stat().st_mode & 0o077 == 0
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert len(resp.choices) == 2
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401

        # Feedback goes through the embedded Valkey (WAITAOF) to the worker child and into the SQLite store.
        feedback = {
            "completion_id": resp.id,
            "feedback_token": resp.model_extra["pairloop"]["feedback_token"],
            "kind": "pairwise",
            "preference": 1,
        }
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/feedback", json=feedback, headers={"Authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 202, answer.text
        store = tmp_path / "pairloop.db"
        deadline = time.monotonic() + 60
        while not (store.exists() and answer.json()["id"] in stored_ids(store)):
            assert time.monotonic() < deadline, "the worker child did not store the event"
            time.sleep(0.3)
        status = cli("queue", "status", "--json", PAIRLOOP_DATA_DIR=str(tmp_path))
        assert status.returncode == 0, status.stderr
        counts = json.loads(status.stdout)
        assert counts["queued"] == 0 and counts["failed"] == 0 and counts["workers"] == 1

        # The learning loop's children: RQ's cron scheduler queues the check, the training worker runs it.
        connection = redis.Redis.from_url((tmp_path / "run" / "redis-url").read_text().strip())
        control = Queue("pairloop-control", connection=connection)
        deadline = time.monotonic() + 60
        while control.finished_job_registry.count == 0:
            assert time.monotonic() < deadline, "no periodic check ran"
            time.sleep(0.3)
        listing = cli("adapters", "list", "--json", PAIRLOOP_DATA_DIR=str(tmp_path))
        assert listing.returncode == 0 and json.loads(listing.stdout)["adapters"] == [], listing.stderr
        connection.close()

        # The arena and the dashboard come from the gateway itself, and allow nothing from elsewhere.
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "arena.js" in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert httpx.get(f"http://127.0.0.1:{port}/static/dashboard.js").status_code == 200

        # A crashed child is reported and restarted.
        worker = feedback_worker(proc.pid)
        worker.kill()
        deadline = time.monotonic() + 30
        while (again := feedback_worker(proc.pid)) is None or again.pid == worker.pid:
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(0.3)
    finally:
        # Its own children only: another `pairloop up` (`make run` beside the tests) has workers too.
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "development API key: pl-dev-" in out
    assert f"arena (vote):  http://127.0.0.1:{port}/#key=pl-dev-" in out
    assert "`pairloop worker` exited with status -9; restarting it in 1 s" in out
    assert "loopback only" in out
    # the embedded Redis, the workers, the trainer and cron it started are gone
    assert len(children) >= 4, children
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], alive
    assert not (tmp_path / "run" / "redis-url").exists()


def feedback_worker(pid: int) -> psutil.Process | None:
    """The feedback worker among the direct children of `pairloop up` (process `pid`). RQ retitles its worker
    process ("rq:worker:…: Listening on pairloop-feedback"); its scheduler, a fork, keeps the command line."""
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            if "Listening on pairloop-feedback" in " ".join(child.cmdline()):
                return child
    return None


def stored_ids(store: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(store)) as db:
        try:
            return {row[0] for row in db.execute("SELECT id FROM feedback")}
        except sqlite3.OperationalError:
            return set()


def test_up_refuses_unsafe_settings_with_a_clear_message(tmp_path: Path) -> None:
    r = cli("up", "--data-dir", str(tmp_path), PAIRLOOP_HOST="0.0.0.0")
    assert r.returncode == 2
    assert "loopback" in r.stderr and "PAIRLOOP_API_KEYS" in r.stderr
    r = cli("up", "--data-dir", str(tmp_path), PAIRLOOP_REDIS_URL="redis://127.0.0.1:6379/9")
    assert r.returncode == 2 and "PAIRLOOP_SECRET" in r.stderr
    r = cli("up", "--port", "70000")
    assert r.returncode == 2 and "port" in r.stderr
    assert not (tmp_path / "secrets").exists(), "nothing is written for a refused start"


def test_build_tiny_uses_its_cache(tiny_model: Path) -> None:
    r = cli("model", "build-tiny", "--out", str(tiny_model))
    assert r.returncode == 0 and "(cached)" in r.stdout
