"""Garbage in, a clear 4xx out: the gateway never answers 5xx to a malformed request, and records nothing; a body
it takes is served in full (two answers, a record), streamed or not."""

from __future__ import annotations

import json

import httpx
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.records import record_key
from tests.gateway_helpers import KEYS

pytestmark = pytest.mark.slow

FIELDS = ["messages", "model", "n", "temperature", "top_p", "max_tokens", "stop", "seed", "stream", "user", "tools"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
random_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", "x"]), "content": values}), max_size=3
)
# plausible conversations too, so that many bodies pass validation and reach vLLM and the record code
plausible = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=40)}),
    min_size=1,
    max_size=3,
)
small = st.integers(1, 4)
garbage = st.fixed_dictionaries({}, optional={f: values for f in FIELDS} | {"messages": random_messages})
# bodies a client could mean, each field valid or a random value: many pass validation, some fail late
near_valid = st.fixed_dictionaries(
    {"messages": plausible | random_messages},
    optional={
        "model": st.just("pairloop-tiny") | values,
        "max_tokens": small | values,
        "n": st.sampled_from([1, 2]) | values,
        "stream": st.booleans(),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "seed": small,
        "stop": st.lists(st.text(max_size=8), max_size=4) | values,
        "user": st.text(max_size=20),
    },
)
valid = st.fixed_dictionaries(
    {"messages": plausible},
    optional={
        "max_tokens": small,
        "n": st.sampled_from([1, 2]),
        "stream": st.booleans(),
        "temperature": st.floats(0, 2),
        "seed": small,
        "user": st.text(max_size=20),
    },
)
bodies = garbage | near_valid | valid


def test_random_bodies_never_get_a_5xx_and_those_taken_are_served(gateway: str, rdb: redis.Redis) -> None:
    served: list[dict] = []  # the bodies served (at least 30 of 150: the fuzz reaches vLLM and the record code)

    @settings(max_examples=150, deadline=None, derandomize=True)  # the same bodies every run
    @given(body=bodies)
    def one(body: dict) -> None:
        body.setdefault("max_tokens", 4)  # a body served without one would take the gateway's limit: slow, not wrong
        r = httpx.post(
            f"{gateway}/v1/chat/completions",
            content=json.dumps(body, allow_nan=True),
            headers={
                "Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}",
                "Content-Type": "application/json",
            },
            timeout=60,
        )
        if r.status_code != 200:
            assert 400 <= r.status_code < 500, r.text
            assert r.json()["error"]["message"]
            return
        served.append(body)
        if r.headers["content-type"].startswith("text/event-stream"):
            lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), lines[-3:]
            completion_id = json.loads(lines[0][6:])["id"]
        else:
            data = r.json()
            assert len(data["choices"]) == body.get("n", 2) and data["pairloop"]["feedback_token"], data
            completion_id = data["id"]
        assert rdb.exists(record_key(completion_id)), "a served body leaves a record that feedback can refer to"

    one()
    assert len(served) >= 30, f"only {len(served)} of the fuzzed bodies were served: the fuzz stops at validation"


def test_nothing_was_recorded_by_refused_requests(gateway: str, rdb: redis.Redis) -> None:
    for body in (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10000}', b"\xff\xfe"):
        r = httpx.post(
            f"{gateway}/v1/chat/completions",
            content=body,
            headers={
                "Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}",
                "Content-Type": "application/json",
            },
        )
        assert 400 <= r.status_code < 500
    assert not list(rdb.scan_iter("pairloop:completion:*"))
