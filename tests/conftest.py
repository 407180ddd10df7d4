"""Shared fixtures: the tiny model (built once and cached), one vLLM engine per session, Redis, gateways.

The integration tests run against real parts: vLLM's CPU build serving the tiny model, the machine's
Redis (or, where none answers, the embedded Valkey server), and the gateway over HTTP.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import uvicorn

from deploy.redis_server import EmbeddedRedis
from serving.app import create_app
from serving.engine import EngineConfig, EngineProcess
from serving.process import free_port
from serving.settings import ALL_SCOPES, ApiKey, ServingSettings
from trainer.tiny.build import default_model_dir, ensure_built

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "pairloop-tiny"
SECRET = "test-secret-" + "x" * 32

KEYS = {
    "full": ApiKey(id="full", key="sk-full-0123456789abcdef", scopes=list(ALL_SCOPES)),
    "chat": ApiKey(id="chatonly", key="sk-chat-0123456789abcdef", scopes=["chat"]),
    "feedback": ApiKey(id="fbonly", key="sk-feedback-0123456789ab", scopes=["feedback"]),
}


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The default tiny model, built once into .cache/ (a clean clone builds it: about three minutes)."""
    cache = Path(os.environ.get("PAIRLOOP_TEST_CACHE", ROOT / ".cache"))
    return ensure_built(default_model_dir(cache))


@pytest.fixture(scope="session")
def engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    """One real vLLM server for the whole session, started through the gateway's own launcher."""
    logs = tmp_path_factory.mktemp("vllm")
    proc = EngineProcess(
        EngineConfig(model=str(tiny_model), served_model_name=MODEL_NAME, log_path=logs / "vllm.log"),
        max_backoff_s=2.0,
    )
    proc.start()
    try:
        if not proc.wait_ready(timeout_s=300):
            log = (logs / "vllm.log").read_text()[-4000:]
            pytest.fail(f"vLLM did not start:\n{log}")
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis (db 9), or an embedded Valkey server where none answers."""
    url = os.environ.get("PAIRLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        yield url
        return
    except redis.ConnectionError:
        pass
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), "test-password-123")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


class ServerThread:
    """A real uvicorn server in a thread of the test process."""

    def __init__(self, app: object) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


GatewayFactory = Callable[..., ServerThread]


def settings_for(redis_url: str, vllm_urls: list[str], tmp: Path, **overrides: object) -> ServingSettings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "secret": SECRET,
        "vllm_urls": vllm_urls,
        "data_dir": tmp,
        "api_keys": list(KEYS.values()),
        "served_model_name": MODEL_NAME,
        "health_interval_s": 0.5,
        "retry_after_s": 3,
        **overrides,
    }
    return ServingSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_gateway(redis_url: str, tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways with the given settings overrides; all are stopped at the end of the test."""
    started: list[ServerThread] = []

    def make(vllm_urls: list[str], **overrides: object) -> ServerThread:
        settings = settings_for(overrides.pop("redis_url", redis_url), vllm_urls, tmp_path, **overrides)  # type: ignore[arg-type]
        server = ServerThread(create_app(settings)).__enter__()
        started.append(server)
        return server

    yield make
    for server in started:
        server.__exit__()


@pytest.fixture(scope="session")
def gateway(engine: EngineProcess, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway over the session's vLLM engine; its URL."""
    settings = settings_for(
        redis_url, [engine.url], tmp_path_factory.mktemp("gw"), max_body_bytes=64 * 1024, max_tokens_limit=200
    )
    with ServerThread(create_app(settings)) as server:
        yield server.url
