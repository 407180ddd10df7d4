"""How every long-running part connects to Redis: bounded waits, a retry over a dead pooled connection, and a pool
that waits for a free connection instead of failing.

redis-py's `Redis.from_url` retries nothing (its pool's connections get `Retry(NoBackoff(), 0)`), so after Valkey
restarts or the network drops, every connection in the pool fails once, on its next use, before the pool learns
it is dead: a gateway under load went on answering 503 for about 8 s after a 10 s network cut ended
(docs/RELIABILITY.md). Here a command that finds its connection closed reconnects and is sent again, twice at
most, within about a second; longer outages still fail fast, as 503 with `Retry-After` at the gateway.

A command sent again may run twice if the connection broke after Redis had run it. What pairloop sends is safe
to repeat: records and claims are written under fixed ids (a repeated feedback claim reads as the same event),
RQ's handlers are idempotent; a rate-limit bucket may be charged once too often.

redis-py's asyncio pool raises `MaxConnectionsError` at once when its 100 connections are in use; the gateway's
is a `BlockingConnectionPool` that waits up to `POOL_WAIT_S` for one.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import ExponentialWithJitterBackoff

SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
RETRIES = 2
POOL_SIZE = 256
POOL_WAIT_S = 5.0


def _options(retry: type[redis.retry.Retry] | type[redis.asyncio.retry.Retry]) -> dict[str, Any]:
    return {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        # on (ConnectionError, TimeoutError) by default: a closed or timed-out connection, not an error reply
        "retry": retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), RETRIES),
    }


def connect(url: str) -> redis.asyncio.Redis:
    """An asyncio client for a service (the gateway, the adapter sidecar, promotions); close it with `aclose`."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S, **_options(redis.asyncio.retry.Retry)
    )
    return redis.asyncio.Redis.from_pool(pool)


def connect_sync(url: str) -> redis.Redis:
    """A blocking client (the workers and cron; an RQ worker raises its socket timeout above its dequeue wait)."""
    return redis.Redis.from_url(url, **_options(redis.retry.Retry))
