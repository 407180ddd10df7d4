"""Where each vLLM host keeps its copies of the adapters: the records its `pairloop adapter-sync` sidecar writes.

Beside every vLLM server runs `pairloop adapter-sync` (`serving/adapters/sync.py`): it copies adapters from
the adapter store (`serving/adapters/store.py`) into a directory that its vLLM server reads and reports in
Redis (`pairloop:adapter-hosts`, one field per vLLM URL) which adapters that directory holds.

Whoever loads an adapter into a vLLM server (a swap, a gateway's follower) asks `host_path` for the
adapter's path on that server's host: an adapter published to the store has the routing path
`store:<name>`; `host_path` adds the name to `pairloop:adapter-wanted` (so every sidecar fetches it), waits
until the host's sidecar reports it, and answers `<its dir>/<name>`. A plain path (the embedded default: one
data dir shared by the trainer and its vLLM child) is used as it is.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from serving.adapters.store import STORE_REF, is_store_ref
from serving.errors import AdapterError

HOSTS_KEY = "pairloop:adapter-hosts"
WANTED_KEY = "pairloop:adapter-wanted"
HOST_STALE_S = 30.0
"""A host record older than this belongs to a sidecar that stopped."""
WANTED_FOR_S = 3600.0
"""How long an adapter asked for by a swap stays wanted (fetched by every sidecar)."""


class HostRecord(BaseModel):
    dir: str
    have: list[str]
    at: float


async def host_record(redis: Redis, vllm_url: str) -> HostRecord | None:
    raw = await redis.hget(HOSTS_KEY, vllm_url)
    if raw is None:
        return None
    try:
        record = HostRecord.model_validate_json(raw)
    except ValidationError:
        return None
    return record if time.time() - record.at < HOST_STALE_S else None


async def host_path(redis: Redis, vllm_url: str, path: str, *, timeout_s: float = 120.0) -> str:
    """The directory the vLLM server at `vllm_url` loads an adapter from, given its routing `path`."""
    if not is_store_ref(path):
        if await host_record(redis, vllm_url) is not None:
            # that host has a disk of its own: a path on the trainer's disk means nothing there
            raise AdapterError(
                f"the vLLM server at {vllm_url} reads adapters from its own disk (an adapter-sync runs beside it), "
                f"but this adapter was not published to an adapter store ({path}): set PAIRLOOP_ADAPTER_STORE_URL "
                "on the training worker",
                409,
            )
        return path
    name = path[len(STORE_REF) :]
    await redis.zadd(WANTED_KEY, {name: time.time()})
    deadline = time.monotonic() + timeout_s
    while True:
        record = await host_record(redis, vllm_url)
        if record is not None and name in record.have:
            return f"{record.dir.rstrip('/')}/{name}"
        if time.monotonic() >= deadline:
            if record is None:
                raise AdapterError(
                    f"no `pairloop adapter-sync` reports for the vLLM server at {vllm_url}: run one beside it "
                    f"(--vllm-url {vllm_url}) so that it can get {name} from the adapter store",
                    503,
                )
            raise AdapterError(f"the adapter-sync beside {vllm_url} did not get {name} within {timeout_s:g} s", 503)
        await asyncio.sleep(0.1)
