"""The served-completion records, kept in Redis with a TTL; feedback refers to them by completion id."""

from __future__ import annotations

import redis
from redis.asyncio import Redis

from serving.protocol import CompletionRecord

KEY_PREFIX = "pairloop:completion:"


def record_key(completion_id: str) -> str:
    return KEY_PREFIX + completion_id


async def save(redis: Redis, record: CompletionRecord, ttl_s: int) -> None:
    """Store `record` for `ttl_s` seconds. Raises redis errors; the caller must then not serve the answer."""
    await redis.set(record_key(record.id), record.model_dump_json(), ex=ttl_s)


async def load(redis: Redis, completion_id: str) -> CompletionRecord | None:
    """The record, or None when it never existed or has expired."""
    raw = await redis.get(record_key(completion_id))
    return None if raw is None else CompletionRecord.model_validate_json(raw)


def load_sync(client: redis.Redis, completion_id: str) -> CompletionRecord | None:
    """`load` for a synchronous client (the feedback worker's)."""
    raw = client.get(record_key(completion_id))
    return None if raw is None else CompletionRecord.model_validate_json(raw)
