"""`pairloop adapters` and `pairloop train` from the command line: listing, clear refusals, one round at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from deploy.local.redis_server import EmbeddedRedis
from deploy.migrations import upgrade
from feedback.store import save_event
from tests.cli_helpers import cli
from tests.gateway_helpers import ServerThread
from tests.loop_helpers import make_adapter
from tests.store_helpers import event, record
from trainer.data import backlog
from trainer.settings import TrainerSettings

pytestmark = pytest.mark.slow


def test_adapter_and_train_commands(valkey: EmbeddedRedis, tiny_model: Path, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'pairloop.db'}"
    upgrade(store)
    name = make_adapter(tiny_model, store, tmp_path, 1, seed=3)
    env = {"PAIRLOOP_REDIS_URL": valkey.url, "PAIRLOOP_DATA_DIR": str(tmp_path)}

    r = cli("adapters", "list", "--json", **env)
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert listing["champion"] is None and [(a["name"], a["status"]) for a in listing["adapters"]] == [
        (name, "candidate")
    ]
    r = cli("adapters", "list", **env)
    assert r.returncode == 0 and "(base model)" in r.stdout and name in r.stdout

    r = cli("adapters", "leaderboard", **env)
    assert r.returncode == 0 and "no pairwise votes" in r.stdout, r.stderr
    engine = create_engine(store)
    with Session(engine) as session, session.begin():
        for i in range(16):  # the adapter wins every vote, shown first or second
            sides = (name, "pairloop-tiny") if i % 2 else ("pairloop-tiny", name)
            pair = record(f"Answer A {i}.", f"Answer B {i}.", adapters=sides)
            save_event(session, event(pair, judge=f"j{i}", preference=str(sides.index(name))))
        waiting = backlog(session, TrainerSettings(data_dir=tmp_path, database_url=store))
    engine.dispose()
    r = cli("adapters", "list", "--json", **env)
    assert json.loads(r.stdout)["backlog"] == waiting and waiting["examples"] > 0
    r = cli("adapters", "list", **env)
    assert f"backlog: {waiting['examples']} {waiting['method']} examples wait" in r.stdout, r.stdout
    r = cli("adapters", "leaderboard", "--json", "--bootstrap", "20", **env)
    assert r.returncode == 0, r.stderr
    board = json.loads(r.stdout)
    assert [(v["name"], v["kind"], v["wins"]) for v in board["variants"]] == [
        (name, "adapter", 16),
        ("pairloop-tiny", "base", 0),
    ]
    assert board["variants"][1]["rating"] == 1000 and board["variants"][0]["rating"] > 1000
    r = cli("adapters", "leaderboard", **env)
    assert r.returncode == 0 and f"   1  {name}" in r.stdout and "first-position effect" in r.stdout

    r = cli("adapters", "rollback", **env)
    assert r.returncode == 1 and "no earlier champion" in r.stderr and "Traceback" not in r.stderr
    r = cli("adapters", "promote", "pl-v0042-00000000", **env)
    assert r.returncode == 1 and "no adapter named" in r.stderr
    r = cli("adapters", "promote", name, **env)  # no gateway has registered a vLLM backend
    assert r.returncode == 1 and "no vLLM backend" in r.stderr

    r = cli("train", **env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["queue"] == "pairloop-training"
    assert redis.Redis.from_url(valkey.url).llen("rq:queue:pairloop-training") == 1
    r = cli("train", **env)
    assert r.returncode == 1 and "already" in r.stderr

    r = cli("adapters", "list", **{**env, "PAIRLOOP_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert r.returncode == 1 and "cannot reach Redis" in r.stderr


def test_health_exits_0_on_200_and_1_otherwise() -> None:
    """`pairloop health`, the image's HEALTHCHECK: its default target is this host's gateway at $PAIRLOOP_PORT."""
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/sick")
    async def sick() -> JSONResponse:
        return JSONResponse({"status": "not ready"}, status_code=503)

    with ServerThread(app) as server:
        assert cli("health", PAIRLOOP_PORT=str(server.port)).returncode == 0
        assert cli("health", f"{server.url}/healthz").returncode == 0
        r = cli("health", f"{server.url}/sick")
        assert r.returncode == 1 and "HTTP 503" in r.stderr
    r = cli("health", f"{server.url}/healthz", "--timeout-s", "1")
    assert r.returncode == 1 and "ConnectError" in r.stderr and "Traceback" not in r.stderr
