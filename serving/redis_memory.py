"""Redis's memory, watched by the gateway: what it takes in is refused with a 503 before Redis is full.

Redis runs with a `maxmemory` and `noeviction` (queued votes are never dropped for memory), so a full Redis
refuses writes. Left to fill up, it would refuse the workers' own writes too (taking a job from the queue moves it
with a write), and what drains the queue could not run. So the gateway reads `used_memory` against `maxmemory`
every `interval_s` and refuses new chats (which write a record) above `chat_limit` of it and feedback above
`feedback_limit`, keeping the rest for the workers, the training loop and retries. Memory comes back by itself
(records expire, stored votes leave the queue) and the gateway admits requests again at its next look.
A Redis without `maxmemory`, or a limit of 1, refuses nothing here (Redis's own refusal is still a 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from serving import tasks
from serving.errors import Unavailable

log = logging.getLogger(__name__)

Intake = Literal["chat", "feedback"]


class RedisMemory:
    def __init__(
        self,
        redis: Redis,
        *,
        chat_limit: float,
        feedback_limit: float,
        interval_s: float = 1.0,
        retry_after_s: int = 5,
    ) -> None:
        self.redis = redis
        self.limits: dict[Intake, float] = {"chat": chat_limit, "feedback": feedback_limit}
        self.interval_s = interval_s
        self.retry_after_s = retry_after_s
        self.used = 0
        self.maxmemory = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def share(self) -> float:
        """`used_memory` over `maxmemory` at the last look (0 without a maxmemory)."""
        return self.used / self.maxmemory if self.maxmemory else 0.0

    async def refresh(self) -> None:
        info = await self.redis.info("memory")
        self.used, self.maxmemory = int(info["used_memory"]), int(info.get("maxmemory", 0))

    def admit(self, intake: Intake) -> None:
        """Raise `Unavailable` (503 with Retry-After) when Redis is too full for `intake`."""
        limit = self.limits[intake]
        if self.maxmemory and limit < 1 and self.share >= limit:
            raise Unavailable(
                f"The server's Redis is nearly full ({self.share:.0%} of its maxmemory, this kind of request "
                f"stops at {limit:.0%}); try again shortly.",
                retry_after_s=self.retry_after_s,
            )

    async def _watch(self) -> None:
        was_full = False
        while True:
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:  # Redis away: the requests themselves will say so
                log.debug("could not read Redis's memory: %s", exc)
            full = bool(self.maxmemory) and self.share >= min(self.limits.values())
            if full != was_full:
                log.warning(
                    "Redis at %.0f%% of its maxmemory: %s",
                    100 * self.share,
                    "refusing new chats" if full else "admitting requests again",
                )
                was_full = full
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.refresh()
        self._task = asyncio.create_task(self._watch(), name="redis-memory")

    async def stop(self) -> None:
        await tasks.stop(self._task)
