"""Token-bucket rate limits kept in Redis, so that every gateway replica draws from the same buckets.

One Lua script checks all the buckets of a request (its API key's and its user's) and takes a token from
each only when every one has a token: a request refused by the user's bucket does not drain the key's.
The clock is Redis' own `TIME`, not the replicas' clocks.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import RedisError

from serving.errors import RateLimited, Unavailable

KEY_PREFIX = "pairloop:ratelimit:"

# KEYS: bucket keys. ARGV: rate (tokens per ms) and burst of each bucket, in KEYS order.
# Returns {0, 0} when a token was taken from every bucket, else {milliseconds until one would be, the index
# (from 1) of the bucket that is empty longest}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait = 0
local which = 0
local level = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local v = redis.call('HMGET', key, 't', 'k')
  local tokens = burst
  if v[1] then
    tokens = math.min(burst, tonumber(v[2]) + (now - tonumber(v[1])) * rate)
  end
  level[i] = tokens
  if tokens < 1 and math.ceil((1 - tokens) / rate) > wait then
    wait = math.ceil((1 - tokens) / rate)
    which = i
  end
end
if wait > 0 then
  return {wait, which}
end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  redis.call('HSET', key, 't', now, 'k', tostring(level[i] - 1))
  redis.call('PEXPIRE', key, math.ceil(burst / rate) + 1000)
end
return {0, 0}
"""


class RateLimit(BaseModel):
    """A bucket of `burst` tokens refilled at `per_s` tokens a second; `per_s` 0 turns the limit off."""

    per_s: float = Field(ge=0)
    burst: int = Field(ge=1)


class RateLimiter:
    def __init__(self, redis: Redis, limits: dict[str, RateLimit], *, retry_after_s: int = 5) -> None:
        """`limits` by name, e.g. `chat:key`, `chat:user`, `feedback:key`, `feedback:user`."""
        self.redis = redis
        self.limits = limits
        self.retry_after_s = retry_after_s
        self._script = redis.register_script(_SCRIPT)

    async def take(self, action: str, key_id: str, user: str | None) -> None:
        """Take one token from `action`'s buckets for this key and user; RateLimited when one is empty."""
        keys: list[str] = []
        args: list[float] = []
        names: list[str] = []
        for dimension, subject in (("key", key_id), ("user", user)):
            limit = self.limits.get(f"{action}:{dimension}")
            if not subject or limit is None or limit.per_s == 0:
                continue
            keys.append(f"{KEY_PREFIX}{action}:{dimension}:{subject}")
            args += [limit.per_s / 1000.0, limit.burst]
            names.append("API key" if dimension == "key" else "user")
        if not keys:
            return
        try:
            wait_ms, which = (int(v) for v in await self._script(keys=keys, args=args))
        except (RedisError, OSError) as exc:
            raise Unavailable(
                "Rate limits cannot be checked (Redis unavailable); try again shortly.",
                retry_after_s=self.retry_after_s,
            ) from exc
        if wait_ms > 0:
            raise RateLimited(
                f"Rate limit reached for this {names[which - 1]} on {action} requests; retry after `Retry-After`.",
                retry_after_s=max(1, math.ceil(wait_ms / 1000)),
            )
