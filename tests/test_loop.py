"""The whole loop on real parts: votes through the API, stored by a worker, a round trained from the store,
gated, promoted into the running vLLM, and the next chat request served by the new adapter; a round that
fails leaves the champion serving; the cron check and `POST /admin/train` start rounds."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from deploy.local.engine import EngineProcess
from deploy.migrations import upgrade
from deploy.simulate.preferences import Preference
from feedback.store import save_event
from serving.adapters.routing import ROUTING_KEY
from tests.cli_helpers import cli
from tests.feedback_helpers import chat, chat_pair, drain, send, vote
from tests.gateway_helpers import LEARNING_ENV, MODEL_NAME, GatewayFactory
from tests.loop_helpers import admin, make_adapter, statuses, wait_for_backends
from tests.store_helpers import event, record
from trainer import loop, registry
from trainer.errors import RoundBusy
from trainer.queue import LOCK_KEY
from trainer.settings import TrainerSettings

pytestmark = pytest.mark.slow


@pytest.fixture
def loop_env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_model: Path,
    redis_url: str,
    rdb: redis.Redis,
    base_routing: None,
) -> str:
    """The trainer's settings for this test (LEARNING_ENV's), its store's URL."""
    return trainer_env(monkeypatch, tmp_path, tiny_model, redis_url, LEARNING_ENV)


def trainer_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: Path, redis_url: str, settings: dict[str, str]
) -> str:
    """A migrated store in `tmp_path` and the trainer's `settings` in the environment (it reads them from there, as
    the worker does); its store's URL."""
    store = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(store)
    for key, value in {
        "PAIRLOOP_DATA_DIR": str(tmp_path),
        "PAIRLOOP_DATABASE_URL": store,
        "PAIRLOOP_MODEL": str(tiny_model),
        **settings,
    }.items():
        monkeypatch.setenv(key, value)
    loop.configure(redis_url)
    return store


def test_a_round_with_the_service_defaults_passes_its_gate(
    make_gateway: GatewayFactory,
    engine: EngineProcess,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_model: Path,
    redis_url: str,
    rdb: redis.Redis,
    base_routing: None,
) -> None:
    """No setting lowered (the other tests' LEARNING_ENV raises the learning rate and lifts the length bound): the
    cron check's threshold, the learning rate, the epochs and the gate as shipped, on 100 votes of a judge who
    prefers polite answers (deploy/simulate's). The candidate passes the gate and becomes the challenger (the
    default A/B share is 0.5). Seeded chats and a content-hashed split make the run the same every time."""
    store = trainer_env(monkeypatch, tmp_path, tiny_model, redis_url, {})  # no setting but the paths
    gw = make_gateway([engine.url], feedback={"database_url": store})
    judge, sent = Preference("polite"), 0
    for i in range(600):
        data = chat(gw.url, user=f"judge-{i % 20}", max_tokens=48, seed=i)
        verdict = judge.compare(*(c["message"]["content"] for c in data["choices"]))
        if verdict:
            body = vote(data, preference=0 if verdict > 0 else 1, user=f"judge-{i % 20}")
            assert send(gw.url, body).status_code == 202
            sent += 1
        if sent == 100:
            break
    drain(redis_url, store)
    wait_for_backends(redis_url)
    defaults = TrainerSettings()
    out = loop.check()
    assert out["new_examples"] >= defaults.min_new_examples and "round" in out, out  # the check starts one
    rdb.delete("rq:queue:pairloop-training")  # run here instead, to read its result

    result = loop.train_round("manual")

    assert result["status"] == "challenger" and result["gate"]["passed"], result
    gate = result["gate"]
    assert gate["candidate"]["accuracy"] > defaults.gate_min_accuracy, gate
    assert 1 / defaults.gate_max_length_ratio <= gate["length_ratio"] <= defaults.gate_max_length_ratio, gate


def collect_votes(gw: str, pairs: int, first_seed: int = 0) -> int:
    """Chat pairs judged by a simulated user who prefers the shorter answer: a taste that 40 votes teach the
    tiny model well enough to pass the gate on held-out pairs (the length bound is lifted for it). Each
    request is seeded, so the same pairs are sampled, and held out, run after run (the split hashes a pair's
    messages and answers, feedback.store.split_of)."""
    sent = 0
    for i in range(pairs * 4):
        user = f"judge-{i % 8}"
        data = chat(gw, user=user, max_tokens=48, seed=first_seed + i)
        texts = [c["message"]["content"] for c in data["choices"]]
        if len(texts[0]) == len(texts[1]):
            continue  # identical, or no shorter one: no preference
        preference = 0 if len(texts[0]) < len(texts[1]) else 1
        assert send(gw, vote(data, preference=preference, user=user)).status_code == 202
        sent += 1
        if sent == pairs:
            break
    return sent


def test_a_round_from_stored_feedback_is_promoted_and_serves_the_next_request(
    make_gateway: GatewayFactory, engine: EngineProcess, loop_env: str, redis_url: str
) -> None:
    gw = make_gateway([engine.url], feedback={"database_url": loop_env})
    assert collect_votes(gw.url, 40) == 40
    drain(redis_url, loop_env)
    wait_for_backends(redis_url)  # the worker swaps through the backends the gateway lists

    # `pairloop train --now`: the round in the command's own process, as an operator runs it
    env = {k: v for k, v in os.environ.items() if k.startswith("PAIRLOOP_")} | {"PAIRLOOP_REDIS_URL": redis_url}
    r = cli("train", "--now", **env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])

    assert result["status"] == "promoted", result
    name = result["adapter"]
    assert statuses(loop_env) == {name: "champion"}
    # the gateway follows the routing record within its poll interval (0.1 s)
    assert served_within(gw.url, [name, name])
    listing = admin(gw.url, "GET", "/admin/train").json()
    rounds = listing["rounds"]
    assert rounds[0]["status"] == "promoted" and rounds[0]["decision"]["passed"] is True
    assert rounds[0]["new_examples"] > 0 and rounds[0]["data_until"]
    assert listing["backlog"]["examples"] == 0  # the round took every vote (40 < PAIRLOOP_MAX_ROUND_EXAMPLES)

    # nothing new since: the cron check does not start another round
    assert loop.check()["new_examples"] == 0

    # `pairloop adapters rollback` and `promote`, through the backends the gateway listed
    r = cli("adapters", "rollback", **env)
    assert r.returncode == 0, r.stderr
    assert served_within(gw.url, [MODEL_NAME, MODEL_NAME])
    r = cli("adapters", "promote", name, **env)
    assert r.returncode == 0, r.stderr
    assert served_within(gw.url, [name, name]) and statuses(loop_env) == {name: "champion"}


def served_within(gw: str, adapters: list[str], timeout_s: float = 5.0) -> bool:
    """Whether the gateway serves a pair from `adapters` within `timeout_s` (it polls the record every 0.1 s)."""
    deadline = time.monotonic() + timeout_s
    served: list[str] = []
    while time.monotonic() < deadline and served != adapters:
        served = [c["adapter"] for c in chat_pair(gw, max_tokens=8)["pairloop"]["choices"]]
    return served == adapters


def test_a_failed_round_leaves_the_champion_serving(
    make_gateway: GatewayFactory,
    engine: EngineProcess,
    loop_env: str,
    redis_url: str,
    rdb: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = make_gateway([engine.url], feedback={"database_url": loop_env})
    collect_votes(gw.url, 10)
    drain(redis_url, loop_env)
    monkeypatch.setenv("PAIRLOOP_INJECT_FAILURE", "error")
    result = loop.train_round("manual")
    assert result["status"] == "failed" and "injected" in result["error"]
    assert not rdb.exists(LOCK_KEY), "a failed round must release the lock"
    data = chat_pair(gw.url, max_tokens=8)
    assert [c["adapter"] for c in data["pairloop"]["choices"]] == [MODEL_NAME, MODEL_NAME]

    monkeypatch.setenv("PAIRLOOP_INJECT_FAILURE", "nan")
    collect_votes(gw.url, 10, first_seed=1000)
    drain(redis_url, loop_env)
    result = loop.train_round("manual")
    assert result["status"] == "rejected" and "not finite" in result["gate"]["reasons"][0]
    assert statuses(loop_env) == {result["adapter"]: "rejected"}
    r = admin(gw.url, "POST", f"/admin/adapters/{result['adapter']}/promote")
    assert r.status_code == 409 and "rejected" in r.json()["error"]["message"]
    data = chat_pair(gw.url, max_tokens=8)
    assert [c["adapter"] for c in data["pairloop"]["choices"]] == [MODEL_NAME, MODEL_NAME]


def test_the_check_and_the_admin_api_start_one_round_at_a_time(
    make_gateway: GatewayFactory,
    engine: EngineProcess,
    loop_env: str,
    redis_url: str,
    rdb: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = make_gateway([engine.url], feedback={"database_url": loop_env})
    assert loop.check() == {"new_examples": 0}
    collect_votes(gw.url, 20)  # a quarter of them held out: about 15 count, 8 start a round
    drain(redis_url, loop_env)
    out = loop.check()
    assert out["new_examples"] >= 8 and "round" in out
    assert rdb.llen("rq:queue:pairloop-training") == 1
    assert loop.check()["round"] == "pending"
    r = admin(gw.url, "POST", "/admin/train")
    assert r.status_code == 409 and "already" in r.json()["error"]["message"]
    rdb.delete("rq:queue:pairloop-training")
    r = admin(gw.url, "POST", "/admin/train")
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert rdb.llen("rq:queue:pairloop-training") == 1
    rdb.set(LOCK_KEY, "another-round", ex=60)
    # a round waits out a lock as long as a dead worker's could last (LOCK_TTL_S + 5 s); here 1 + 5 s
    monkeypatch.setattr(loop, "LOCK_TTL_S", 1)
    with pytest.raises(RoundBusy):
        loop.train_round("manual")


def test_a_round_that_passes_becomes_the_challenger_when_ab_is_on(
    make_gateway: GatewayFactory,
    engine: EngineProcess,
    loop_env: str,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    rdb: redis.Redis,
) -> None:
    gw = make_gateway([engine.url], feedback={"database_url": loop_env})
    name = make_adapter(tiny_model, loop_env, tmp_path, 1, seed=5)
    wait_for_backends(redis_url)
    monkeypatch.setenv("PAIRLOOP_AB_FRACTION", "1.0")
    assert loop._advance(TrainerSettings(), name) == ("challenger", None)
    assert statuses(loop_env) == {name: "challenger"}
    deadline = time.monotonic() + 5
    served: set[str] = set()
    while served != {MODEL_NAME, name}:
        assert time.monotonic() < deadline, served
        served = {c["adapter"] for c in chat_pair(gw.url, max_tokens=8)["pairloop"]["choices"]}

    # while it is on trial the check starts no round, however many new examples wait: the next round's parent is
    # whoever wins the trial
    engine = create_engine(loop_env)
    with Session(engine) as session, session.begin():
        for i in range(12):
            pair = record(f"Short {i}.", f"A longer answer {i}.")
            save_event(session, event(pair, judge=f"j{i % 8}", preference="0"))
    engine.dispose()
    out = loop.check()
    assert out["round"] == "waiting for the A/B test" and out["ab"]["decision"] == "wait", out
    assert rdb.llen("rq:queue:pairloop-training") == 0


def test_a_round_over_its_budget_stops_and_leaves_the_champion(
    loop_env: str, redis_url: str, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round with far more work than its one-second budget stops at the end of a step, is marked so, makes no
    adapter and changes nothing that is served; what it took stays taken (it is not retried for ever)."""
    engine = create_engine(loop_env)
    with Session(engine) as session, session.begin():
        for i in range(40):
            save_event(
                session, event(record(f"Short {i}.", f"A longer answer {i}."), judge=f"j{i % 8}", preference="0")
            )
    monkeypatch.setenv("PAIRLOOP_ROUND_BUDGET_S", "1")
    monkeypatch.setenv("PAIRLOOP_TRAIN__EPOCHS", "500")
    before = rdb.get(ROUTING_KEY)
    started = time.monotonic()

    result = loop.train_round("manual")

    elapsed = time.monotonic() - started
    assert result["status"] == "over_budget", result
    assert "budget of 1 s" in result["error"] and "training steps" in result["error"]
    done, planned = (int(n) for n in re.search(r"after (\d+) of (\d+)", result["error"]).groups())  # type: ignore[union-attr]
    assert done < planned / 10, result["error"]
    assert elapsed < 120, f"500 epochs would take far longer; the round took {elapsed:.0f} s"
    assert statuses(loop_env) == {}  # no adapter registered
    assert rdb.get(ROUTING_KEY) == before and not rdb.exists(LOCK_KEY)
    with Session(engine) as session:
        rounds = registry.rounds(session)
        assert [(r.status, r.new_examples > 0) for r in rounds] == [("over_budget", True)]
        assert loop.count_new(session, TrainerSettings()) == 0
    engine.dispose()
