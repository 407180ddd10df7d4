"""`pairloop adapter-sync`, the sidecar beside each vLLM server: the adapters it may be asked to load, on its disk.

It copies the adapters that are served, were served (rollback targets) or are about to be (a swap asked
for them), from the adapter store into a directory that its vLLM server reads, with every hash checked, and
reports in Redis what that directory holds (`serving/adapters/hosts.py`, where the loaders look).

Why a sidecar rather than a vLLM LoRA resolver plugin (docs/DEPLOY.md): vLLM 0.32 calls resolvers only when
a request names an adapter it does not know (never from `/v1/load_lora_adapter`), inside its API server,
so the download would happen on a user's request and a failure would reach that user as a 404. The
sidecar downloads before the swap loads and probes, works with a stock vLLM image, and fails visibly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

from serving.adapters.hosts import HOSTS_KEY, WANTED_FOR_S, WANTED_KEY, HostRecord
from serving.adapters.routing import load_routing
from serving.adapters.store import AdapterStore, is_store_ref
from serving.errors import AdapterError

log = logging.getLogger(__name__)


class AdapterSync:
    """The sidecar beside one vLLM server: keeps `directory` holding the adapters that are or may be served."""

    def __init__(
        self,
        redis: Redis,
        store: AdapterStore,
        vllm_url: str,
        directory: Path,
        *,
        interval_s: float = 0.5,
    ) -> None:
        self.redis = redis
        self.store = store
        self.vllm_url = vllm_url.rstrip("/")
        self.directory = directory.resolve()
        self.interval_s = interval_s
        self.have: set[str] = set()
        self._failed: dict[str, float] = {}

    async def wanted(self) -> set[str]:
        routing = await load_routing(self.redis)
        names = {n for n in (*routing.served(), *routing.history) if n and is_store_ref(routing.paths.get(n, ""))}
        recent: list[bytes] = await self.redis.zrangebyscore(WANTED_KEY, time.time() - WANTED_FOR_S, "+inf")  # type: ignore[assignment]
        return names | {n.decode() for n in recent}

    async def sync_once(self) -> set[str]:
        """Fetch what is wanted and missing, then report what the directory holds. Returns the new names."""
        fetched: set[str] = set()
        now = time.monotonic()
        for name in sorted(await self.wanted() - self.have):
            if now - self._failed.get(name, -1e9) < 5.0:
                continue  # failed a moment ago: try again shortly, without holding up the other names
            try:
                await asyncio.to_thread(self.store.fetch, name, self.directory)
            except AdapterError as exc:
                self._failed[name] = now
                log.warning("adapter-sync: %s", exc.message)
                continue
            self.have.add(name)
            fetched.add(name)
        await self.report()
        return fetched

    async def report(self) -> None:
        record = HostRecord(dir=str(self.directory), have=sorted(self.have), at=time.time())
        await self.redis.hset(HOSTS_KEY, self.vllm_url, record.model_dump_json())

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        log.info("adapter-sync for %s: %s -> %s", self.vllm_url, self.store.url, self.directory)
        while not stop.is_set():
            try:
                await self.sync_once()
            except (RedisError, OSError) as exc:
                log.warning("adapter-sync: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
        await self.redis.hdel(HOSTS_KEY, self.vllm_url)
