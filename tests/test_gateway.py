"""The gateway over a real vLLM (CPU build) serving the tiny model, driven by the official OpenAI SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletion
from prometheus_client.parser import text_string_to_metric_families

from serving import tokens
from serving.settings import ServingSettings
from tests.gateway_helpers import KEYS, MODEL_NAME, SECRET

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Tell me about coffee."}]


@pytest.fixture
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEYS["full"].key.get_secret_value(), max_retries=0)


def stored(rdb: redis.Redis, completion_id: str) -> dict:
    raw = rdb.get(f"pairloop:completion:{completion_id}")
    assert raw is not None, "the served completion was not recorded"
    return json.loads(raw)


def record_count(rdb: redis.Redis) -> int:
    return len(list(rdb.scan_iter("pairloop:completion:*")))


def test_two_choices_by_default_and_the_record_matches(client: openai.OpenAI, rdb: redis.Redis) -> None:
    # seeded: unseeded, the tiny model sometimes samples its end token first, and a choice is empty
    resp = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=40, user="alice", seed=11)
    assert len(resp.choices) == 2
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content for c in resp.choices)
    ext = resp.model_extra["pairloop"]
    assert [c["adapter"] for c in ext["choices"]] == [MODEL_NAME, MODEL_NAME]

    rec = stored(rdb, resp.id)
    assert [c["text"] for c in rec["choices"]] == [c.message.content for c in resp.choices]
    assert [c["finish_reason"] for c in rec["choices"]] == [c.finish_reason for c in resp.choices]
    assert [c["adapter"] for c in rec["choices"]] == [MODEL_NAME, MODEL_NAME]
    assert rec["messages"] == PROMPT
    assert rec["sampling"]["n"] == 2 and rec["sampling"]["max_tokens"] == 40 and rec["sampling"]["temperature"] == 1
    assert rec["key_id"] == "full" and rec["user"] == "alice"
    assert KEYS["full"].key.get_secret_value() not in json.dumps(rec)
    assert rec["created_at"] <= rec["finished_at"] < rec["expires_at"]
    ttl = rdb.ttl(f"pairloop:completion:{resp.id}")
    window = ServingSettings.model_fields["record_ttl_s"].default  # the feedback window: a day
    assert window == 24 * 3600 and window - 60 < ttl <= window

    claims = tokens.verify(SECRET.encode(), ext["feedback_token"], completion_id=resp.id, key_id="full")
    assert claims.expires_at == ext["expires_at"]
    assert resp.usage and resp.usage.completion_tokens > 0


def test_n1_gives_one_choice(client: openai.OpenAI, rdb: redis.Redis) -> None:
    resp = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=20, n=1)
    assert len(resp.choices) == 1
    assert len(stored(rdb, resp.id)["choices"]) == 1


def test_temperature_zero_is_allowed_for_one_choice(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=10, n=1, temperature=0)
    assert len(resp.choices) == 1


def test_streaming_interleaves_choices_and_ends_with_a_token(client: openai.OpenAI, rdb: redis.Redis) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=PROMPT, max_tokens=30, stream=True, stream_options={"include_usage": True}
    )
    texts: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str | None] = {}
    order: list[int] = []
    ext = None
    usage = None
    ids = set()
    for chunk in stream:
        ids.add(chunk.id)
        for c in chunk.choices:
            order.append(c.index)
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        if chunk.model_extra and "pairloop" in chunk.model_extra:
            ext = chunk.model_extra["pairloop"]
        if chunk.usage:
            usage = chunk.usage
    assert len(ids) == 1
    (cid,) = ids
    assert set(order) == {0, 1}
    # interleaved: both choices appear before either one is finished
    first_switch = next(i for i, idx in enumerate(order) if idx != order[0])
    assert first_switch < len(order) - 1
    assert ext is not None and tokens.verify(SECRET.encode(), ext["feedback_token"], completion_id=cid, key_id="full")
    assert usage is not None and usage.completion_tokens > 0
    rec = stored(rdb, cid)
    assert [c["text"] for c in rec["choices"]] == [texts[0], texts[1]]
    assert [c["finish_reason"] for c in rec["choices"]] == [finish[0], finish[1]]
    assert rec["stream"] is True


def test_stream_raw_sse_ends_with_done(gateway: str) -> None:
    body = {"messages": PROMPT, "stream": True, "max_tokens": 5}
    with httpx.stream(
        "POST",
        f"{gateway}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"pairloop"' in lines[-2]


def test_more_than_two_choices_is_refused(client: openai.OpenAI, rdb: redis.Redis) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, n=3)
    assert "n=3" in err.value.message
    assert err.value.body["param"] == "n"
    assert record_count(rdb) == 0


def test_temperature_zero_pairs_are_refused(client: openai.OpenAI, rdb: redis.Redis) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, temperature=0)
    assert err.value.body["param"] == "temperature"
    assert record_count(rdb) == 0


def test_unknown_model_is_404(client: openai.OpenAI, rdb: redis.Redis) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=PROMPT)
    assert err.value.code == "model_not_found"
    assert record_count(rdb) == 0


def test_pinning_the_base_model_and_refusing_an_unserved_version(client: openai.OpenAI, rdb: redis.Redis) -> None:
    resp = client.chat.completions.create(model=f"{MODEL_NAME}@base", messages=PROMPT, max_tokens=8, n=1)
    assert [c["adapter"] for c in resp.model_extra["pairloop"]["choices"]] == [MODEL_NAME]
    assert resp.model == MODEL_NAME
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=f"{MODEL_NAME}@pl-v9999-deadbeef", messages=PROMPT)
    assert err.value.code == "model_not_found"
    assert f"'{MODEL_NAME}@base'" in err.value.message
    assert record_count(rdb) == 1


def test_a_chat_without_max_tokens_stops_at_the_default(gateway: str, rdb: redis.Redis) -> None:
    """Not at the model's whole context: the gateway's PAIRLOOP_MAX_TOKENS_DEFAULT (here 6) reaches vLLM."""
    r = post(gateway, json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}], "seed": 1}))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["usage"]["completion_tokens"] <= 2 * 6
    assert all(c["finish_reason"] == "length" for c in data["choices"]), data["choices"]
    record = json.loads(rdb.get(f"pairloop:completion:{data['id']}"))
    assert record["sampling"]["max_tokens"] == 6


def test_max_tokens_over_the_limit_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=5000)
    assert err.value.body["param"] == "max_tokens"


def test_prompt_longer_than_the_context_is_a_client_error(client: openai.OpenAI, rdb: redis.Redis) -> None:
    long = [{"role": "user", "content": "coffee " * 400}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=long, max_tokens=10)
    assert record_count(rdb) == 0


def post(gateway: str, content: bytes | str, key: str = "full", **headers: str) -> httpx.Response:
    h = {"Authorization": f"Bearer {KEYS[key].key.get_secret_value()}", "Content-Type": "application/json", **headers}
    return httpx.post(f"{gateway}/v1/chat/completions", content=content, headers=h, timeout=30)


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b"{not json", 400, "JSON"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "tools": []}', 422, "tools"),
        (b'{"model": "pairloop-tiny"}', 422, "messages"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', 422, "messages.0.role"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', 422, "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 0}', 422, "n"),
        (b'{"messages": []}', 422, "messages"),
        (b"[1, 2]", 422, "body"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "user": "a\\u0000b"}', 422, "user"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-9}', 400, "temperature"),
        # vLLM raises 0.005 to 0.01 and samples both choices alike there
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 0.005}', 400, "temperature"),
        # a lone surrogate cannot be written as UTF-8: not to Redis, not to vLLM
        (b'{"messages": [{"role": "user", "content": "hi"}], "user": "\\ud800"}', 422, "user"),
        (b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}', 422, "messages.0.content"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', 422, "content"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}', 422, "stop"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\ud800"}', 422, "model"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e-9}', 400, "top_p"),
    ],
)
def test_bad_input_gets_a_clear_4xx(gateway: str, rdb: redis.Redis, body: bytes, status: int, names: str) -> None:
    r = post(gateway, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert names in err["message"]
    assert err["type"] == "invalid_request_error"
    assert record_count(rdb) == 0


def test_body_over_the_limit_is_413(gateway: str, rdb: redis.Redis) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}] * 3})
    r = post(gateway, big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert record_count(rdb) == 0


def test_chunked_body_over_the_limit_is_413(gateway: str) -> None:
    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(100):
            yield b" " * 1024

    r = httpx.post(
        f"{gateway}/v1/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}"},
        timeout=30,
    )
    assert r.status_code == 413


def test_auth_and_scopes(gateway: str) -> None:
    ok = json.dumps({"messages": PROMPT, "max_tokens": 5})
    assert httpx.post(f"{gateway}/v1/chat/completions", content=ok).status_code == 401
    r = post(gateway, ok, Authorization="Bearer sk-wrong-wrong-wrong-wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = post(gateway, ok, key="feedback")
    assert r.status_code == 403 and "chat" in r.json()["error"]["message"]
    assert post(gateway, ok, key="chat").status_code == 200
    # garbage from an unauthenticated caller is still a 401, not a validation answer
    assert httpx.post(f"{gateway}/v1/chat/completions", content=b"{bad").status_code == 401


def test_models_lists_the_public_model(client: openai.OpenAI, gateway: str) -> None:
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    assert httpx.get(f"{gateway}/v1/models").status_code == 401


def metric_values(gateway: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the gateway's /metrics: (name, labels) to value."""
    text = httpx.get(f"{gateway}/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_health_readiness_and_metrics_that_move(client: openai.OpenAI, gateway: str) -> None:
    assert httpx.get(f"{gateway}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway}/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] is True

    before = metric_values(gateway)
    resp = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=5)
    bad = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 0},
        headers={"Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}"},
    )
    after = metric_values(gateway)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    chat_route = {"route": "/v1/chat/completions"}
    assert moved("pairloop_requests_total", **chat_route, status="200") == 1
    assert moved("pairloop_requests_total", **chat_route, status=str(bad.status_code)) == 1
    assert bad.status_code == 422 and moved("pairloop_errors_total", type="invalid_request_error") == 1
    assert moved("pairloop_request_seconds_count", **chat_route) == 2
    assert moved("pairloop_request_seconds_sum", **chat_route) > 0
    assert resp.usage is not None
    assert moved("pairloop_tokens_total", kind="prompt") == resp.usage.prompt_tokens > 0
    assert moved("pairloop_tokens_total", kind="completion") == resp.usage.completion_tokens > 0
    assert moved("pairloop_completions_recorded_total") == 1
    assert after[("pairloop_backends_healthy", frozenset())] == 1


def test_chunked_body_under_the_limit_is_served(gateway: str) -> None:
    body = json.dumps({"messages": PROMPT, "max_tokens": 5, "n": 1}).encode()
    r = httpx.post(
        f"{gateway}/v1/chat/completions",
        content=iter([body[:10], body[10:]]),
        headers={"Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_stop_strings_and_seed_reach_vllm(client: openai.OpenAI, rdb: redis.Redis) -> None:
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=PROMPT, max_tokens=40, seed=7, stop=["coffee", "\n\nUser:"]
    )
    assert all("coffee" not in (c.message.content or "") for c in resp.choices)
    assert stored(rdb, resp.id)["sampling"]["stop"] == ["coffee", "\n\nUser:"]
    assert stored(rdb, resp.id)["sampling"]["seed"] == 7
    # vLLM samples by the seed: the same seeded request gets the same two answers, another seed others
    texts = [[c.message.content for c in r.choices] for r in (resp, seeded(client, 7), seeded(client, 8))]
    assert all(texts[0]) and texts[1] == texts[0] and texts[2] != texts[0], texts


def seeded(client: openai.OpenAI, seed: int) -> ChatCompletion:
    return client.chat.completions.create(
        model=MODEL_NAME, messages=PROMPT, max_tokens=40, seed=seed, stop=["coffee", "\n\nUser:"]
    )
