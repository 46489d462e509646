"""Token buckets shared by every gateway replica, in Redis; per-replica buckets when Redis is down.

A tenant's rate limit is a limit of the platform, not of one replica: with N gateways and local
buckets the tenant would get N times its quota. Each ``take`` runs one Lua script in Redis that
refills and takes from the bucket atomically, with Redis' own clock (``TIME``), so replicas with
skewed clocks agree. Keys expire once a bucket would be full again.

When Redis cannot be reached (50 ms timeouts), the replica falls back to local buckets holding
``1 / replicas`` of the limit (``FLASHCROWD_GATEWAY_REPLICAS``), logs it once per outage and tries
Redis again after ``retry_seconds``: the fleet's total stays near the configured limit, and calls are
never failed because the limiter's store is down.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from services.gateway.limits import TokenBucket

logger = logging.getLogger(__name__)

_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class SharedBuckets:
    """``await take(key, rate, burst)`` -> seconds to wait (0 = taken), shared through Redis."""

    def __init__(
        self,
        redis_url: str,
        *,
        replicas: int = 1,
        prefix: str = "flashcrowd:bucket:",
        timeout_seconds: float = 0.05,
        retry_seconds: float = 1.0,
        max_local: int = 100_000,
    ) -> None:
        self.replicas = max(1, replicas)
        self.prefix = prefix
        self.retry_seconds = retry_seconds
        self._local: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_local = max_local
        self._down_until = 0.0
        self._client: Any = None
        self._script: Any = None
        #: Takes answered by the local fallback (tests and metrics read it).
        self.fallbacks = 0
        if redis_url:
            import redis.asyncio as redis

            self._client = redis.Redis.from_url(
                redis_url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds
            )
            self._script = self._client.register_script(_TAKE)

    @property
    def shared(self) -> bool:
        return self._client is not None

    def _local_take(self, key: str, rate: float, burst: float, divisor: int) -> float:
        bucket = self._local.get(key)
        if bucket is None:
            bucket = self._local[key] = TokenBucket(rate / divisor, max(1.0, burst / divisor))
            if len(self._local) > self._max_local:
                self._local.popitem(last=False)
        else:
            self._local.move_to_end(key)
        return bucket.take()

    async def take(self, key: str, rate: float, burst: float) -> float:
        if self._client is None:  # one replica by configuration: local buckets hold the whole limit
            return self._local_take(key, rate, burst, 1)
        now = time.monotonic()
        if now >= self._down_until:
            try:
                wait = await self._script(keys=[self.prefix + key], args=[rate, burst, 1])
                if self._down_until:
                    logger.warning("rate-limit store is back: limits are shared again")
                    self._down_until = 0.0
                return float(wait)
            except Exception as error:  # Redis down or slow: never fail the call for it
                if not self._down_until:
                    logger.warning(
                        "rate-limit store unreachable (%s): limits per replica at 1/%d until it is back",
                        type(error).__name__,
                        self.replicas,
                    )
                self._down_until = now + self.retry_seconds
        self.fallbacks += 1
        return self._local_take(key, rate, burst, self.replicas)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


__all__ = ["SharedBuckets"]
