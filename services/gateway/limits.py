"""Per-tenant limits: token-bucket rate limits, concurrent streams, failed authentications, the retry
budget.

All of it lives in one event loop, so no locks; time comes from ``time.monotonic``. Rate limits and
failed-authentication counters are shared by the replicas through Redis (shared_buckets.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from services.gateway.config import GatewaySettings, RateLimit
from services.runtime import ResourceExhausted
from services.runtime.tenant_ids import valid_tenant_id

if TYPE_CHECKING:
    from services.gateway.shared_buckets import SharedBuckets


def _subject(limit_key: str) -> str:
    """QuotaFailure subject of a limit key: ``tenants/{t}`` for a tenant, else the key
    (``platform:<subject>``)."""
    return f"tenants/{limit_key}" if valid_tenant_id(limit_key) else limit_key


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
    """One bucket per (tenant or platform principal, method), shared by the replicas through
    ``SharedBuckets`` (Redis; local buckets at 1/replicas while it is down, or alone without it)."""

    def __init__(self, settings: GatewaySettings, buckets: SharedBuckets) -> None:
        self.settings = settings
        self.buckets = buckets
        self._limits: dict[str, RateLimit] = {}

    async def check(self, tenant: str, full_method: str) -> None:
        """Raise RESOURCE_EXHAUSTED (RetryInfo + QuotaFailure) when the tenant is over the limit."""
        limit = self._limits.get(full_method)
        if limit is None:
            limit = self._limits[full_method] = self.settings.rate_limit_for(full_method)
        wait = await self.buckets.take(f"rate:{tenant}:{full_method}", limit.rate, limit.burst)
        if wait > 0:
            method = full_method.rsplit("/", 1)[-1]
            raise ResourceExhausted(
                f"rate limit of {limit.rate:g}/s exceeded for {method}",
                retry_after_seconds=max(wait, 0.001),
                violations=[(_subject(tenant), f"{limit.rate:g} {method} requests per second")],
                reason="RATE_LIMITED",
                metadata={"method": method, "limit": f"{limit.rate:g}/s"},
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
                violations=[(_subject(tenant), f"{self.max_streams} concurrent streams")],
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
    """Failed authentications per (client address, credential id), plus a coarse ceiling per address.

    Consulted only **after** a credential failed to verify (``failed``), never before: a valid
    credential is always admitted, however many bad ones arrive from the same address (a NAT, an
    ingress, one client with a stale key). What it bounds is how often a failing caller gets a
    verdict: past ``limit`` failures of one credential id from one address, or ``address_limit``
    failures of any credentials from one address, failures are answered RESOURCE_EXHAUSTED
    (``AUTH_FAILURES``, RetryInfo, QuotaFailure) so well-behaved clients back off. The key store is
    protected separately (unknown key ids never reach it: ``key_directory.py``).
    """

    def __init__(
        self,
        limit: RateLimit,
        address_limit: RateLimit,
        max_entries: int = 50_000,
        buckets: SharedBuckets | None = None,
    ) -> None:
        self.limit = limit
        self.address_limit = address_limit
        self.buckets = buckets
        self.max_entries = max_entries
        self._pairs: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._addresses: OrderedDict[str, TokenBucket] = OrderedDict()
        #: Failures answered RESOURCE_EXHAUSTED (tests and metrics read it).
        self.refused = 0

    def _bucket(self, buckets: OrderedDict[Any, TokenBucket], key: Any, limit: RateLimit) -> TokenBucket:
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = TokenBucket(limit.rate, limit.burst)
            if len(buckets) > self.max_entries:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        return bucket

    async def failed(self, address: str, credential: str) -> ResourceExhausted | None:
        """Count one failure; the error to answer instead of UNAUTHENTICATED when over a limit."""
        if self.buckets is not None:  # shared by the replicas
            pair = await self.buckets.take(
                f"authfail:{address}:{credential}", self.limit.rate, self.limit.burst
            )
            overall = await self.buckets.take(
                f"authfail:{address}", self.address_limit.rate, self.address_limit.burst
            )
        else:
            pair = self._bucket(self._pairs, (address, credential), self.limit).take()
            overall = self._bucket(self._addresses, address, self.address_limit).take()
        wait = max(pair, overall)
        if wait <= 0:
            return None
        self.refused += 1
        limit, what = (self.limit, "this credential") if pair >= overall else (self.address_limit, "any")
        return ResourceExhausted(
            "too many failed authentications from this address",
            retry_after_seconds=max(wait, 0.001),
            violations=[
                (address, f"{limit.rate:g} failed authentications per second with {what} credential")
            ],
            reason="AUTH_FAILURES",
        )


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


__all__ = ["AuthFailureLimiter", "RateLimiter", "RetryBudget", "StreamLimiter", "TokenBucket"]
