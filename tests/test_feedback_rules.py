"""The rules of `POST /v1/feedback`: each refusal has its status and OpenAI-shaped error, and leaves nothing in
the queue or the store; retries are idempotent; votes are one per judge; limits answer 429."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from deploy.local.engine import EngineProcess
from deploy.local.redis_server import EmbeddedRedis
from feedback.queue import status
from serving import tokens
from serving.ratelimit import RateLimit
from tests.feedback_helpers import auth, chat, chat_pair, drain, send, stored_feedback, vote
from tests.gateway_helpers import SECRET, GatewayFactory, ServerThread
from workers.settings import WorkerSettings

pytestmark = pytest.mark.slow


def queued(redis_url: str) -> int:
    return status(redis.Redis.from_url(redis_url), WorkerSettings()).queued


def error(resp: httpx.Response, status_code: int) -> dict[str, Any]:
    assert resp.status_code == status_code, resp.text
    body: dict[str, Any] = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


@pytest.fixture
def gw(engine: EngineProcess, make_gateway: GatewayFactory, rdb: redis.Redis, tmp_path: Path) -> ServerThread:
    return make_gateway([engine.url], max_body_bytes=16 * 1024, feedback={"feedback_max_comment_chars": 100})


def test_every_refusal_has_its_status_and_stores_nothing(
    gw: ServerThread, redis_url: str, rdb: redis.Redis, tmp_path: Path
) -> None:
    pair = chat_pair(gw.url, user="alice")
    single = chat(gw.url, n=1)
    other_key = chat(gw.url, key="chat")  # served to another API key
    anonymous = chat_pair(gw.url)  # served without `user`: its judge is the API key
    good = vote(pair)
    now = int(time.time())

    cases: list[tuple[str, dict[str, Any] | str, str, int, str | None]] = [
        # (what, body, key, status, param)
        ("unknown completion", {**good, "completion_id": "chatcmpl-nope"}, "full", 404, "completion_id"),
        (
            "expired completion",
            {
                **good,
                "completion_id": "chatcmpl-old",
                "feedback_token": tokens.issue(SECRET.encode(), "chatcmpl-old", "full", now - 10),
            },
            "full",
            410,
            "completion_id",
        ),
        ("forged token", {**good, "feedback_token": "v1.e30.forged"}, "full", 403, "feedback_token"),
        (
            "expired token",
            {**good, "feedback_token": tokens.issue(SECRET.encode(), pair["id"], "full", now - 10)},
            "full",
            403,
            "feedback_token",
        ),
        (
            "token of another completion",
            {**good, "feedback_token": single["pairloop"]["feedback_token"]},
            "full",
            403,
            "feedback_token",
        ),
        ("another key's completion", vote(other_key), "full", 403, "feedback_token"),
        ("key without the feedback scope", vote(other_key), "chat", 403, None),
        ("another user", {**good, "user": "mallory"}, "full", 403, "user"),
        ("a user on a completion served without one", vote(anonymous, user="sock-puppet-1"), "full", 403, "user"),
        ("preference true", {**good, "preference": True}, "full", 422, "preference"),
        ("preference false", {**good, "preference": False}, "full", 422, "preference"),
        ("preference 0.0", {**good, "preference": 0.0}, "full", 422, "preference"),
        ("preference '1'", {**good, "preference": "1"}, "full", 422, "preference"),
        ("choice '1'", vote(pair, "rating", choice="1", rating="up"), "full", 422, "choice"),
        ("choice true", vote(pair, "rating", choice=True, rating="up"), "full", 422, "choice"),
        ("choice 1.0", vote(pair, "rating", choice=1.0, rating="up"), "full", 422, "choice"),
        ("NUL in a comment", {**good, "comment": "ok\x00"}, "full", 422, "comment"),
        ("escape in the user", {**good, "user": "alice\x1b[2J"}, "full", 422, "user"),
        ("non-ASCII token signature", {**good, "feedback_token": "v1.e30.\u00e9\u00e9"}, "full", 403, "feedback_token"),
        ("token of three dots", {**good, "feedback_token": "..."}, "full", 403, "feedback_token"),
        ("choice out of range", vote(pair, "rating", choice=2, rating="up"), "full", 422, "choice"),
        ("pairwise on a single choice", vote(single), "full", 422, "kind"),
        ("unknown field", {**good, "text": "I wrote this"}, "full", 422, "text"),
        ("unknown kind", {**good, "kind": "stars"}, "full", 422, "kind"),
        ("bad preference", {**good, "preference": 2}, "full", 422, "preference"),
        ("missing token", {k: v for k, v in good.items() if k != "feedback_token"}, "full", 422, "feedback_token"),
        ("not a UUID", {**good, "feedback_id": "abc"}, "full", 422, "feedback_id"),
        ("edits are off", vote(pair, "edit", choice=0, text="Better."), "full", 422, "kind"),
        ("comment too long", {**good, "comment": "x" * 101}, "full", 422, "comment"),
        ("body too large", {**good, "comment": "x" * 20_000}, "full", 413, None),
        ("malformed JSON", "{not json", "full", 400, None),
    ]
    for what, body, key, status_code, param in cases:
        if isinstance(body, str):
            resp = httpx.post(
                f"{gw.url}/v1/feedback", content=body, headers={**auth(key), "Content-Type": "application/json"}
            )
        else:
            resp = send(gw.url, body, key=key)
        err = error(resp, status_code)
        assert err["param"] == param, (what, err)
    resp = httpx.post(f"{gw.url}/v1/feedback", json=good)
    error(resp, 401)

    # Nothing was queued, claimed or stored by any of them; the good vote is still possible.
    assert queued(redis_url) == 0
    assert not list(rdb.scan_iter("pairloop:feedback:*"))
    assert send(gw.url, good).status_code == 202
    store_url = f"sqlite:///{tmp_path / 'pairloop.db'}"
    drain(redis_url, store_url)
    assert list(stored_feedback(store_url)) == [good["feedback_id"]]


def test_retries_are_idempotent_and_the_first_vote_stands(
    gw: ServerThread, redis_url: str, rdb: redis.Redis, tmp_path: Path
) -> None:
    pair = chat_pair(gw.url, user="alice")
    body = vote(pair, preference=0)
    answers = [send(gw.url, body) for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert answers[0].json() == answers[1].json() == answers[2].json()

    # The same feedback_id for a different event: 409, and the first event is untouched.
    err = error(send(gw.url, {**body, "comment": "changed my mind"}), 409)
    assert err["param"] == "feedback_id"
    # A different vote by the same user under a new id: 409, the first vote stands.
    err = error(send(gw.url, vote(pair, preference=1)), 409)
    assert body["feedback_id"] in err["message"]
    # The same vote again under a new id (a client retry that lost its id): the first answer again.
    again = send(gw.url, vote(pair, preference=0))
    assert again.status_code == 202 and again.json()["id"] == body["feedback_id"]
    # Without a feedback_id the server makes one.
    rating = send(gw.url, vote(pair, "rating", choice=1, rating="up", feedback_id=None))
    assert rating.status_code == 202 and uuid.UUID(rating.json()["id"])

    assert queued(redis_url) == 2
    store_url = f"sqlite:///{tmp_path / 'pairloop.db'}"
    drain(redis_url, store_url)
    events = stored_feedback(store_url)
    assert set(events) == {body["feedback_id"], rating.json()["id"]}
    assert events[body["feedback_id"]].preference == "0" and events[body["feedback_id"]].comment is None


def test_edits_when_turned_on(
    engine: EngineProcess, make_gateway: GatewayFactory, redis_url: str, rdb: redis.Redis, tmp_path: Path
) -> None:
    gw = make_gateway([engine.url], feedback={"feedback_allow_edits": True, "feedback_max_edit_chars": 50})
    pair = chat_pair(gw.url)
    err = error(send(gw.url, vote(pair, "edit", choice=0, text="y" * 51)), 422)
    assert err["param"] == "text"
    body = vote(pair, "edit", choice=1, text="Hello! Tea is a drink.")
    assert send(gw.url, body).status_code == 202
    store_url = f"sqlite:///{tmp_path / 'pairloop.db'}"
    drain(redis_url, store_url)
    event = stored_feedback(store_url)[body["feedback_id"]]
    assert event.user_written and event.edit_text == "Hello! Tea is a drink." and event.choice == 1


def test_rate_limits_per_key_and_per_user(
    engine: EngineProcess, make_gateway: GatewayFactory, rdb: redis.Redis
) -> None:
    gw = make_gateway(
        [engine.url],
        chat_limit_per_user=RateLimit(per_s=0.01, burst=1),
        feedback_limit_per_user=RateLimit(per_s=0.01, burst=1),
        feedback_limit_per_key=RateLimit(per_s=0.01, burst=3),
    )
    a, b = chat(gw.url, user="u1"), chat(gw.url, user="u2")
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "pairloop-tiny", "messages": [{"role": "user", "content": "hi"}], "user": "u1"},
        headers=auth(),
    )
    err = error(resp, 429)
    assert int(resp.headers["Retry-After"]) >= 1 and "user" in err["message"]
    chat(gw.url, user="u3")  # another user of the same key is not limited

    assert send(gw.url, vote(a, "rating", choice=0, rating="up")).status_code == 202
    resp = send(gw.url, vote(a, "rating", choice=1, rating="down"))
    assert error(resp, 429) and int(resp.headers["Retry-After"]) >= 1
    assert send(gw.url, vote(b, "rating", choice=0, rating="up")).status_code == 202
    c = chat(gw.url, user="u4")
    assert send(gw.url, vote(c, "rating", choice=0, rating="up")).status_code == 202
    d = chat(gw.url, user="u5")
    resp = send(gw.url, vote(d, "rating", choice=0, rating="up"))
    assert "API key" in error(resp, 429)["message"]


def test_redis_unreachable_is_503_with_retry_after(
    engine: EngineProcess, make_gateway: GatewayFactory, rdb: redis.Redis
) -> None:
    gw = make_gateway([engine.url], redis_url="redis://127.0.0.1:1/0")
    body = vote({"id": "chatcmpl-x", "pairloop": {"feedback_token": "v1.e30.x"}})
    resp = send(gw.url, body)
    error(resp, 503)
    assert int(resp.headers["Retry-After"]) == 3


def test_no_aof_means_no_202(engine: EngineProcess, make_gateway: GatewayFactory, valkey: EmbeddedRedis) -> None:
    """With durability `aof` (the default) a Redis that cannot confirm an fsync gets 503, not a false 202."""
    redis.Redis.from_url(valkey.url).config_set("appendonly", "no")
    gw = make_gateway([engine.url], redis_url=valkey.url, feedback={"feedback_durability": "aof"})
    pair = chat_pair(gw.url)
    resp = send(gw.url, vote(pair))
    assert "appendonly" in error(resp, 503)["message"]


def test_stats_for_admins(
    engine: EngineProcess, make_gateway: GatewayFactory, redis_url: str, rdb: redis.Redis, tmp_path: Path
) -> None:
    gw = make_gateway([engine.url])
    for user, pref in (("u1", 0), ("u1", 0), ("u2", 1)):
        assert send(gw.url, vote(chat_pair(gw.url, user=user), preference=pref)).status_code == 202
    drain(redis_url, f"sqlite:///{tmp_path / 'pairloop.db'}")
    error(httpx.get(f"{gw.url}/v1/feedback/stats", headers=auth("feedback")), 403)
    stats = httpx.get(f"{gw.url}/v1/feedback/stats", headers=auth()).json()
    assert stats["events"] == 3 and stats["by_kind"] == {"pairwise": 3}
    assert stats["pairwise"]["a_wins"] == 2 and stats["pairwise"]["b_wins"] == 1
    assert stats["pairwise"]["a_win_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert stats["by_adapter"]["pairloop-tiny"] == {"wins": 3, "losses": 3, "up": 0, "down": 0}
    assert stats["top_users"][0] == {
        "key_id": "full",
        "user": "u1",
        "events": 2,
        "share": pytest.approx(2 / 3, abs=1e-3),
    }
    assert httpx.get(f"{gw.url}/openapi.json").status_code == 200
