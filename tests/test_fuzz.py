"""Garbage in, a clear 4xx out: the gateway never answers 5xx to a malformed request, and records nothing."""

from __future__ import annotations

import json

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway_helpers import KEYS

pytestmark = pytest.mark.slow

FIELDS = ["messages", "model", "n", "temperature", "top_p", "max_tokens", "stop", "seed", "stream", "user", "tools"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", "x"]), "content": values}), max_size=3
)
bodies = st.fixed_dictionaries({}, optional={f: values for f in FIELDS} | {"messages": messages})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_random_bodies_never_get_a_5xx(gateway: str, redis_url: str, body: dict) -> None:
    # Only bodies the gateway must refuse: a valid one would be served, which is not what this test is about.
    body["max_tokens"] = 10_000
    r = httpx.post(
        f"{gateway}/v1/chat/completions",
        content=json.dumps(body, allow_nan=True),
        headers={"Authorization": f"Bearer {KEYS['full'].key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]


def test_nothing_was_recorded_by_refused_requests(gateway: str, rdb: redis.Redis) -> None:
    for body in (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10000}', b"\xff\xfe"):
        r = httpx.post(
            f"{gateway}/v1/chat/completions",
            content=body,
            headers={"Authorization": f"Bearer {KEYS['full'].key}", "Content-Type": "application/json"},
        )
        assert 400 <= r.status_code < 500
    assert not list(rdb.scan_iter("pairloop:completion:*"))
