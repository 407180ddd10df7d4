"""The full path, on real parts: a chat request to vLLM, `POST /v1/feedback`, the RQ queue, a worker, the
store (SQLite and PostgreSQL), an export. Against the machine's Redis and against the embedded Valkey
(AOF on, so the API waits for `WAITAOF` before answering 202)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.local.engine import EngineProcess
from tests.feedback_helpers import chat_pair, drain, send, stored_completions, stored_feedback, vote
from tests.gateway_helpers import GatewayFactory

pytestmark = pytest.mark.slow


# Every kind of text the API accepts (any Unicode, tab, newline), through Redis and the worker into SQLite and
# PostgreSQL unchanged.
COMMENT = (
    'the second is kinder:\tmerci, \u00e9t\u00e9\n\u4e2d\u6587 \u05e2\u05d1\u05e8\u05d9\u05ea \U0001f600 "quoted" \\'
)


@pytest.fixture(params=["machine-redis", "embedded-valkey"])
def queue_redis(request: pytest.FixtureRequest, redis_url: str) -> tuple[str, str]:
    """(Redis URL, durability): the machine's Redis 7.0 has no WAITAOF, the embedded Valkey has AOF on."""
    if request.param == "machine-redis":
        request.getfixturevalue("rdb")  # flushed
        return redis_url, "none"
    return request.getfixturevalue("valkey").url, "aof"


def test_chat_to_store_to_export(
    engine: EngineProcess,
    make_gateway: GatewayFactory,
    queue_redis: tuple[str, str],
    store_url: str,
    tmp_path: Path,
) -> None:
    redis_url, durability = queue_redis
    gw = make_gateway(
        [engine.url],
        redis_url=redis_url,
        feedback={"database_url": store_url, "feedback_durability": durability},
    )
    first = chat_pair(gw.url, user="alice")
    second = chat_pair(gw.url, user="alice")
    third = chat_pair(gw.url, user="bob")
    for body in (
        vote(first, preference=1, comment=COMMENT),
        vote(second, "rating", choice=0, rating="up"),
        vote(second, "rating", choice=1, rating="down"),
        vote(third, preference="tie"),
    ):
        resp = send(gw.url, body)
        assert resp.status_code == 202, resp.text
        assert resp.json()["id"] == body["feedback_id"]

    drain(redis_url, store_url)

    completions = stored_completions(store_url)
    assert set(completions) == {first["id"], second["id"], third["id"]}
    for served in (first, second, third):
        row = completions[served["id"]]
        assert [row.text_a, row.text_b] == [c["message"]["content"] for c in served["choices"]]
        assert [row.adapter_a, row.adapter_b] == [c["adapter"] for c in served["pairloop"]["choices"]]
        assert row.key_id == "full" and row.messages == [{"role": "user", "content": "Tell me about tea."}]
    assert completions[third["id"]].user == "bob"

    events = stored_feedback(store_url)
    assert len(events) == 4
    pairwise = next(f for f in events.values() if f.completion_id == first["id"])
    assert (pairwise.kind, pairwise.preference, pairwise.judge_user, pairwise.judge_key_id) == (
        "pairwise",
        "1",
        "alice",
        "full",
    )
    assert pairwise.comment == COMMENT and not pairwise.user_written

    out = tmp_path / "dpo.jsonl"
    env = {"PAIRLOOP_DATABASE_URL": store_url, "PAIRLOOP_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "deploy", "export", "--kind", "dpo", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["rows"] == 2 and report["events"] == 4 and report["skipped"] == {"tie": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_completion = {r["completion_id"]: r for r in rows}
    texts = [c["message"]["content"] for c in first["choices"]]
    assert by_completion[first["id"]]["chosen"] == [{"role": "assistant", "content": texts[1]}]
    assert by_completion[first["id"]]["rejected"] == [{"role": "assistant", "content": texts[0]}]
    texts = [c["message"]["content"] for c in second["choices"]]
    assert by_completion[second["id"]]["chosen"][0]["content"] == texts[0]
    assert by_completion[second["id"]]["prompt"] == [{"role": "user", "content": "Tell me about tea."}]
