"""The audit log: who called which admin, destructive or member-level method, on what, and how it ended.

Which calls (``catalog.MethodInfo.audited``): GatewayService writes (tenant and key admin), every
destructive method (``Delete*``, ``Cancel*``, ``Pause*``, ``Revoke*``) and every member-level one
(scopes ``members.read`` / ``members.write``: CheckMembership, ExportPack, StreamOffers, claims,
redemptions, refunds), plus the gateway's own purge calls. An entry is written for every such call
made by an authenticated principal, whatever its outcome (PERMISSION_DENIED attempts included),
except calls refused by the rate limiter (they did nothing, and would let one caller flood the
log); unauthenticated attempts have no principal and are counted by metrics and logs instead.

An entry holds who (principal kind, tenant, subject, how it authenticated, client address, request
id), what (the gRPC method and the resource names of the request, at most ``MAX_RESOURCES``), the
tenant acted on (the caller's own, or the tenant of the first resource for platform and system
principals: a tenant admin sees what the platform and the system admins did to its tenant), when,
and the status code.

Writing never slows a call: ``AuditLog.record`` puts the entry on a bounded queue and returns (the
request's resource names are read later, by the writer); one writer task drains it in batches (one
transaction each, in a worker thread) into ``gateway_audit_log`` in the key store, so every replica
writes to the same table (SQLite or PostgreSQL). Each entry is also logged as a structured JSON line
(logger ``flashcrowd.audit``, field ``audit``; ``FLASHCROWD_AUDIT_LOG_LINES=false`` turns that off)
before its batch is written, so the log holds it even when the database is down. When the queue is
full the entry is dropped, counted (``flashcrowd.gateway.audit.dropped``) and logged (at most one
warning per ``DROP_LOG_SECONDS``); a batch that still fails after ``WRITE_ATTEMPTS`` is dropped the
same way. ``close`` flushes what is queued (shutdown).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import grpc
from google.protobuf.message import Message

from services.gateway.catalog import MethodInfo, iter_resource_values
from services.gateway.keystore import KeyStore
from services.gateway.metrics import GatewayMetrics
from services.runtime.tenant_ids import valid_tenant_id

logger = logging.getLogger(__name__)
audit_logger = logging.getLogger("flashcrowd.audit")

MAX_RESOURCES = 16
MAX_RESOURCE_LENGTH = 256
WRITE_ATTEMPTS = 3
DROP_LOG_SECONDS = 10.0
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_COLUMNS = (
    "entry_id, time, tenant, principal_kind, principal_tenant, subject, auth_method, method, resources, "
    "status_code, transport, client_address, request_id"
)


@dataclass(frozen=True)
class AuditEntry:
    """One audited call, as stored (``entry_id`` is assigned by the database)."""

    time: float
    tenant: str
    principal_kind: str
    principal_tenant: str
    subject: str
    auth_method: str
    method: str
    resources: tuple[str, ...]
    status_code: str
    transport: str
    client_address: str = ""
    request_id: str = ""
    entry_id: int | None = None
    #: ``(method, request, resource_hint)`` whose resources (and the tenant acted on) are read by the
    #: writer, off the call path (``resolved``); None once resolved.
    pending: tuple[MethodInfo, Message | None, tuple[str, ...]] | None = field(
        default=None, compare=False, repr=False
    )

    @property
    def name(self) -> str:
        prefix = f"tenants/{self.tenant}/" if self.tenant else ""
        return f"{prefix}auditEntries/{self.entry_id}"

    def resolved(self) -> AuditEntry:
        """The entry with its resources and tenant filled in from the pending request."""
        if self.pending is None:
            return self
        info, request, hint = self.pending
        resources = request_resources(info, request) or hint
        return replace(
            self, resources=resources, tenant=acted_on(self.principal_tenant, resources), pending=None
        )

    def to_log(self) -> dict[str, object]:
        fields = asdict(replace(self, pending=None))
        fields.pop("entry_id")
        fields.pop("pending")
        fields["resources"] = list(self.resources)
        return fields


def status_name(code: int) -> str:
    """``5`` -> ``NOT_FOUND``."""
    return _CODE_NAMES.get(code, str(code))


def request_resources(info: MethodInfo, message: Message | None) -> tuple[str, ...]:
    """The resource names a request carries (deduplicated, in order, capped)."""
    if message is None:
        return ()
    if info.name == "CreateTenant":  # names its tenant by id, not by resource name
        tenant_id = getattr(message, "tenant_id", "")
        return (f"tenants/{tenant_id}"[:MAX_RESOURCE_LENGTH],) if tenant_id else ()
    seen: dict[str, None] = {}
    for _, value, _ in iter_resource_values(message):
        seen.setdefault(value[:MAX_RESOURCE_LENGTH])
        if len(seen) >= MAX_RESOURCES:
            break
    return tuple(seen)


def acted_on(principal_tenant: str | None, resources: Sequence[str]) -> str:
    """The tenant a call acted on: the caller's own, else the tenant of the first resource."""
    if principal_tenant:
        return principal_tenant
    for resource in resources:
        prefix, _, rest = resource.partition("/")
        tenant = rest.partition("/")[0]
        if prefix == "tenants" and valid_tenant_id(tenant):
            return tenant
    return ""


def write_entries(store: KeyStore, entries: Sequence[AuditEntry]) -> None:
    """Append ``entries`` in one transaction (blocking)."""
    rows = [
        (
            entry.time,
            entry.tenant,
            entry.principal_kind,
            entry.principal_tenant,
            entry.subject,
            entry.auth_method,
            entry.method,
            json.dumps(list(entry.resources)),
            entry.status_code,
            entry.transport,
            entry.client_address,
            entry.request_id,
        )
        for entry in entries
    ]
    with store.transaction() as cursor:
        cursor.executemany(
            "INSERT INTO gateway_audit_log (time, tenant, principal_kind, principal_tenant, subject, "
            "auth_method, method, resources, status_code, transport, client_address, request_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def list_entries(
    store: KeyStore,
    *,
    tenant: str | None,
    method: str | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[AuditEntry]:
    """Entries newest first; ``tenant`` None means every tenant (and entries of none)."""
    sql = f"SELECT {_COLUMNS} FROM gateway_audit_log WHERE 1 = 1"
    params: list[object] = []
    for condition, value in (
        ("tenant = ?", tenant),
        ("method = ?", method),
        ("time >= ?", start_time),
        ("time < ?", end_time),
        ("entry_id < ?", before_id),
    ):
        if value is not None:
            sql += f" AND {condition}"
            params.append(value)
    sql += " ORDER BY entry_id DESC LIMIT ?"
    params.append(limit)
    with store.transaction() as cursor:
        rows = cursor.execute(sql, params).fetchall()
    entries = []
    for row in rows:
        entry_id, *values, resources, status, transport, client, request_id = row
        entries.append(
            AuditEntry(
                values[0],
                values[1],
                values[2],
                values[3],
                values[4],
                values[5],
                values[6],
                tuple(json.loads(resources)),
                status,
                transport,
                client,
                request_id,
                entry_id=int(entry_id),
            )
        )
    return entries


class AuditLog:
    """The bounded queue and its writer task; ``record`` never blocks."""

    def __init__(
        self,
        store: KeyStore,
        metrics: GatewayMetrics | None = None,
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        log_lines: bool = True,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.batch_size = batch_size
        self.log_lines = log_lines
        self._queue: asyncio.Queue[AuditEntry] = asyncio.Queue(maxsize=queue_size)
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._unlogged_drops = 0
        self._last_drop_log = float("-inf")
        #: Entries dropped (queue full, write failed, or recorded after close) and written.
        self.dropped = 0
        self.written = 0

    def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    def record(self, entry: AuditEntry) -> None:
        """Queue ``entry`` for writing; drop it (counted, logged) when the queue is full."""
        if self._closed:
            self._drop(1, "the audit log is closed")
            return
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self._drop(1, "the audit queue is full")

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        self._unlogged_drops += count
        if self.metrics is not None:
            self.metrics.audit_dropped.add(count)
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_SECONDS:
            logger.warning(
                "audit entries dropped: %s",
                why,
                extra={"audit_dropped": self._unlogged_drops, "audit_dropped_total": self.dropped},
            )
            self._last_drop_log = now
            self._unlogged_drops = 0

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued so far is written (or dropped)."""
        if self._writer is None:
            return
        await asyncio.wait_for(self._queue.join(), timeout)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking entries, write the queued ones (up to ``timeout``), stop the writer."""
        self._closed = True
        if self._writer is None:
            return
        try:
            await self.flush(timeout)
        except TimeoutError:
            logger.error("audit log not flushed within %.1f s at shutdown", timeout)
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        self._writer = None
        left = self._queue.qsize()
        if left:
            self._drop(left, "unwritten at shutdown")

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[AuditEntry]) -> None:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                await asyncio.to_thread(self._write_batch, batch, self.log_lines and attempt == 1)
            except asyncio.CancelledError:
                raise
            except Exception:
                if attempt == WRITE_ATTEMPTS:
                    logger.exception("audit batch of %d entries not written", len(batch))
                    self._drop(len(batch), "the audit table could not be written")
                    return
                await asyncio.sleep(0.2 * 2**attempt)
            else:
                self.written += len(batch)
                if self.metrics is not None:
                    self.metrics.audit_written.add(len(batch))
                return

    def _write_batch(self, batch: list[AuditEntry], log: bool) -> None:
        batch[:] = [entry.resolved() for entry in batch]
        if log:
            for entry in batch:
                audit_logger.info(
                    "audit %s %s %s",
                    entry.method,
                    entry.status_code,
                    entry.tenant,
                    extra={"audit": entry.to_log()},
                )
        write_entries(self.store, batch)


__all__ = [
    "AuditEntry",
    "AuditLog",
    "acted_on",
    "list_entries",
    "request_resources",
    "status_name",
    "write_entries",
]
