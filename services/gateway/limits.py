"""Per-tenant limits: token-bucket rate limits, concurrent streams, and the retry budget.

All of it lives in one event loop, so no locks; time comes from ``time.monotonic``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from services.gateway.config import GatewaySettings, RateLimit
from services.runtime import ResourceExhausted


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    __slots__ = ("burst", "clock", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, amount: float = 1.0) -> float:
        """Take ``amount`` tokens; returns 0 on success, else the seconds until they are there."""
        self._refill()
        if self.tokens >= amount:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) / self.rate

    def add(self, amount: float) -> None:
        self._refill()
        self.tokens = min(self.burst, self.tokens + amount)


class RateLimiter:
    """One bucket per (tenant, method), created on first use, least recently used dropped first."""

    def __init__(self, settings: GatewaySettings, max_buckets: int = 100_000) -> None:
        self.settings = settings
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._limits: dict[str, RateLimit] = {}

    def check(self, tenant: str, full_method: str) -> None:
        """Raise RESOURCE_EXHAUSTED (RetryInfo + QuotaFailure) when the tenant is over the limit."""
        key = (tenant, full_method)
        bucket = self._buckets.get(key)
        if bucket is None:
            limit = self._limits.get(full_method)
            if limit is None:
                limit = self._limits[full_method] = self.settings.rate_limit_for(full_method)
            bucket = self._buckets[key] = TokenBucket(limit.rate, limit.burst)
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        wait = bucket.take()
        if wait > 0:
            method = full_method.rsplit("/", 1)[-1]
            raise ResourceExhausted(
                f"rate limit of {bucket.rate:g}/s exceeded for {method}",
                retry_after_seconds=max(wait, 0.001),
                violations=[(f"tenants/{tenant}", f"{bucket.rate:g} {method} requests per second")],
                reason="RATE_LIMITED",
                metadata={"method": method, "limit": f"{bucket.rate:g}/s"},
            )


class StreamLimiter:
    """Counts a tenant's open streaming calls; ``acquire`` refuses past the maximum."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self._open: dict[str, int] = {}

    def acquire(self, tenant: str) -> None:
        count = self._open.get(tenant, 0)
        if count >= self.max_streams:
            raise ResourceExhausted(
                f"at most {self.max_streams} concurrent streams per tenant",
                retry_after_seconds=1.0,
                violations=[(f"tenants/{tenant}", f"{self.max_streams} concurrent streams")],
                reason="TOO_MANY_STREAMS",
            )
        self._open[tenant] = count + 1

    def release(self, tenant: str) -> None:
        count = self._open.get(tenant, 0) - 1
        if count <= 0:
            self._open.pop(tenant, None)
        else:
            self._open[tenant] = count

    def open_streams(self, tenant: str) -> int:
        return self._open.get(tenant, 0)


class AuthFailureLimiter:
    """Failed authentications per peer address: past the burst, the peer is refused for a while
    without any credential check (so floods of made-up keys never reach the key store)."""

    def __init__(self, limit: RateLimit, max_peers: int = 50_000) -> None:
        self.limit = limit
        self.max_peers = max_peers
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(self, peer: str) -> None:
        bucket = self._buckets.get(peer)
        if bucket is None:
            return
        bucket.add(0)  # refill
        if bucket.tokens < 1:
            wait = (1 - bucket.tokens) / bucket.rate
            raise ResourceExhausted(
                "too many failed authentications from this address",
                retry_after_seconds=max(wait, 0.001),
                violations=[(peer, f"{self.limit.rate:g} failed authentications per second")],
                reason="AUTH_FAILURES",
            )

    def failed(self, peer: str) -> None:
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = TokenBucket(self.limit.rate, self.limit.burst)
            if len(self._buckets) > self.max_peers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
        bucket.take()


def peer_address(peer: str) -> str:
    """``ipv4:10.0.0.1:5123`` / ``ipv6:[::1]:5123`` / ``10.0.0.1`` -> the address without the port."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class RetryBudget:
    """Retries may add at most ``ratio`` of calls plus ``min_per_second`` (Finagle-style budget).

    Every call deposits ``ratio`` tokens, every retry withdraws one; a second bucket refills at
    ``min_per_second`` so a quiet gateway can still retry. When a backend is down, calls fail fast
    after the budget is spent instead of multiplying the load on it.
    """

    def __init__(
        self, ratio: float, min_per_second: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ratio = ratio
        # Deposits saved up to a bounded reserve (10 s worth of the floor, at least 10 retries).
        reserve = max(10.0, 10 * min_per_second)
        self._deposits = TokenBucket(rate=1e-9, burst=reserve, clock=clock)
        self._deposits.tokens = 0.0
        self._floor = (
            TokenBucket(rate=min_per_second, burst=max(min_per_second, 1.0), clock=clock)
            if (min_per_second > 0)
            else None
        )
        self.retries = 0
        self.refused = 0

    def record_call(self) -> None:
        if self.ratio > 0:
            self._deposits.add(self.ratio)

    def try_spend(self) -> bool:
        if self._deposits.take() == 0.0 or (self._floor is not None and self._floor.take() == 0.0):
            self.retries += 1
            return True
        self.refused += 1
        return False


__all__ = ["AuthFailureLimiter", "RateLimiter", "RetryBudget", "StreamLimiter", "TokenBucket", "peer_address"]
