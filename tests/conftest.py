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
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from deploy.gateway import build_app
from deploy.redis_server import EmbeddedRedis
from feedback.migrate import upgrade
from feedback.settings import FeedbackSettings
from serving.engine import EngineConfig, EngineProcess
from serving.process import free_port
from serving.ratelimit import RateLimit
from serving.settings import ALL_SCOPES, ApiKey, ServingSettings
from trainer.tiny.build import default_model_dir, ensure_built
from workers.settings import WorkerSettings

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
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A fresh embedded Valkey server (AOF on, as `pairloop up` runs it): WAITAOF works, and it can be killed."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("valkey"), "valkey-test-password")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of its own on the machine's PostgreSQL, dropped at the end of the session."""
    base = make_url(os.environ.get("PAIRLOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"pairloop_test_{os.getpid()}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"no PostgreSQL at {base.render_as_string()}: {exc}")
    url = base.set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated preference store: SQLite in a temporary dir, or the session's PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        upgrade(url)
        return url
    url = str(request.getfixturevalue("pg_url"))
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE feedback, completions"))
    engine.dispose()
    return url


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


NO_LIMIT = RateLimit(per_s=0, burst=1)


def settings_for(redis_url: str, vllm_urls: list[str], tmp: Path, **overrides: object) -> ServingSettings:
    values: dict[str, object] = {
        "chat_limit_per_key": NO_LIMIT,
        "chat_limit_per_user": NO_LIMIT,
        "feedback_limit_per_key": NO_LIMIT,
        "feedback_limit_per_user": NO_LIMIT,
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


def feedback_settings(tmp: Path, store_url: str | None = None, **overrides: object) -> FeedbackSettings:
    values: dict[str, object] = {"data_dir": tmp, "database_url": store_url, "feedback_durability": "none"}
    return FeedbackSettings(**{**values, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def make_gateway(redis_url: str, tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways (serving + feedback) with the given overrides; all are stopped at the end of the test.

    Rate limits are off unless a test sets them. `feedback=` and `workers=` take FeedbackSettings and
    WorkerSettings overrides; the feedback durability is `none` unless given (the machine's Redis 7.0 has
    no WAITAOF), and the store is SQLite in the test's directory unless `database_url` is given.
    """
    started: list[ServerThread] = []

    def make(
        vllm_urls: list[str],
        *,
        feedback: dict[str, object] | None = None,
        workers: dict[str, object] | None = None,
        **overrides: object,
    ) -> ServerThread:
        settings = settings_for(overrides.pop("redis_url", redis_url), vllm_urls, tmp_path, **overrides)  # type: ignore[arg-type]
        fs = feedback_settings(tmp_path, **(feedback or {}))
        ws = WorkerSettings(data_dir=tmp_path, database_url=fs.database_url, **(workers or {}))  # type: ignore[arg-type]
        server = ServerThread(build_app(settings, fs, ws)).__enter__()
        started.append(server)
        return server

    yield make
    for server in started:
        server.__exit__()


@pytest.fixture(scope="session")
def gateway(engine: EngineProcess, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway over the session's vLLM engine; its URL."""
    tmp = tmp_path_factory.mktemp("gw")
    settings = settings_for(redis_url, [engine.url], tmp, max_body_bytes=64 * 1024, max_tokens_limit=200)
    with ServerThread(build_app(settings, feedback_settings(tmp), WorkerSettings(data_dir=tmp))) as server:
        yield server.url
