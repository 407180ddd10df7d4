"""Pure unit tests: feedback tokens, API keys, settings checks, the backend pool (against an aiohttp test
server), secret rotation, the training worker's CPU priority (in a child process), stopping a background loop
that loses a cancellation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import ValidationError

from deploy.local.process import free_port
from serving import chat, tasks, tokens
from serving.auth import KeyRing
from serving.backends import BackendPool
from serving.errors import Forbidden, Unauthorized, Unavailable
from serving.settings import ApiKey, ServingSettings

SECRET = b"s" * 32


def test_token_round_trip_and_every_way_it_fails() -> None:
    exp = int(time.time()) + 60
    tok = tokens.issue(SECRET, "chatcmpl-a", "k1", exp)
    assert tokens.verify(SECRET, tok, completion_id="chatcmpl-a", key_id="k1").expires_at == exp
    bad = [
        (lambda: tokens.verify(b"x" * 32, tok, completion_id="chatcmpl-a", key_id="k1"), "signature"),
        (lambda: tokens.verify(SECRET, tok, completion_id="chatcmpl-b", key_id="k1"), "another completion"),
        (lambda: tokens.verify(SECRET, tok, completion_id="chatcmpl-a", key_id="k2"), "another API key"),
        (lambda: tokens.verify(SECRET, tok, completion_id="chatcmpl-a", key_id="k1", now=exp + 1), "expired"),
        (lambda: tokens.verify(SECRET, "garbage", completion_id="chatcmpl-a", key_id="k1"), "malformed"),
        (
            lambda: tokens.verify(SECRET, tok[:-2] + "AA", completion_id="chatcmpl-a", key_id="k1"),
            "signature",
        ),
    ]
    for call, why in bad:
        with pytest.raises(tokens.TokenError, match=why):
            call()
    # the payload cannot be swapped under a valid signature
    v, _, sig = tok.split(".")
    other = tokens.issue(SECRET, "chatcmpl-b", "k1", exp).split(".")[1]
    with pytest.raises(tokens.TokenError):
        tokens.verify(SECRET, f"{v}.{other}.{sig}", completion_id="chatcmpl-b", key_id="k1")


def test_a_signed_token_with_an_absurd_expiry_or_broken_text_is_refused_not_a_crash() -> None:
    payload = tokens._b64(b'{"cid": "chatcmpl-a", "kid": "k1", "exp": 1e400}')  # JSON reads it as infinity
    forged = f"v1.{payload}.{tokens._sign(SECRET, payload)}"
    with pytest.raises(tokens.TokenError, match="malformed"):
        tokens.verify(SECRET, forged, completion_id="chatcmpl-a", key_id="k1")
    with pytest.raises(tokens.TokenError, match="malformed"):
        tokens.verify(SECRET, "v1.\ud800.x", completion_id="chatcmpl-a", key_id="k1")


def test_pairs_are_refused_where_the_installed_vllm_stops_sampling() -> None:
    """The gateway's bounds are vLLM's own constants: below 0.01 vLLM raises the temperature to 0.01 (`_MAX_TEMP`)
    and below 1e-5 it is greedy (`_SAMPLING_EPS`)."""
    from vllm import sampling_params

    assert chat.PAIR_TEMPERATURE_FROM == sampling_params._MAX_TEMP
    assert chat.GREEDY_BELOW == sampling_params._SAMPLING_EPS


def test_keyring_scopes() -> None:
    ring = KeyRing([ApiKey(id="a", key="k" * 20, scopes=["chat"])])
    assert ring.authenticate("Bearer " + "k" * 20).key_id == "a"
    for header in (None, "", "Bearer ", "Basic abc", "Bearer " + "j" * 20):
        with pytest.raises(Unauthorized):
            ring.authenticate(header)
    with pytest.raises(Forbidden):
        ring.authenticate("Bearer " + "k" * 20).require("admin")
    assert KeyRing([]).authenticate(None).scopes == {"chat", "feedback", "admin"}


def test_settings_refuse_unsafe_configurations(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="loopback"):
        ServingSettings(host="0.0.0.0")
    with pytest.raises(ValidationError, match="PAIRLOOP_SECRET"):
        ServingSettings(redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(ValidationError, match="unique"):
        ServingSettings(api_keys=[ApiKey(id="a", key="k" * 20), ApiKey(id="a", key="j" * 20)])
    monkeypatch.setenv("PAIRLOOP_VLLM_URLS", "http://127.0.0.1:1/, http://127.0.0.1:2")
    monkeypatch.setenv("PAIRLOOP_API_KEYS", '[{"id": "team", "key": "0123456789abcdef", "scopes": ["chat"]}]')
    s = ServingSettings(host="0.0.0.0")
    assert s.vllm_urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert s.api_keys[0].scopes == ["chat"]


async def test_pool_spreads_requests_and_drops_a_dead_backend() -> None:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "base", "parent": None}, {"id": "v1", "parent": "base"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    servers = [TestServer(app, host="127.0.0.1") for _ in range(2)]
    for server in servers:
        await server.start_server()
    alive = [str(server.make_url("")).rstrip("/") for server in servers]
    try:
        async with aiohttp.ClientSession() as client:
            pool = BackendPool([*alive, f"http://127.0.0.1:{free_port()}"], client)
            await pool.probe_all()
            assert [b.healthy for b in pool.backends] == [True, True, False]
            assert pool.base_model() == "base"
            assert {pool.pick().url for _ in range(4)} == set(alive)
            async with pool.lease() as first:
                # the busier backend is avoided while another is idle
                assert pool.pick().url != first.url
            pool.mark_down(pool.backends[0], "test")
            pool.mark_down(pool.backends[1], "test")
            with pytest.raises(Unavailable):
                pool.pick()
            await pool.probe_all()  # a probe brings them back
            assert pool.ready
    finally:
        for server in servers:
            await server.close()


async def test_pool_sends_the_vllm_api_key() -> None:
    async def models(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer vllm-secret":
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"data": [{"id": "base", "parent": None}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as client:
            without = BackendPool([url], client)
            with_key = BackendPool([url], client, headers={"Authorization": "Bearer vllm-secret"})
            await without.probe_all()
            await with_key.probe_all()
            assert not without.ready and with_key.ready
    finally:
        await server.close()


def test_a_rotated_secret_still_verifies_the_tokens_it_signed() -> None:
    old, new = b"o" * 32, b"n" * 32
    exp = int(time.time()) + 60
    signed_before = tokens.issue(old, "chatcmpl-a", "k1", exp)
    signed_after = tokens.issue(new, "chatcmpl-a", "k1", exp)
    for token in (signed_before, signed_after):
        assert tokens.verify((new, old), token, completion_id="chatcmpl-a", key_id="k1").expires_at == exp
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.verify((new,), signed_before, completion_id="chatcmpl-a", key_id="k1")  # the old secret retired
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.verify(
            (new, old), tokens.issue(b"x" * 32, "chatcmpl-a", "k1", exp), completion_id="chatcmpl-a", key_id="k1"
        )
    settings = ServingSettings(secret=new.decode(), secret_previous=old.decode())
    assert settings.token_secrets() == (new, old), "new tokens are signed with the current secret (the first)"
    assert ServingSettings(secret=new.decode()).token_secrets() == (new,)


@pytest.mark.parametrize(("priority", "policy", "nice"), [("idle", "SCHED_IDLE", 0), (7, "SCHED_OTHER", 7)])
def test_the_training_worker_lowers_its_priority(priority: str | int, policy: str, nice: int) -> None:
    """In a child process (a lowered priority cannot be raised again): the scheduling policy and nice value it
    ends with, and those of a thread it starts afterwards, as torch's are."""
    script = (
        "import os, threading\n"
        "from workers.runner import lower_priority\n"
        f"lower_priority({priority!r})\n"
        "out = []\n"
        "seen = lambda: out.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)))\n"
        "t = threading.Thread(target=seen)\n"
        "t.start(); t.join()\n"
        "print(os.sched_getscheduler(0), os.nice(0), *out[0])\n"
    )
    got = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    expected = getattr(os, policy)
    assert got.stdout.split() == [str(expected), str(nice), str(expected), str(nice)], got.stdout


def test_a_background_loop_that_swallows_a_cancellation_is_stopped_all_the_same() -> None:
    """What asyncio.wait_for does on Python 3.11 when a cancel() meets its inner future's completion."""
    swallowed = []

    async def loop_on() -> None:
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if not swallowed:
                    swallowed.append(True)
                    continue  # the first cancellation is lost
                raise

    async def run() -> asyncio.Task[None]:
        task = asyncio.create_task(loop_on())
        await asyncio.sleep(0.1)
        await asyncio.wait_for(tasks.stop(task), timeout=5)
        return task

    task = asyncio.run(run())
    assert swallowed and task.cancelled()
