"""Helpers of the feedback tests: chat and feedback calls, draining the queue in-process, reading the store."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import redis
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from deploy.migrations import upgrade
from feedback import jobs
from feedback.queue import Claim, FeedbackQueue
from feedback.schema import FeedbackEvent
from feedback.settings import FeedbackSettings, QueueSettings
from feedback.store import Completion, Feedback
from serving import records, tokens
from serving.protocol import CompletionRecord, SamplingParams, ServedChoice
from tests.gateway_helpers import KEYS, MODEL_NAME, SECRET
from workers.runner import make_worker
from workers.settings import WorkerSettings

PROMPT = [{"role": "user", "content": "Tell me about tea."}]


def auth(key: str = "full") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key].key.get_secret_value()}"}


def chat(base: str, key: str = "full", **body: Any) -> dict[str, Any]:
    payload = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 24, **body}
    resp = httpx.post(f"{base}/v1/chat/completions", json=payload, headers=auth(key), timeout=60)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def chat_pair(base: str, key: str = "full", **body: Any) -> dict[str, Any]:
    """A chat response whose two texts differ (an identical pair, rare, would be dropped from exports)."""
    for _ in range(10):
        data = chat(base, key, **body)
        if data["choices"][0]["message"]["content"] != data["choices"][1]["message"]["content"]:
            return data
    raise AssertionError("ten identical pairs in a row")


def vote(completion: dict[str, Any], kind: str = "pairwise", **fields: Any) -> dict[str, Any]:
    """A feedback body on `completion` (a chat response), with a fresh feedback_id unless given."""
    body = {
        "completion_id": completion["id"],
        "feedback_token": completion["pairloop"]["feedback_token"],
        "feedback_id": str(uuid.uuid4()),
        "kind": kind,
        **fields,
    }
    if kind == "pairwise":
        body.setdefault("preference", 0)
    return {k: v for k, v in body.items() if v is not None}


def send(base: str, body: Any, key: str = "full", **kw: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/feedback", json=body, headers=auth(key), timeout=30, **kw)


def submit_events(redis_url: str, settings: QueueSettings, events: list[FeedbackEvent], claimed: bool = False) -> None:
    """Queue `events` as the API does, on the queue `settings` names (a worker's settings do): each completion's
    record in Redis, then the event (with a claim on its feedback id when `claimed`)."""
    api = (
        settings
        if isinstance(settings, FeedbackSettings)
        else FeedbackSettings(**{name: getattr(settings, name) for name in QueueSettings.model_fields})
    )

    async def run() -> None:
        async with AsyncRedis.from_url(redis_url) as client:
            queue = FeedbackQueue(client, api)
            for e in events:
                await records.save(client, e.completion, 3600)
                claims = [Claim(f"t:{e.feedback_id}", "1", 60)] if claimed else []
                payload = e.queued().model_dump(mode="json")
                assert await queue.submit(e.feedback_id, payload, claims, records.record_key(e.completion.id)) is None

    asyncio.run(run())


def drain(redis_url: str, store_url: str, **settings: Any) -> None:
    """Run a real RQ worker in this process until the queue is empty."""
    ws = WorkerSettings(database_url=store_url, **settings)
    upgrade(store_url)
    jobs.configure(store_url)
    connection = redis.Redis.from_url(redis_url)
    make_worker(connection, ws).work(burst=True, logging_level="WARNING")
    connection.close()


@contextlib.contextmanager
def session(store_url: str) -> Iterator[Session]:
    engine = create_engine(store_url)
    try:
        with Session(engine) as db:
            yield db
    finally:
        engine.dispose()


def stored_feedback(store_url: str) -> dict[str, Feedback]:
    with session(store_url) as db:
        return {f.id: f for f in db.scalars(select(Feedback))}


def stored_completions(store_url: str) -> dict[str, Completion]:
    with session(store_url) as db:
        return {c.id: c for c in db.scalars(select(Completion))}


def count_feedback(store_url: str) -> int:
    with session(store_url) as db:
        return int(db.scalar(select(func.count()).select_from(Feedback)) or 0)


def seed_completions(
    redis_url: str,
    n: int,
    *,
    key_id: str = "full",
    user: str | None = None,
    users: int = 0,
    secret: str = SECRET,
    ttl_s: int = 3600,
) -> list[dict[str, Any]]:
    """`n` served-completion records written straight into Redis, as the gateway records them, with their
    feedback tokens (signed with `secret`): for tests and benches that need many completions faster than vLLM can
    serve them. Served to `user`, or with `users` to `user-0` … `user-<users - 1>` in turn."""
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    out = []
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            cid = f"chatcmpl-seed{uuid.uuid4().hex}"
            record = CompletionRecord(
                id=cid,
                model=MODEL_NAME,
                messages=PROMPT,
                sampling=SamplingParams(n=2, temperature=1.0, max_tokens=24),
                choices=[
                    ServedChoice(index=0, text=f"Answer A{i}.", finish_reason="stop", adapter=MODEL_NAME),
                    ServedChoice(index=1, text=f"Answer B{i}.", finish_reason="stop", adapter=MODEL_NAME),
                ],
                key_id=key_id,
                user=f"user-{i % users}" if users else user,
                stream=False,
                created_at=now,
                finished_at=now,
                expires_at=now + ttl_s,
            )
            pipe.set(records.record_key(cid), record.model_dump_json(), ex=ttl_s)
            token = tokens.issue(secret.encode(), cid, key_id, int(now + ttl_s))
            out.append({"id": cid, "pairloop": {"feedback_token": token}})
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
    client.close()
    return out
