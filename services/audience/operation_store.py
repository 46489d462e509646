"""Operation records, the build queue and pack reservations in the control database.

Shared by every audience replica and worker (``control_db.py``: PostgreSQL in deployments, SQLite
as the embedded default). Invariants:

* **One row per operation** ``(tenant, op_id)``; ``state`` goes ``queued -> running -> done`` (a
  running job whose owner stopped goes back to ``queued``). ``record`` is the serialized
  ``google.longrunning.Operation``. Once ``state = 'done'`` no statement here changes the row again
  (every update is guarded by ``state <> 'done'``), so a finished operation never changes its result.
* **Request ids are unique** per tenant (``UNIQUE (tenant, request_key)``): two replicas accepting
  the same request at once insert one row; the loser reads the winner's operation.
* **Owner leases.** A claimed job carries ``owner`` (the replica running it) and ``lease_until``;
  the owner's heartbeat extends it. Only a job whose lease expired is taken from its owner: a
  *portable* job (``payload`` rebuilds it in any process) is queued again and re-run by whoever claims
  it next; a job that only its starting process can run (an in-process closure) is finished with
  UNAVAILABLE "server restarted; retry". The owner's final write is guarded by ``owner = me AND
  state = 'running'``: after losing its lease it cannot overwrite the new owner's result.
* **Claims** take the oldest queued job of the tenant with the fewest running jobs, ties going to
  the tenant served least recently (skipping tenants at their running cap); PostgreSQL claims with
  ``FOR UPDATE SKIP LOCKED`` so that replicas claim different jobs without waiting on each other,
  SQLite serialises claims under its write lock.
  The running cap is soft across PostgreSQL replicas (two may claim for one tenant at once).
* **Reservations** ``(tenant, resource)`` keep a pack id to one build or upload: held either by an
  operation (released in the transaction that finishes it) or for a short lease by a synchronous
  call (released at its end; a crashed holder's lease simply expires).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.audience.control_db import ControlDatabase, Dialect, Execute

QUEUED, RUNNING, DONE = "queued", "running", "done"


def operation_schema(dialect: Dialect) -> list[str]:
    blob = "BYTEA" if dialect == "postgresql" else "BLOB"
    real = "DOUBLE PRECISION" if dialect == "postgresql" else "REAL"
    return [
        f"""CREATE TABLE IF NOT EXISTS audience_operations (
            tenant TEXT NOT NULL,
            op_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            request_key TEXT,
            fingerprint TEXT NOT NULL DEFAULT '',
            state TEXT NOT NULL,
            portable INTEGER NOT NULL DEFAULT 0,
            payload {blob},
            trace TEXT NOT NULL DEFAULT '',
            owner TEXT,
            lease_until {real} NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            claimed_at {real} NOT NULL DEFAULT 0,
            record {blob} NOT NULL,
            PRIMARY KEY (tenant, op_id),
            UNIQUE (tenant, request_key)
        )""",
        "CREATE INDEX IF NOT EXISTS audience_operations_state ON audience_operations (state, tenant)",
        f"""CREATE TABLE IF NOT EXISTS audience_reservations (
            tenant TEXT NOT NULL,
            resource TEXT NOT NULL,
            holder TEXT NOT NULL,
            op_id TEXT,
            lease_until {real} NOT NULL DEFAULT 0,
            PRIMARY KEY (tenant, resource)
        )""",
    ]


@dataclass(frozen=True)
class StoredOperation:
    tenant: str
    op_id: str
    kind: str
    state: str
    record: bytes
    request_key: str = ""
    fingerprint: str = ""
    portable: bool = False
    owner: str = ""
    attempts: int = 0


@dataclass(frozen=True)
class Claimed:
    """A job this worker now owns: run it, then ``finish`` (or ``hand_back``) it."""

    operation: StoredOperation
    payload: bytes
    trace: str


_COLUMNS = "tenant, op_id, kind, state, record, request_key, fingerprint, portable, owner, attempts"


def _row(row: Sequence) -> StoredOperation:
    return StoredOperation(
        tenant=row[0], op_id=row[1], kind=row[2], state=row[3], record=bytes(row[4]),
        request_key=row[5] or "", fingerprint=row[6] or "", portable=bool(row[7]), owner=row[8] or "",
        attempts=int(row[9] or 0),
    )  # fmt: skip


class ReservationConflict(Exception):
    """The resource is held: ``holder`` names the operation (or call) holding it."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class OperationStore:
    """The SQL of the control plane; every method is one short transaction (blocking)."""

    def __init__(self, db: ControlDatabase) -> None:
        self.db = db
        db.create(operation_schema(db.dialect))
        self._skip_locked = " FOR UPDATE SKIP LOCKED" if db.dialect == "postgresql" else ""

    # --- records ----------------------------------------------------------------------------------

    def insert(
        self,
        operation: StoredOperation,
        *,
        payload: bytes | None,
        trace: str,
        owner: str,
        lease_until: float,
        tenant_queued_limit: int | None,
        active_limit: int | None,
        reservation: tuple[str, str] | None = None,
    ) -> tuple[StoredOperation | None, str]:
        """Queue a new operation. Returns ``(existing, "")`` when its request key is taken (nothing
        written), ``(None, refusal)`` with ``"tenant"``/``"active"`` when a limit refused it, and
        ``(None, "")`` once inserted. ``reservation`` ``(resource, temporary holder)`` passes that
        reservation to the operation in the same transaction (``ReservationConflict`` if lost)."""
        try:
            with self.db.transaction() as execute:
                if operation.request_key:
                    found = execute(
                        f"SELECT {_COLUMNS} FROM audience_operations WHERE tenant = ? AND request_key = ?",
                        (operation.tenant, operation.request_key),
                    ).fetchone()
                    if found is not None:
                        return _row(found), ""
                if tenant_queued_limit is not None:
                    (queued,) = execute(
                        "SELECT count(*) FROM audience_operations WHERE tenant = ? AND state = ?",
                        (operation.tenant, QUEUED),
                    ).fetchone()
                    if queued >= tenant_queued_limit:
                        return None, f"tenant:{queued}"
                if active_limit is not None:
                    (active,) = execute(
                        "SELECT count(*) FROM audience_operations WHERE state <> ?", (DONE,)
                    ).fetchone()
                    if active >= active_limit:
                        return None, f"active:{active}"
                execute(
                    "INSERT INTO audience_operations (tenant, op_id, kind, request_key, fingerprint, state,"
                    " portable, payload, trace, owner, lease_until, record) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (operation.tenant, operation.op_id, operation.kind, operation.request_key or None,
                     operation.fingerprint, QUEUED, int(operation.portable), payload, trace,
                     owner or None, lease_until, operation.record),
                )  # fmt: skip
                if reservation is not None:
                    resource, holder = reservation
                    moved = execute(
                        "UPDATE audience_reservations SET holder = ?, op_id = ?, lease_until = 0"
                        " WHERE tenant = ? AND resource = ? AND holder = ?",
                        (operation_name_of(operation), operation.op_id, operation.tenant, resource, holder),
                    ).rowcount
                    if moved != 1:
                        raise ReservationConflict(self._holder(execute, operation.tenant, resource) or "")
                return None, ""
        except Exception as error:
            if operation.request_key and self.db.is_unique_violation(error):
                existing = self.by_request(operation.tenant, operation.request_key)
                if existing is not None:  # another replica accepted the same request meanwhile
                    return existing, ""
            raise

    def by_request(self, tenant: str, request_key: str) -> StoredOperation | None:
        with self.db.transaction() as execute:
            row = execute(
                f"SELECT {_COLUMNS} FROM audience_operations WHERE tenant = ? AND request_key = ?",
                (tenant, request_key),
            ).fetchone()
        return _row(row) if row is not None else None

    def get(self, tenant: str, op_id: str) -> StoredOperation | None:
        with self.db.transaction() as execute:
            row = execute(
                f"SELECT {_COLUMNS} FROM audience_operations WHERE tenant = ? AND op_id = ?", (tenant, op_id)
            ).fetchone()
        return _row(row) if row is not None else None

    def page(self, tenant: str, *, before: str, limit: int, done: bool | None) -> list[StoredOperation]:
        """Newest first (ids sort by creation), ids below ``before`` when given."""
        sql = f"SELECT {_COLUMNS} FROM audience_operations WHERE tenant = ?"
        params: list = [tenant]
        if before:
            sql += " AND op_id < ?"
            params.append(before)
        if done is not None:
            sql += " AND state = ?" if done else " AND state <> ?"
            params.append(DONE)
        sql += " ORDER BY op_id DESC LIMIT ?"
        params.append(limit)
        with self.db.transaction() as execute:
            return [_row(r) for r in execute(sql, params).fetchall()]

    def delete(self, tenant: str, op_id: str) -> bool:
        """Delete a finished operation (False when it is not done)."""
        with self.db.transaction() as execute:
            return (
                execute(
                    "DELETE FROM audience_operations WHERE tenant = ? AND op_id = ? AND state = ?",
                    (tenant, op_id, DONE),
                ).rowcount
                == 1
            )

    def count(self, tenant: str, state: str) -> int:
        with self.db.transaction() as execute:
            (n,) = execute(
                "SELECT count(*) FROM audience_operations WHERE tenant = ? AND state = ?", (tenant, state)
            ).fetchone()
        return int(n)

    # --- the queue --------------------------------------------------------------------------------

    def claim(
        self, owner: str, lease_until: float, *, portable: bool, pinned: bool, max_running: int | None
    ) -> Claimed | None:
        """Take the next queued job this worker may run (see the module doc), or None."""
        kinds = []
        params: list = []
        if portable:
            kinds.append("portable = 1")
        if pinned:
            kinds.append("(portable = 0 AND owner = ?)")
            params.append(owner)
        if not kinds:
            return None
        running = (
            "(SELECT count(*) FROM audience_operations r WHERE r.tenant = o.tenant AND r.state = 'running')"
        )
        served = "(SELECT max(r.claimed_at) FROM audience_operations r WHERE r.tenant = o.tenant)"
        sql = (
            f"SELECT o.tenant, o.op_id FROM audience_operations o WHERE o.state = 'queued'"
            f" AND ({' OR '.join(kinds)})"
        )
        if max_running is not None:
            sql += f" AND {running} < ?"
            params.append(max_running)
        sql += f" ORDER BY {running}, {served}, o.op_id LIMIT 1{self._skip_locked}"
        with self.db.transaction() as execute:
            found = execute(sql, params).fetchone()
            if found is None:
                return None
            tenant, op_id = found
            execute(
                "UPDATE audience_operations SET state = ?, owner = ?, lease_until = ?,"
                " attempts = attempts + 1, claimed_at = ? WHERE tenant = ? AND op_id = ?",
                (RUNNING, owner, lease_until, time.time(), tenant, op_id),
            )
            row = execute(
                f"SELECT {_COLUMNS}, payload, trace FROM audience_operations WHERE tenant = ? AND op_id = ?",
                (tenant, op_id),
            ).fetchone()
        return Claimed(_row(row), bytes(row[10]) if row[10] is not None else b"", row[11] or "")

    def heartbeat(
        self, owner: str, lease_until: float, records: dict[tuple[str, str], bytes]
    ) -> set[tuple[str, str]]:
        """Extend the owner's leases, store fresher records of its running jobs; return the jobs
        whose cancellation was requested."""
        with self.db.transaction() as execute:
            execute(
                "UPDATE audience_operations SET lease_until = ? WHERE owner = ? AND state <> ?",
                (lease_until, owner, DONE),
            )
            for (tenant, op_id), record in records.items():
                execute(
                    "UPDATE audience_operations SET record = ? WHERE tenant = ? AND op_id = ? AND owner = ?"
                    " AND state = ?",
                    (record, tenant, op_id, owner, RUNNING),
                )
            rows = execute(
                "SELECT tenant, op_id FROM audience_operations WHERE owner = ? AND state = ?"
                " AND cancel_requested = 1",
                (owner, RUNNING),
            ).fetchall()
        return {(t, o) for t, o in rows}

    def finish(self, tenant: str, op_id: str, record: bytes, *, owner: str | None) -> bool:
        """Record the final result once: as the running owner (``owner``), or of a job not running
        anywhere (``owner=None``: a queued job cancelled, or a dead owner's pinned job). False when
        the row is done already or another owner holds it (then nothing changes)."""
        with self.db.transaction() as execute:
            if owner is not None:
                changed = execute(
                    "UPDATE audience_operations SET state = ?, record = ?, payload = NULL, lease_until = 0"
                    " WHERE tenant = ? AND op_id = ? AND owner = ? AND state = ?",
                    (DONE, record, tenant, op_id, owner, RUNNING),
                ).rowcount
            else:
                changed = execute(
                    "UPDATE audience_operations SET state = ?, record = ?, payload = NULL, lease_until = 0"
                    " WHERE tenant = ? AND op_id = ? AND (state = ? OR (state = ? AND lease_until < ?))",
                    (DONE, record, tenant, op_id, QUEUED, RUNNING, time.time()),
                ).rowcount
            if changed == 1:
                execute("DELETE FROM audience_reservations WHERE tenant = ? AND op_id = ?", (tenant, op_id))
        return changed == 1

    def hand_back(self, tenant: str, op_id: str, owner: str, record: bytes) -> bool:
        """A stopping owner returns a portable job to the queue (another replica runs it)."""
        with self.db.transaction() as execute:
            return (
                execute(
                    "UPDATE audience_operations SET state = ?, owner = NULL, lease_until = 0, record = ?"
                    " WHERE tenant = ? AND op_id = ? AND owner = ? AND state = ? AND portable = 1",
                    (QUEUED, record, tenant, op_id, owner, RUNNING),
                ).rowcount
                == 1
            )

    def request_cancel(self, tenant: str, op_id: str) -> StoredOperation | None:
        with self.db.transaction() as execute:
            execute(
                "UPDATE audience_operations SET cancel_requested = 1"
                " WHERE tenant = ? AND op_id = ? AND state <> ?",
                (tenant, op_id, DONE),
            )
            row = execute(
                f"SELECT {_COLUMNS} FROM audience_operations WHERE tenant = ? AND op_id = ?", (tenant, op_id)
            ).fetchone()
        return _row(row) if row is not None else None

    def expire(self, now: float) -> list[StoredOperation]:
        """Queue again the portable jobs whose owner's lease expired; return the expired pinned
        ones (the caller finishes them with "server restarted")."""
        with self.db.transaction() as execute:
            execute(
                "UPDATE audience_operations SET state = ?, owner = NULL WHERE state = ? AND portable = 1"
                " AND lease_until < ?",
                (QUEUED, RUNNING, now),
            )
            rows = execute(
                f"SELECT {_COLUMNS} FROM audience_operations WHERE portable = 0 AND state <> ?"
                " AND owner IS NOT NULL AND lease_until < ?",
                (DONE, now),
            ).fetchall()
        return [_row(r) for r in rows]

    # --- reservations ------------------------------------------------------------------------------

    def _holder(self, execute: Execute, tenant: str, resource: str) -> str | None:
        """The live holder of a reservation (deleting one that is no longer held), else None."""
        row = execute(
            "SELECT holder, op_id, lease_until FROM audience_reservations WHERE tenant = ? AND resource = ?",
            (tenant, resource),
        ).fetchone()
        if row is None:
            return None
        holder, op_id, lease_until = row
        live = lease_until > time.time()
        if not live and op_id:
            state = execute(
                "SELECT state FROM audience_operations WHERE tenant = ? AND op_id = ?", (tenant, op_id)
            ).fetchone()
            live = state is not None and state[0] != DONE
        if live:
            return str(holder)
        execute("DELETE FROM audience_reservations WHERE tenant = ? AND resource = ?", (tenant, resource))
        return None

    def reserve(self, tenant: str, resource: str, holder: str, lease_seconds: float) -> None:
        """Hold ``resource`` for ``holder`` (``ReservationConflict`` naming the live holder)."""
        try:
            with self.db.transaction() as execute:
                current = self._holder(execute, tenant, resource)
                if current is not None:
                    raise ReservationConflict(current)
                execute(
                    "INSERT INTO audience_reservations (tenant, resource, holder, lease_until)"
                    " VALUES (?,?,?,?)",
                    (tenant, resource, holder, time.time() + lease_seconds),
                )
        except ReservationConflict:
            raise
        except Exception as error:
            if self.db.is_unique_violation(error):  # another replica inserted it first
                raise ReservationConflict(self.holder(tenant, resource) or "another call") from None
            raise

    def holder(self, tenant: str, resource: str) -> str | None:
        with self.db.transaction() as execute:
            return self._holder(execute, tenant, resource)

    def release(self, tenant: str, resource: str, holder: str) -> None:
        with self.db.transaction() as execute:
            execute(
                "DELETE FROM audience_reservations WHERE tenant = ? AND resource = ? AND holder = ?",
                (tenant, resource, holder),
            )


def operation_name_of(operation: StoredOperation) -> str:
    return f"tenants/{operation.tenant}/operations/{operation.op_id}"


__all__ = [
    "DONE",
    "QUEUED",
    "RUNNING",
    "Claimed",
    "OperationStore",
    "ReservationConflict",
    "StoredOperation",
    "operation_name_of",
    "operation_schema",
]
