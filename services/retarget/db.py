"""The ledger's database access: one code path over PostgreSQL and SQLite.

Design (argued in services/retarget/README.md):

* **Synchronous connections in a dedicated thread pool**, one thread per connection, driven from
  asyncio through ``Database.run(fn, ...)``. ``fn(tx, ...)`` is plain synchronous code holding one
  transaction, so the repository is written once for both databases (stdlib ``sqlite3`` has no
  asyncio driver) and a transaction is never interleaved with other coroutines. A cancelled RPC
  cannot leave a transaction half-done either: the thread runs it to COMMIT or ROLLBACK whatever
  happens to the awaiting coroutine. psycopg releases the GIL while it waits on the network, so
  the threads overlap their round trips; the thread pool has exactly as many threads as the
  connection pool has connections, so no thread ever blocks waiting for a connection.
* **A tiny dialect** covers what differs: placeholders (queries are written with ``?``), row locks
  (``FOR UPDATE`` on PostgreSQL; SQLite write transactions start with ``BEGIN IMMEDIATE`` and hold
  the single database write lock instead), ``x IN <list>`` (``= ANY(array)`` versus
  ``json_each``), bulk insert (``COPY`` versus ``executemany``), advisory locks and auto ids.
  ``RETURNING`` and ``ON CONFLICT ... DO NOTHING`` are spelled the same on both (SQLite >= 3.35).
* Errors are normalised: unique violations become ``UniqueConflict`` (callers retry the whole
  transaction, which then finds the winner's row), deadlocks / serialization failures / "database
  is locked" are retried here with backoff, anything else propagates.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from services.runtime import Aborted, Unavailable

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
Row = dict[str, Any]


class UniqueConflict(Exception):
    """A unique constraint refused a row: a concurrent writer got there first. Retry the transaction."""


class TransientError(Exception):
    """The database asked for a retry too many times (deadlock, serialization, lock timeout)."""


# --- dialects ----------------------------------------------------------------------------------


class Dialect:
    name: str
    #: Appended to a SELECT that must lock its rows until commit.
    for_update: str
    #: Column definition of an auto-increment primary key.
    autoid: str

    def sql(self, query: str) -> str:
        return query

    def in_list(self, column: str, values: Sequence[Any], sql_type: str = "BIGINT") -> tuple[str, list[Any]]:
        """``(fragment, params)`` for ``column IN values`` with one parameter whatever the length."""
        raise NotImplementedError


class PostgresDialect(Dialect):
    name = "postgresql"
    for_update = " FOR UPDATE"
    autoid = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"

    @functools.lru_cache(maxsize=512)  # noqa: B019 - a handful of constant query strings
    def sql(self, query: str) -> str:
        return query.replace("%", "%%").replace("?", "%s")

    def in_list(self, column: str, values: Sequence[Any], sql_type: str = "BIGINT") -> tuple[str, list[Any]]:
        return f"{column} = ANY(CAST(? AS {sql_type}[]))", [list(values)]


class SqliteDialect(Dialect):
    name = "sqlite"
    for_update = ""
    autoid = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def in_list(self, column: str, values: Sequence[Any], sql_type: str = "BIGINT") -> tuple[str, list[Any]]:
        import json

        return f"{column} IN (SELECT value FROM json_each(?))", [json.dumps(list(values))]


POSTGRES = PostgresDialect()
SQLITE = SqliteDialect()


# --- transactions ------------------------------------------------------------------------------


class Tx:
    """One open transaction; every query is written with ``?`` placeholders."""

    def __init__(self, dialect: Dialect, cursor: Any) -> None:
        self.dialect = dialect
        self._cur = cursor

    @property
    def for_update(self) -> str:
        return self.dialect.for_update

    def in_list(self, column: str, values: Sequence[Any], sql_type: str = "BIGINT") -> tuple[str, list[Any]]:
        return self.dialect.in_list(column, values, sql_type)

    def execute(self, query: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; return the affected row count."""
        self._cur.execute(self.dialect.sql(query), tuple(params))
        return self._cur.rowcount

    def one(self, query: str, params: Sequence[Any] = ()) -> Row | None:
        self._cur.execute(self.dialect.sql(query), tuple(params))
        return self._cur.fetchone()

    def all(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        self._cur.execute(self.dialect.sql(query), tuple(params))
        return self._cur.fetchall()

    def scalar(self, query: str, params: Sequence[Any] = ()) -> Any:
        row = self.one(query, params)
        return None if row is None else next(iter(row.values()))

    def insert_many(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Bulk insert (``COPY`` on PostgreSQL); returns the number of rows written."""
        count = 0
        if self.dialect is POSTGRES:
            with self._cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    count += 1
            return count
        materialised = [tuple(row) for row in rows]
        if materialised:
            marks = ", ".join("?" for _ in columns)
            self._cur.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", materialised
            )
        return len(materialised)

    def advisory_lock(self, key: int) -> None:
        """Serialise with other transactions taking ``key`` until commit (no-op on SQLite, which
        already serialises every write transaction)."""
        if self.dialect is POSTGRES:
            self._cur.execute("SELECT pg_advisory_xact_lock(%s)", (key,))


# --- the database ------------------------------------------------------------------------------


def _sqlite_path(url: str) -> str:
    path = url[len("sqlite:///") :]
    if path in ("", ":memory:"):
        raise ValueError("sqlite URL needs a file path (the ledger is shared by worker threads)")
    return path


def _dict_factory(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {description[0]: value for description, value in zip(cursor.description, row, strict=True)}


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
        return True
    if isinstance(error, psycopg.errors.LockNotAvailable):
        return True
    if isinstance(error, sqlite3.OperationalError):
        text = str(error).lower()
        return "locked" in text or "busy" in text
    return False


def _as_conflict(error: BaseException) -> UniqueConflict | None:
    if isinstance(error, psycopg.errors.UniqueViolation):
        constraint = getattr(error.diag, "constraint_name", None) or ""
        return UniqueConflict(constraint or str(error))
    if isinstance(error, sqlite3.IntegrityError) and "UNIQUE" in str(error).upper():
        return UniqueConflict(str(error))
    return None


class Database:
    """A connection pool plus the worker threads that use it. Open with ``Database.open(url)``."""

    def __init__(self, url: str, *, pool_min: int = 2, pool_max: int = 16, sqlite_workers: int = 4) -> None:
        self.url = url
        self._closed = False
        self._pg_pool: ConnectionPool | None = None
        self._sqlite_path: str | None = None
        self._sqlite_local = threading.local()
        self._sqlite_conns: list[sqlite3.Connection] = []
        self._sqlite_lock = threading.Lock()
        if url.startswith("sqlite:///"):
            self.dialect: Dialect = SQLITE
            self._sqlite_path = _sqlite_path(url)
            Path(self._sqlite_path).parent.mkdir(parents=True, exist_ok=True)
            workers = sqlite_workers
        else:
            self.dialect = POSTGRES
            self._pg_pool = ConnectionPool(
                url,
                min_size=min(pool_min, pool_max),
                max_size=pool_max,
                kwargs={"autocommit": False, "row_factory": dict_row},
                open=False,
                name="retarget",
            )
            workers = pool_max
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retarget-db")

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> Database:
        database = cls(url, **kwargs)
        if database._pg_pool is not None:
            database._pg_pool.open(wait=True, timeout=15.0)
        return database

    @property
    def is_postgres(self) -> bool:
        return self.dialect is POSTGRES

    # -- sync API ----------------------------------------------------------------------------

    def _sqlite_connection(self) -> sqlite3.Connection:
        conn = getattr(self._sqlite_local, "conn", None)
        if conn is None:
            assert self._sqlite_path is not None
            conn = sqlite3.connect(
                self._sqlite_path, isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.row_factory = _dict_factory
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a killed process loses nothing committed (the OS has the pages);
            # only a power cut may lose the last transactions. The demo's embedded ledger accepts that.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._sqlite_local.conn = conn
            with self._sqlite_lock:
                self._sqlite_conns.append(conn)
        return conn

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        if self._closed:
            raise RuntimeError("database is closed")
        if self._pg_pool is not None:
            with self._pg_pool.connection() as pg, pg.cursor() as pg_cursor:
                # The pool's context commits on success and rolls back on an exception.
                yield Tx(POSTGRES, pg_cursor)
            return
        conn = self._sqlite_connection()
        cursor = conn.cursor()
        # IMMEDIATE takes the write lock up front: two deferred writers upgrading at once would
        # otherwise fail with SQLITE_BUSY instead of waiting.
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield Tx(SQLITE, cursor)
        except BaseException:
            conn.rollback()
            raise
        else:
            conn.commit()
        finally:
            cursor.close()

    def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        write: bool = True,
        conflict_retries: int = 3,
        transient_retries: int = 8,
        **kwargs: Any,
    ) -> T:
        """``fn(tx, *args, **kwargs)`` in a transaction, retried on deadlocks and unique conflicts.

        Retrying is safe because the failed attempt rolled back entirely; ``fn`` re-reads what it
        needs (and usually finds the concurrent winner's row on the second attempt).
        """
        conflicts = transients = 0
        while True:
            try:
                with self.transaction(write=write) as tx:
                    return fn(tx, *args, **kwargs)
            except Exception as error:
                conflict = _as_conflict(error)
                if conflict is not None:
                    conflicts += 1
                    if conflicts > conflict_retries:
                        raise conflict from error
                    continue
                if _is_transient(error):
                    transients += 1
                    if transients > transient_retries:
                        raise TransientError(str(error)) from error
                    time.sleep(min(0.2, 0.002 * 2**transients) * random.random())
                    continue
                raise

    # -- async API ---------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call`` on a worker thread; the trace context follows the call into the thread."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        bound = functools.partial(self.call, fn, *args, **kwargs)
        try:
            return await loop.run_in_executor(self._executor, context.run, bound)
        except TransientError as error:
            raise Aborted(f"the ledger is busy, retry: {error}", retry_after_seconds=0.2) from error
        except (psycopg.OperationalError, PoolTimeout) as error:
            # Connection lost or pool exhausted. A write may or may not have committed: callers
            # retry with the same idempotency key / request id, which makes that safe.
            logger.warning("ledger unavailable", exc_info=True)
            raise Unavailable(
                f"the ledger is unavailable: {type(error).__name__}", retry_after_seconds=1.0
            ) from error

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._pg_pool is not None:
            self._pg_pool.close()
        with self._sqlite_lock:
            for conn in self._sqlite_conns:
                with suppress(sqlite3.Error):
                    conn.close()
            self._sqlite_conns.clear()

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)


__all__ = [
    "POSTGRES",
    "SQLITE",
    "Database",
    "Dialect",
    "Row",
    "TransientError",
    "Tx",
    "UniqueConflict",
]
