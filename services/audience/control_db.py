"""The audience control database: SQLite (embedded default, one host) or PostgreSQL (replicas).

One small adapter so that the control-plane tables (operations, build queue, pack reservations)
are written once: ``transaction()`` yields ``execute(sql, params)`` with ``?`` placeholders, and
``dialect`` says which SQL flavour the few differing statements need (``FOR UPDATE SKIP LOCKED``,
``BYTEA`` versus ``BLOB``).

SQLite: one connection in WAL mode guarded by a lock; ``BEGIN IMMEDIATE`` takes the write lock, so
processes sharing the file (a serving process and its workers) serialise their transactions.
PostgreSQL: a psycopg pool; row locks (``FOR UPDATE SKIP LOCKED``) let replicas claim work at once.
Every method blocks; async callers use ``asyncio.to_thread``. A database that cannot be reached
raises ``ControlUnavailable`` (answered UNAVAILABLE by the servicers).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from services.runtime import Unavailable

Execute = Callable[..., Any]
Dialect = Literal["sqlite", "postgresql"]


class ControlUnavailable(Unavailable):
    """The control database did not answer (retry later)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"audience control database unavailable: {detail}; retry later")


class ControlDatabase:
    """A transaction factory over SQLite or PostgreSQL (see the module doc)."""

    dialect: Dialect

    def __init__(self, url: str, default_path: str, *, schema: Sequence[str] = ()) -> None:
        """``url`` ``postgresql://...`` or ``sqlite:///path``; empty means the SQLite ``default_path``."""
        self._sqlite: sqlite3.Connection | None = None
        self._pool: Any = None
        self._lock = threading.Lock()
        if url.startswith(("postgresql://", "postgres://")):
            from psycopg_pool import ConnectionPool

            self.dialect = "postgresql"
            self._pool = ConnectionPool(url, min_size=1, max_size=8, open=True, timeout=10)
        elif url.startswith("sqlite:///") or not url:
            path = url[len("sqlite:///") :] if url else default_path
            self.dialect = "sqlite"
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._sqlite = sqlite3.connect(path or ":memory:", check_same_thread=False,
                                           isolation_level=None, timeout=10)  # fmt: skip
            self._sqlite.execute("PRAGMA busy_timeout = 10000")
            if path and path != ":memory:":
                self._sqlite.execute("PRAGMA journal_mode = WAL")
        else:
            raise ValueError("control database URL must start with postgresql:// or sqlite:///")
        self.create(schema)

    def create(self, statements: Sequence[str]) -> None:
        """Run DDL once (replicas starting together serialise on an advisory lock)."""
        with self.transaction() as execute:
            if self.dialect == "postgresql":
                execute("SELECT pg_advisory_xact_lock(?)", (0x6F70_7321,))  # "ops!"
            for statement in statements:
                execute(statement)

    @contextmanager
    def transaction(self) -> Iterator[Execute]:
        if self._sqlite is not None:
            with self._lock:
                db = self._sqlite
                try:
                    db.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as error:
                    raise ControlUnavailable(str(error)) from error
                try:
                    yield db.execute
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            return
        import psycopg

        try:
            with self._pool.connection() as connection, connection.transaction():

                def execute(sql: str, params: Sequence[Any] = ()) -> Any:
                    return connection.execute(sql.replace("?", "%s"), params)

                yield execute
        except (psycopg.OperationalError, _pool_timeout()) as error:
            raise ControlUnavailable(type(error).__name__) from error

    def is_unique_violation(self, error: BaseException) -> bool:
        if self.dialect == "sqlite":
            return isinstance(error, sqlite3.IntegrityError)
        import psycopg

        return isinstance(error, psycopg.errors.UniqueViolation)

    def close(self) -> None:
        with self._lock:
            if self._sqlite is not None:
                self._sqlite.close()
                self._sqlite = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _pool_timeout() -> type[Exception]:
    from psycopg_pool import PoolTimeout

    return PoolTimeout


__all__ = ["ControlDatabase", "ControlUnavailable", "Dialect", "Execute"]
