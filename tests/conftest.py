"""Shared fixtures: the tiny model (built once and cached), one vLLM engine per session, Redis, gateways.

The integration tests run against real parts: vLLM's CPU build serving the tiny model, the machine's
Redis (or, where none answers, the embedded Valkey server), and the gateway over HTTP.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from deploy.app.gateway import build_app
from deploy.local.engine import EngineConfig, EngineProcess
from deploy.local.redis_server import EmbeddedRedis
from deploy.migrations import upgrade
from feedback import jobs
from tests import parts
from tests.gateway_helpers import MODEL_NAME, ROOT, GatewayFactory, ServerThread, feedback_settings, settings_for
from tests.loop_helpers import clear_routing
from tests.postgres import postgres_database
from trainer import loop
from trainer.tiny.build import default_model_dir, ensure_built

NEEDS_ENGINE = {"engine", "gateway", "tiny_model"}
"""Fixtures that start vLLM or build the tiny model: a test that takes one is slow, whatever its module says."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if NEEDS_ENGINE & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """List the parts this run opted out of (tests/parts.py) and how many tests each skipped."""
    taken: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if parts.MARK in reason:
            taken[reason.split(f"{parts.MARK}: ", 1)[1].split(":", 1)[0]] += 1
    chosen = parts.opted_out()
    if chosen or taken:
        terminalreporter.section("opt-outs")
        for part in sorted(chosen | set(taken)):
            terminalreporter.write_line(f"{parts.VARIABLE}: {part} ({parts.PARTS[part]}): {taken[part]} tests skipped")


@pytest.fixture(autouse=True)
def _no_configuration_leaks() -> Iterator[None]:
    """A worker process points its jobs at a store and a Redis once at start (`configure`); a test that does
    the same leaves nothing behind for the next one."""
    yield
    jobs.configure(None)
    loop.configure(None)


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
        EngineConfig(
            model=str(tiny_model),
            served_model_name=MODEL_NAME,
            log_path=logs / "vllm.log",
            adapter_dirs=[tmp_path_factory.getbasetemp()],  # every test's tmp_path: where tests train adapters
        ),
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
    with postgres_database(f"pairloop_test_{os.getpid()}") as url:
        upgrade(url)
        yield url


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty database of its own for one test (not migrated): the cluster test's shared store."""
    with postgres_database(f"pairloop_fresh_{os.getpid()}") as url:
        yield url


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


@pytest.fixture
def base_routing(redis_url: str) -> Iterator[None]:
    """The base model serves every request at the start and after the test, whether or not it passed: the
    session's vLLM engine and Redis are shared, so a champion left behind would serve the next test."""
    clear_routing(redis_url)
    yield
    clear_routing(redis_url)


@pytest.fixture
def make_gateway(redis_url: str, tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways (serving + feedback) with the given overrides; all are stopped at the end of the test.

    Rate limits are off unless a test sets them. `feedback=` takes FeedbackSettings overrides (the queue's
    included); the feedback durability is `none` unless given (the machine's Redis 7.0 has no WAITAOF), and
    the store is SQLite in the test's directory unless `database_url` is given.
    """
    started: list[ServerThread] = []

    def make(
        vllm_urls: list[str],
        *,
        feedback: dict[str, object] | None = None,
        **overrides: object,
    ) -> ServerThread:
        settings = settings_for(overrides.pop("redis_url", redis_url), vllm_urls, tmp_path, **overrides)  # type: ignore[arg-type]
        fs = feedback_settings(tmp_path, **(feedback or {}))
        server = ServerThread(build_app(settings, fs)).__enter__()
        started.append(server)
        return server

    yield make
    for server in started:
        server.__exit__()


@pytest.fixture(scope="session")
def gateway(engine: EngineProcess, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway over the session's vLLM engine; its URL."""
    tmp = tmp_path_factory.mktemp("gw")
    settings = settings_for(
        redis_url, [engine.url], tmp, max_body_bytes=64 * 1024, max_tokens_limit=200, max_tokens_default=6
    )
    with ServerThread(build_app(settings, feedback_settings(tmp))) as server:
        yield server.url
