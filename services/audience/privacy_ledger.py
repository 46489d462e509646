"""The tenants' privacy-budget ledger: which aggregates were released to whom, at what epsilon.

One row per *distinct* release: ``(tenant, kind, fingerprint)`` where ``fingerprint`` names the
member set the aggregate was computed over (a pack version's content hash, or a sample's). Answers
are deterministic per row (services/audience/privacy.py seeds the noise with it), so asking again
releases nothing new and costs nothing; a new member set costs its epsilon once, against the
tenant's budget of the UTC day it was first released. ``charge`` is atomic: a release that would
take the day's total above the budget is not recorded and answered False.

SQLite (embedded default, one process or replicas sharing one file) or PostgreSQL
(``FLASHCROWD_CONTROL_DATABASE_URL=postgresql://...``, shared by every replica; an advisory lock per
tenant serialises concurrent charges so two replicas cannot overspend together).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS privacy_releases (
    tenant      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    epsilon     DOUBLE PRECISION NOT NULL,
    release_day INTEGER NOT NULL,
    PRIMARY KEY (tenant, kind, fingerprint)
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS privacy_releases_day ON privacy_releases (tenant, release_day)"
_SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Release:
    """One aggregate about to be shown: its kind (``size``, ``persona``...), member set and cost."""

    kind: str
    fingerprint: str
    epsilon: float


def utc_day(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // _SECONDS_PER_DAY)


class PrivacyLedger(ABC):
    """``charge`` records releases against a tenant's daily budget (all or none)."""

    def __init__(self) -> None:
        self._released: set[tuple[str, str, str]] = set()  # rows known to exist: never change
        self._lock = threading.Lock()

    def charge(
        self, tenant: str, releases: Sequence[Release], budget: float, now: float | None = None
    ) -> bool:
        """Record ``releases`` for ``tenant``; True if all are (now or already) released within budget."""
        with self._lock:
            fresh = [r for r in releases if (tenant, r.kind, r.fingerprint) not in self._released]
        if not fresh:
            return True
        ok = self._charge(tenant, fresh, budget, utc_day(now))
        if ok:
            with self._lock:
                if len(self._released) > 200_000:
                    self._released.clear()
                self._released.update((tenant, r.kind, r.fingerprint) for r in fresh)
        return ok

    def spent(self, tenant: str, now: float | None = None) -> float:
        """Epsilon charged to ``tenant`` today."""
        return self._spent(tenant, utc_day(now))

    @abstractmethod
    def _charge(self, tenant: str, releases: Sequence[Release], budget: float, day: int) -> bool: ...

    @abstractmethod
    def _spent(self, tenant: str, day: int) -> float: ...

    @abstractmethod
    def close(self) -> None: ...


class SqlitePrivacyLedger(PrivacyLedger):
    def __init__(self, path: str) -> None:
        super().__init__()
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db_lock = threading.Lock()
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(_SCHEMA)
        self._db.execute(_INDEX)

    def _charge(self, tenant: str, releases: Sequence[Release], budget: float, day: int) -> bool:
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")  # one writer across processes sharing the file
            try:
                ok = _charge_rows(self._db, "?", tenant, releases, budget, day)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT" if ok else "ROLLBACK")
            return ok

    def _spent(self, tenant: str, day: int) -> float:
        with self._db_lock:
            return _spent_rows(self._db, "?", tenant, day)

    def close(self) -> None:
        with self._db_lock:
            self._db.close()


class PostgresPrivacyLedger(PrivacyLedger):
    def __init__(self, url: str) -> None:
        super().__init__()
        from psycopg_pool import ConnectionPool

        self._pool = ConnectionPool(url, min_size=1, max_size=4, open=True, timeout=10)
        with self._pool.connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (0x70726976,))  # "priv"
            connection.execute(_SCHEMA)
            connection.execute(_INDEX)

    def _charge(self, tenant: str, releases: Sequence[Release], budget: float, day: int) -> bool:
        try:
            with self._pool.connection() as connection, connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(tenant.encode()),))
                if not _charge_rows(connection, "%s", tenant, releases, budget, day):
                    raise _Refused  # leaving transaction() by an exception rolls it back
        except _Refused:
            return False
        return True

    def _spent(self, tenant: str, day: int) -> float:
        with self._pool.connection() as connection:
            return _spent_rows(connection, "%s", tenant, day)

    def close(self) -> None:
        self._pool.close()


class _Refused(Exception):
    """Rolls a PostgreSQL charge back (raising out of ``transaction()`` is psycopg's rollback)."""


def _charge_rows(
    db: Any, mark: str, tenant: str, releases: Sequence[Release], budget: float, day: int
) -> bool:
    new_cost = 0.0
    for release in releases:
        row = db.execute(
            f"SELECT 1 FROM privacy_releases "
            f"WHERE tenant = {mark} AND kind = {mark} AND fingerprint = {mark}",
            (tenant, release.kind, release.fingerprint),
        ).fetchone()
        if row is None:
            new_cost += release.epsilon
            db.execute(
                "INSERT INTO privacy_releases (tenant, kind, fingerprint, epsilon, release_day) "
                f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark})",
                (tenant, release.kind, release.fingerprint, release.epsilon, day),
            )
    if new_cost == 0.0:
        return True
    return _spent_rows(db, mark, tenant, day) <= budget + 1e-9


def _spent_rows(db: Any, mark: str, tenant: str, day: int) -> float:
    row = db.execute(
        f"SELECT COALESCE(SUM(epsilon), 0) FROM privacy_releases "
        f"WHERE tenant = {mark} AND release_day = {mark}",
        (tenant, day),
    ).fetchone()
    return float(row[0])


def open_privacy_ledger(url: str, default_path: str) -> PrivacyLedger:
    """``postgresql://...`` / ``sqlite:///path`` if given, else the SQLite file ``default_path``."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresPrivacyLedger(url)
    if url.startswith("sqlite:///"):
        return SqlitePrivacyLedger(url[len("sqlite:///") :] or ":memory:")
    if url:
        raise ValueError("control database URL must start with postgresql:// or sqlite:///")
    return SqlitePrivacyLedger(default_path)


__all__ = ["PrivacyLedger", "Release", "open_privacy_ledger", "utc_day"]
