"""Per-tenant quotas of the audience service: the limits, the refusal they answer with, the counters.

=====================  ==========================================  ===================================
limit (``quota``)      what counts                                 where it is counted
=====================  ==========================================  ===================================
``live_packs``         live packs a tenant has                     the live-pack engine (live.py)
``queued_builds``      a tenant's builds waiting for a worker      ``OperationManager`` (per process)
``uploads_per_day``    UploadPack calls that published a pack      the shared SQL store (all replicas)
``upload_rows_per_day`` rows of those uploads                      the shared SQL store
``expansions_per_day`` accepted ExpandLookalike operations         the shared SQL store
``trainings_per_day``  accepted TrainLookalikeModel operations      the shared SQL store
=====================  ==========================================  ===================================

(``tenant_max_running_builds`` is a scheduling cap of the build queue, never a refusal.)

Invariants:

* **One answer.** A call over a limit is ``RESOURCE_EXHAUSTED`` with reason ``TENANT_QUOTA``,
  ``RetryInfo`` (the next UTC midnight for daily limits), a ``QuotaFailure`` violation
  ``(tenants/{t}, "at most N <what> per tenant (FLASHCROWD_...)")`` and ``ErrorInfo`` metadata
  ``{"quota": name, "variable": FLASHCROWD_..., "limit": N, "used": n}``.
* **A refused call consumes nothing.** Every counter a call charges moves in one transaction, each by
  an UPSERT whose ``WHERE used + amount <= limit`` makes it a no-op when the limit would be passed:
  then the transaction rolls back and no counter moved. Calls that fail for another reason after
  being charged give their units back (``Grant.refund``).
* **Atomic across replicas.** Two replicas (or threads) never both take the last unit: the UPSERT is
  one statement under the row's lock (PostgreSQL) or the database's write lock (SQLite,
  ``BEGIN IMMEDIATE``). Daily counters are keyed by the UTC day (``YYYY-MM-DD``) and start from zero
  at 00:00 UTC; rows older than a week are deleted when a store opens.
* **Platform principals are exempt** from tenant quotas: they are the platform's own services and
  jobs (ad serving, batch builds), bounded by the server's global caps (build queue, rows per
  upload). Only the training limit applies to them, because only they may train models. Callers
  without an assertion (servicers called directly by unit tests) are treated like platform callers.

``open_usage_store(url, default_path)`` picks SQLite (embedded default, one host) or PostgreSQL
(``FLASHCROWD_CONTROL_DATABASE_URL=postgresql://...``, shared by replicas). Store methods are
blocking (one short transaction); async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.runtime import ResourceExhausted
from services.runtime.assertion import Caller

QUOTA_REASON = "TENANT_QUOTA"
#: Days of counters kept (older rows are deleted when a store opens).
KEEP_DAYS = 7

__all__ = [
    "QUOTA_REASON",
    "Grant",
    "Limit",
    "PostgresUsageStore",
    "QuotaExceeded",
    "SqliteUsageStore",
    "TenantLimits",
    "TenantQuotas",
    "UsageStore",
    "default_control_path",
    "open_quotas",
    "open_usage_store",
    "quota_refusal",
]


@dataclass(frozen=True)
class Limit:
    """One per-tenant limit: its stable name, the variable that sets it, its value, what it counts."""

    name: str
    variable: str
    value: int
    what: str

    def describe(self) -> str:
        return f"at most {self.value:,} {self.what} per tenant ({self.variable})"


def quota_refusal(
    tenant: str, limit: Limit, *, used: int, requested: int = 1, retry_after_seconds: float = 5.0
) -> ResourceExhausted:
    """The one RESOURCE_EXHAUSTED a tenant over ``limit`` gets (see the module doc)."""
    subject = f"tenants/{tenant}"
    return ResourceExhausted(
        f"{subject} is over its quota of {limit.what}: {used:,} of {limit.value:,} used, "
        f"{requested:,} more asked; retry later or ask for a higher {limit.variable}",
        retry_after_seconds=max(retry_after_seconds, 0.001),
        violations=[(subject, limit.describe())],
        reason=QUOTA_REASON,
        metadata={"quota": limit.name, "variable": limit.variable, "limit": limit.value, "used": used},
    )


@dataclass(frozen=True)
class TenantLimits:
    """The limits of ``AudienceSettings`` (``FLASHCROWD_TENANT_*``), by name."""

    live_packs: Limit
    queued_builds: Limit
    uploads_per_day: Limit
    upload_rows_per_day: Limit
    expansions_per_day: Limit
    trainings_per_day: Limit
    #: Builds of one tenant running at once (a scheduling cap of the build queue).
    running_builds: int = 1

    @classmethod
    def from_settings(cls, settings: Any) -> TenantLimits:
        def limit(name: str, field_name: str, what: str) -> Limit:
            return Limit(name, f"FLASHCROWD_{field_name.upper()}", int(getattr(settings, field_name)), what)

        return cls(
            live_packs=limit("live_packs", "tenant_max_live_packs", "live packs"),
            queued_builds=limit("queued_builds", "tenant_max_queued_builds", "queued builds"),
            uploads_per_day=limit("uploads_per_day", "tenant_max_uploads_per_day", "uploads per day"),
            upload_rows_per_day=limit(
                "upload_rows_per_day", "tenant_max_upload_rows_per_day", "uploaded rows per day"
            ),
            expansions_per_day=limit(
                "expansions_per_day", "tenant_max_expansions_per_day", "lookalike expansions per day"
            ),
            trainings_per_day=limit(
                "trainings_per_day", "max_trainings_per_day", "lookalike model trainings per day"
            ),
            running_builds=int(settings.tenant_max_running_builds),
        )


class QuotaExceeded(Exception):
    """Raised by ``UsageStore.consume`` when a charge would pass its limit (nothing was consumed)."""

    def __init__(self, limit: Limit, used: int, requested: int) -> None:
        super().__init__(f"{limit.name}: {used} of {limit.value} used, {requested} asked")
        self.limit, self.used, self.requested = limit, used, requested


# --- the shared counters --------------------------------------------------------------------------

_TABLE = "audience_quota_usage"
_CONSUME = (
    f"INSERT INTO {_TABLE} (tenant, quota, period, used) VALUES (?, ?, ?, ?) "
    f"ON CONFLICT (tenant, quota, period) DO UPDATE SET used = {_TABLE}.used + excluded.used "
    f"WHERE {_TABLE}.used + excluded.used <= ? RETURNING used"
)
_REFUND = (
    f"UPDATE {_TABLE} SET used = CASE WHEN used >= ? THEN used - ? ELSE 0 END "
    "WHERE tenant = ? AND quota = ? AND period = ?"
)
_USED = f"SELECT used FROM {_TABLE} WHERE tenant = ? AND quota = ? AND period = ?"
_PRUNE = f"DELETE FROM {_TABLE} WHERE period < ?"
_SCHEMA = f"""CREATE TABLE IF NOT EXISTS {_TABLE} (
    tenant TEXT NOT NULL,
    quota  TEXT NOT NULL,
    period TEXT NOT NULL,
    used   BIGINT NOT NULL CHECK (used >= 0),
    PRIMARY KEY (tenant, quota, period)
)"""


class _Rollback(Exception):
    """Aborts a consume transaction (carries the refusal out of it)."""

    def __init__(self, refusal: QuotaExceeded) -> None:
        self.refusal = refusal


class UsageStore(ABC):
    """Counters ``(tenant, quota, period) -> used``; backends provide a transaction with ``?`` params."""

    @abstractmethod
    def _transaction(self) -> Any:  # context manager yielding execute(sql, params) -> cursor
        ...

    @abstractmethod
    def close(self) -> None: ...

    def consume(self, tenant: str, period: str, charges: Sequence[tuple[Limit, int]]) -> list[int]:
        """Add every ``(limit, amount)`` to the tenant's counters of ``period``, all or none.

        Returns the counters after the charge; raises ``QuotaExceeded`` (naming the first limit that
        would be passed, with its current use) and changes nothing when any would be passed.
        """
        try:
            with self._transaction() as execute:
                after: list[int] = []
                for limit, amount in charges:
                    if amount <= 0:
                        after.append(self._used(execute, tenant, limit.name, period))
                        continue
                    row = None
                    if amount <= limit.value:
                        row = execute(_CONSUME, (tenant, limit.name, period, amount, limit.value)).fetchone()
                    if row is None:  # the guarded update matched nothing: over the limit
                        used = self._used(execute, tenant, limit.name, period)
                        raise _Rollback(QuotaExceeded(limit, used, amount))
                    after.append(int(row[0]))
                return after
        except _Rollback as rollback:
            raise rollback.refusal from None

    def refund(self, tenant: str, period: str, charges: Sequence[tuple[Limit, int]]) -> None:
        """Give back what ``consume`` took (never below zero)."""
        with self._transaction() as execute:
            for limit, amount in charges:
                if amount > 0:
                    execute(_REFUND, (amount, amount, tenant, limit.name, period))

    def used(self, tenant: str, quota: str, period: str) -> int:
        with self._transaction() as execute:
            return self._used(execute, tenant, quota, period)

    @staticmethod
    def _used(execute: Callable[..., Any], tenant: str, quota: str, period: str) -> int:
        row = execute(_USED, (tenant, quota, period)).fetchone()
        return int(row[0]) if row else 0

    def prune(self, before_period: str) -> None:
        with self._transaction() as execute:
            execute(_PRUNE, (before_period,))


class SqliteUsageStore(UsageStore):
    """One SQLite file (WAL). ``BEGIN IMMEDIATE`` takes the write lock, so processes sharing the
    file (replicas on one host) serialise their charges; a lock makes this object thread-safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA busy_timeout = 10000")
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[Callable[..., Any]]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db.execute
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


_SCHEMA_LOCK = 0x7175_6F74  # "quot": replicas starting together create the table once


class PostgresUsageStore(UsageStore):
    """The same table in PostgreSQL, through a small psycopg connection pool (shared by replicas)."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 4) -> None:
        from psycopg_pool import ConnectionPool

        self._pool = ConnectionPool(url, min_size=min_size, max_size=max_size, open=True, timeout=10)
        with self._pool.connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            connection.execute(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[Callable[..., Any]]:
        with self._pool.connection() as connection, connection.transaction():

            def execute(sql: str, params: Sequence[Any] = ()) -> Any:
                return connection.execute(sql.replace("?", "%s"), params)

            yield execute

    def close(self) -> None:
        self._pool.close()


def default_control_path(store_url: str) -> str:
    """The embedded default file: beside a local store's directory, else under ``./var``, one file
    per store (its queue holds jobs for that store's data only)."""
    import hashlib

    from services.storage import LocalObjectStore, open_store

    if store_url.lower().startswith("file://") or "://" not in store_url:
        store = open_store(store_url)
        if isinstance(store, LocalObjectStore):
            return str(store.root.parent / f"{store.root.name}.control.sqlite3")
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:12]
    return str(Path("var") / f"audience-control-{digest}.sqlite3")


def open_usage_store(url: str, default_path: str) -> UsageStore:
    """``postgresql://...`` or ``sqlite:///path`` if set, else the SQLite file ``default_path``."""
    if url.startswith(("postgresql://", "postgres://")):
        store: UsageStore = PostgresUsageStore(url)
    elif url.startswith("sqlite:///"):
        store = SqliteUsageStore(url[len("sqlite:///") :] or ":memory:")
    elif url:
        raise ValueError("control database URL must start with postgresql:// or sqlite:///")
    else:
        store = SqliteUsageStore(default_path)
    store.prune(_day(datetime.now(UTC) - timedelta(days=KEEP_DAYS)))
    return store


# --- what the servicers call ----------------------------------------------------------------------


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d")


@dataclass
class Grant:
    """Units a call was charged; ``refund()`` gives them back once (the call failed after all)."""

    quotas: TenantQuotas
    tenant: str
    period: str
    charges: list[tuple[Limit, int]] = field(default_factory=list)

    def refund(self) -> None:
        charges, self.charges = self.charges, []
        if charges:
            self.quotas.usage.refund(self.tenant, self.period, charges)


class TenantQuotas:
    """The limits and the shared counters together; every method but ``applies_to`` may block."""

    def __init__(self, limits: TenantLimits, usage: UsageStore, *, clock: Callable[[], float] = time.time):
        self.limits = limits
        self.usage = usage
        self.clock = clock

    @staticmethod
    def applies_to(caller: Caller | None) -> bool:
        """Tenant principals are subject to tenant quotas; platform principals (and no caller) are not."""
        return caller is not None and not caller.is_platform

    def today(self) -> str:
        return _day(datetime.fromtimestamp(self.clock(), UTC))

    def seconds_to_tomorrow(self) -> float:
        now = datetime.fromtimestamp(self.clock(), UTC)
        midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        return (midnight - now).total_seconds()

    def check_count(self, tenant: str, limit: Limit, count: int) -> None:
        """Refuse one more of something the tenant has ``count`` of (live packs)."""
        if count >= limit.value:
            raise quota_refusal(tenant, limit, used=count, retry_after_seconds=60.0)

    def require_room(self, tenant: str, limit: Limit, amount: int = 1) -> None:
        """Refuse early (consuming nothing) when ``amount`` more would pass a daily limit already."""
        used = self.usage.used(tenant, limit.name, self.today())
        if used + amount > limit.value:
            raise quota_refusal(
                tenant, limit, used=used, requested=amount, retry_after_seconds=self.seconds_to_tomorrow()
            )

    def charge(self, tenant: str, charges: Sequence[tuple[Limit, int]]) -> Grant:
        """Charge today's counters, all or none; RESOURCE_EXHAUSTED naming the limit otherwise."""
        period = self.today()
        try:
            self.usage.consume(tenant, period, charges)
        except QuotaExceeded as over:
            raise quota_refusal(
                tenant,
                over.limit,
                used=over.used,
                requested=over.requested,
                retry_after_seconds=self.seconds_to_tomorrow(),
            ) from None
        return Grant(self, tenant, period, [(limit, amount) for limit, amount in charges if amount > 0])

    def used_today(self, tenant: str, limit: Limit) -> int:
        return self.usage.used(tenant, limit.name, self.today())

    def close(self) -> None:
        self.usage.close()


def open_quotas(settings: Any) -> TenantQuotas:
    """The quotas of an audience process: limits from its settings, counters in the control database."""
    usage = open_usage_store(settings.control_database_url, default_control_path(settings.store_url))
    return TenantQuotas(TenantLimits.from_settings(settings), usage)
