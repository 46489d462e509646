"""Long-running operations for pack builds and other slow jobs, shared by every replica.

``OperationManager`` accepts jobs into the **shared queue** of the control database
(``operation_store.py``: PostgreSQL in deployments, SQLite as the embedded default), runs queued jobs
on ``max_workers`` worker threads, and keeps each job's ``google.longrunning.Operation`` (live
metadata: stage, percent) in that database, so that any replica answers GetOperation, WaitOperation,
ListOperations and CancelOperation for any operation.

Two kinds of job:

* **portable** (``payload`` given for a kind in ``runners``): any replica or ``audience-worker``
  process may claim it. If its owner dies (lease expired) another claims it and runs it again
  (``JobContext.attempt`` > 1, so the job can find what the first run already published); a stopping
  owner hands it back to the queue. Pack builds are portable.
* **pinned** (a closure ``fn(ctx)``): only the process that accepted it can run it; if that process
  dies, the first replica to notice the expired lease finishes it UNAVAILABLE "server restarted;
  retry", and a process that stops cancels it.

Fairness: a free worker claims the oldest queued job of the tenant with the fewest running jobs,
skipping tenants already running ``tenant_max_running`` jobs: a tenant that queued 20 builds delays
another tenant's one build by at most the builds already running, never by its 20. Admission
refuses (RESOURCE_EXHAUSTED, nothing recorded):

* a tenant with ``queued_limit`` jobs already waiting (reason ``TENANT_QUOTA``, QuotaFailure naming
  ``FLASHCROWD_TENANT_MAX_QUEUED_BUILDS``), unless the caller is exempt (platform principals);
* anyone once ``max_workers + max_queued`` jobs of all tenants are queued or running (the global
  safety cap, reason ``TOO_MANY_BUILDS``), and everyone while this process shuts down.

A job's ``ctx.progress(stage, percent)`` updates the metadata (written at the next heartbeat) and
raises ``OperationCancelled`` once the operation was cancelled, on any replica. Its result is packed
into ``Operation.response``; a ``ServiceError`` becomes ``Operation.error`` with the same
``google.rpc.Status`` (ErrorInfo, BadRequest...) the error interceptor would send for a unary call.
Every operation ends exactly once: the final write is guarded in SQL, and a finished operation's row
never changes again.

``OperationsServicer`` is the standard ``google.longrunning.Operations`` service over a manager:
names are ``tenants/{tenant}/operations/{id}``, and another tenant's operations are NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from flashcrowd.audience.v1 import lookalike_pb2, pack_pb2
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry import context as otel_context
from opentelemetry import propagate

from services.audience.operation_store import (
    DONE,
    QUEUED,
    Claimed,
    OperationStore,
    ReservationConflict,
    StoredOperation,
)
from services.audience.privacy import Discloser, fingerprint_of_pack, is_exact_for
from services.audience.quotas import Limit, quota_refusal
from services.audience.tenancy import (
    OPERATION_TYPE,
    Tenancy,
    operation_name,
    parse_operation_name,
    parse_operations_parent,
)
from services.runtime import (
    DOMAIN,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

logger = logging.getLogger(__name__)

RESTARTED_MESSAGE = "server restarted; retry"
SHUTDOWN_MESSAGE = "server shutting down; retry"
_OP_ID_CHARS = frozenset("0123456789abcdef")


class OperationCancelled(Exception):
    """Raised inside a job (by ``JobContext.progress``) once its operation was cancelled."""


def _now_ts() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _new_id() -> str:
    # Sortable by creation (nanosecond clock), unique across processes (random suffix): 24 hex chars.
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


def status_of(error: BaseException, *, operation: str = "") -> status_pb2.Status:
    """The ``google.rpc.Status`` an operation records for a job that raised ``error``.

    Domain errors keep their full mapping (the one the interceptor uses); anything else is INTERNAL
    with a generic message: the stack trace is logged, never stored in the operation.
    """
    if isinstance(error, ServiceError):
        return error.to_status()
    if isinstance(error, OperationCancelled):
        status = status_pb2.Status(code=code_pb2.CANCELLED, message=str(error) or "operation cancelled")
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason="CANCELLED", domain=DOMAIN))
        return status
    status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN, metadata={"operation": operation})
    )
    return status


def _restart_status(message: str) -> status_pb2.Status:
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="SERVER_RESTARTED", domain=DOMAIN))
    return status


def _set_field(metadata: Message, field_name: str, value: object) -> None:
    """Set a metadata field when this metadata type has it (operations carry several types)."""
    if field_name in metadata.DESCRIPTOR.fields_by_name:
        setattr(metadata, field_name, value)


def _set_time(metadata: Message, field_name: str, *, only_if_unset: bool = False) -> None:
    if field_name not in metadata.DESCRIPTOR.fields_by_name:
        return
    if only_if_unset and metadata.HasField(field_name):
        return
    getattr(metadata, field_name).CopyFrom(_now_ts())


#: A job: ``fn(ctx) -> Message``, run in a worker thread of the process that started it.
JobFn = Callable[["JobContext"], Any]
#: A portable job kind: rebuilds and runs a job from its payload in any process (replica or worker).
PortableRunner = Callable[["JobContext", bytes], Message]


@dataclass
class JobContext:
    """Handed to a running job: progress reporting and cancellation."""

    operation: str
    _job: _Job
    _manager: OperationManager
    #: 1 on the first run; more when an earlier owner died or handed the job back (a re-run must
    #: not publish twice: see ``PackBuilds``).
    attempt: int = 1

    def progress(self, stage: str | None = None, percent: float | None = None) -> None:
        """Update the operation's metadata; raise ``OperationCancelled`` if it was cancelled."""
        self._manager._progress(self._job, stage, percent)
        self.check_cancelled()

    @property
    def cancelled(self) -> bool:
        return self._job.cancel.is_set()

    def check_cancelled(self) -> None:
        if self._job.cancel.is_set():
            raise OperationCancelled(self._job.cancel_message)


@dataclass
class _Job:
    """An operation this process started or runs (its live metadata, cancel flag and waiters)."""

    tenant: str
    op_id: str
    kind: str
    metadata: Message
    portable: bool = False
    done: bool = False
    response: Any = None  # any_pb2.Any
    error: status_pb2.Status | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_message: str = "operation cancelled"
    #: "queued", "running" (here) or "done".
    phase: str = "queued"
    #: The metadata changed since the last heartbeat wrote it.
    dirty: bool = False
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)
    on_done: Callable[[], None] | None = None

    @property
    def name(self) -> str:
        return operation_name(self.tenant, self.op_id)

    def to_operation(self) -> operations_pb2.Operation:
        op = operations_pb2.Operation(name=self.name, done=self.done)
        if isinstance(self.metadata, any_pb2.Any):  # a metadata type this process does not know
            op.metadata.CopyFrom(self.metadata)
        else:
            op.metadata.Pack(self.metadata)
        if self.error is not None:
            op.error.CopyFrom(self.error)
        elif self.response is not None:
            op.response.CopyFrom(self.response)
        return op


def _parse_record(record: bytes) -> operations_pb2.Operation:
    return operations_pb2.Operation.FromString(record)


def _job_of(stored: StoredOperation) -> _Job:
    op = _parse_record(stored.record)
    return _Job(
        tenant=stored.tenant, op_id=stored.op_id, kind=stored.kind, metadata=_unpack_any(op.metadata),
        portable=stored.portable, done=op.done,
    )  # fmt: skip


def _unpack_any(value: any_pb2.Any) -> Message:
    """The message inside ``value`` if its type is known to this process, else the Any itself."""
    from google.protobuf import symbol_database

    type_name = value.TypeName()
    if not type_name:
        return empty_pb2.Empty()
    try:
        cls = symbol_database.Default().GetSymbol(type_name)
    except KeyError:
        return value
    message = cls()
    value.Unpack(message)
    return message


def request_fingerprint(request: Message) -> str:
    """Stable digest of a request, to tell an idempotent retry from a reused ``request_id``."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def new_replica_id() -> str:
    """Names this process as an owner of operations (host, pid and a random part)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


def _trace_carrier() -> str:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return json.dumps(carrier, sort_keys=True) if carrier else ""


def _trace_context(trace: str) -> otel_context.Context:
    try:
        carrier = json.loads(trace) if trace else {}
    except ValueError:
        carrier = {}
    return propagate.extract(carrier if isinstance(carrier, dict) else {})


class OperationManager:
    """Accepts jobs into the shared queue and runs queued jobs on worker threads; see the module doc."""

    def __init__(
        self,
        store: OperationStore,
        *,
        max_workers: int = 2,
        max_queued: int = 16,
        queued_limit: Limit | None = None,
        tenant_max_running: int | None = None,
        retry_after_seconds: float = 5.0,
        runners: Mapping[str, PortableRunner] | None = None,
        run_portable: bool = True,
        lease_seconds: float = 15.0,
        heartbeat_seconds: float = 1.0,
        poll_seconds: float = 0.5,
        replica_id: str = "",
        start_threads: bool = True,
    ) -> None:
        """``max_queued`` is the cap of jobs waiting in the whole queue; ``queued_limit`` the per-tenant
        one (none: only the global cap); ``tenant_max_running`` caps one tenant's running jobs.
        ``runners`` are the portable kinds this process can run; ``run_portable=False`` leaves them
        to worker processes (this process then runs only the jobs it started as closures).
        ``start_threads=False`` starts no workers and no heartbeat (a process that only reads)."""
        self.store = store
        self.max_workers = max_workers
        self.max_queued = max_queued
        self.queued_limit = queued_limit
        self.tenant_max_running = tenant_max_running
        self.retry_after_seconds = retry_after_seconds
        self.runners = dict(runners or {})
        self.run_portable = run_portable
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.replica_id = replica_id or new_replica_id()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._stopped = threading.Event()  # the heartbeat thread's sleep, cut short at close
        #: Jobs started or run by this process and not finished yet (fresh metadata, waiters).
        self._local: dict[tuple[str, str], _Job] = {}
        #: Closures of the jobs this process started that no other process can run.
        self._fns: dict[tuple[str, str], JobFn] = {}
        self._running = 0
        self._closing = False
        self._close_deadline: float | None = None
        self._threads: list[threading.Thread] = []
        if start_threads:
            self._start_threads()

    def _start_threads(self) -> None:
        for index in range(self.max_workers):
            worker = threading.Thread(target=self._work, name=f"audience-build-{index}", daemon=True)
            self._threads.append(worker)
            worker.start()
        beat = threading.Thread(target=self._heartbeat_loop, name="audience-operations-lease", daemon=True)
        self._threads.append(beat)
        beat.start()

    # --- starting jobs ----------------------------------------------------------------------------

    def find_request(
        self, tenant: str, request_key: str, fingerprint: str
    ) -> operations_pb2.Operation | None:
        """The operation an earlier call with the same ``request_key`` started (on any replica).

        Raise INVALID_ARGUMENT (field ``request_id``) when the key was used for a different request.
        """
        if not request_key:
            return None
        stored = self.store.by_request(tenant, request_key)
        if stored is None:
            return None
        if stored.fingerprint and fingerprint and stored.fingerprint != fingerprint:
            raise InvalidArgument("request_id", "already used for a different request")
        return self._current(stored)

    def queued(self, tenant: str) -> int:
        """Jobs of ``tenant`` accepted and not yet running (on any replica)."""
        return self.store.count(tenant, QUEUED)

    async def start(
        self,
        tenant: str,
        kind: str,
        fn: JobFn | None,
        metadata: Message,
        *,
        payload: bytes | None = None,
        request_key: str = "",
        fingerprint: str = "",
        on_done: Callable[[], None] | None = None,
        exempt: bool = False,
        reservation: tuple[str, str] | None = None,
    ) -> operations_pb2.Operation:
        """Accept a job into the shared queue and return its (not yet done) operation.

        A job of a portable kind (``payload`` given, ``kind`` in ``runners``) may run on any replica
        or worker; otherwise ``fn`` runs here. A ``request_key`` already used returns that earlier
        operation (INVALID_ARGUMENT ``request_id`` when the request differs). ``reservation``
        ``(resource, holder)`` is handed to the operation in the same transaction and released when
        it finishes. RESOURCE_EXHAUSTED (with RetryInfo) when the tenant already has ``queued_limit``
        jobs waiting (``exempt``: platform principals are not held to it) or ``max_workers +
        max_queued`` jobs are running or queued. ``on_done`` runs here after the outcome is recorded
        (only for jobs run by this process).
        """
        portable = payload is not None and kind in self.runners
        if not portable and fn is None:
            raise ValueError(f"job kind {kind!r} is not portable: pass fn")
        with self._lock:
            if self._closing:
                raise ResourceExhausted(
                    SHUTDOWN_MESSAGE, retry_after_seconds=self.retry_after_seconds, reason="SHUTTING_DOWN"
                )
        job = _Job(tenant=tenant, op_id=_new_id(), kind=kind, metadata=metadata, portable=portable,
                   on_done=on_done)  # fmt: skip
        _set_time(job.metadata, "start_time", only_if_unset=True)
        stored = StoredOperation(
            tenant=tenant, op_id=job.op_id, kind=kind, state=QUEUED,
            record=job.to_operation().SerializeToString(), request_key=request_key,
            fingerprint=fingerprint, portable=portable,
        )  # fmt: skip
        key = (tenant, job.op_id)
        if not portable:  # before the row exists, so that a worker of ours that claims it finds both
            with self._lock:
                self._local[key] = job
                self._fns[key] = fn  # type: ignore[assignment]
        # (A portable job is not kept here: whoever claims it, here or elsewhere, runs it from the
        # record, and readers here see its progress through the control database.)
        try:
            existing, refused = await asyncio.to_thread(
                self.store.insert,
                stored,
                payload=payload if portable else None,
                trace=_trace_carrier(),
                owner="" if portable else self.replica_id,
                lease_until=time.time() + self.lease_seconds,
                tenant_queued_limit=None if exempt or self.queued_limit is None else self.queued_limit.value,
                active_limit=self.max_workers + self.max_queued,
                reservation=reservation,
            )
        except BaseException:
            self._forget(key)
            raise
        if existing is not None or refused:
            self._forget(key)
        if existing is not None:
            if existing.fingerprint and fingerprint and existing.fingerprint != fingerprint:
                raise InvalidArgument("request_id", "already used for a different request")
            return self._current(existing)
        if refused.startswith("tenant:"):
            assert self.queued_limit is not None
            raise quota_refusal(tenant, self.queued_limit, used=int(refused[7:]),
                                retry_after_seconds=self.retry_after_seconds)  # fmt: skip
        if refused:
            limit = self.max_workers + self.max_queued
            raise ResourceExhausted(
                f"{refused[7:]} builds running or queued (limit {limit}); retry later",
                retry_after_seconds=self.retry_after_seconds,
                violations=[("builds", f"at most {limit} builds running or queued")],
                reason="TOO_MANY_BUILDS",
            )
        with self._lock:
            snapshot = job.to_operation()
            self._wakeup.notify()
        return snapshot

    def _forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._local.pop(key, None)
            self._fns.pop(key, None)

    # --- running jobs -----------------------------------------------------------------------------

    def _work(self) -> None:
        """A worker thread: claim the next job this process may run, run it, until closed."""
        while True:
            with self._lock:
                if self._closing:
                    return
            try:
                claimed = self.store.claim(
                    self.replica_id,
                    time.time() + self.lease_seconds,
                    portable=self.run_portable and bool(self.runners),
                    pinned=True,
                    max_running=self.tenant_max_running,
                )
            except Exception as error:  # the database is away: try again at the next poll
                logger.warning("could not claim queued operations: %s", error)
                claimed = None
            if claimed is None:
                with self._lock:
                    if not self._closing:
                        self._wakeup.wait(self.poll_seconds)
                continue
            self._run(claimed)

    def _run(self, claimed: Claimed) -> None:
        stored = claimed.operation
        key = (stored.tenant, stored.op_id)
        with self._lock:
            job = self._local.get(key)
            if job is None:  # a portable job accepted by another process
                job = self._local[key] = _job_of(stored)
            job.phase = "running"
            fn = self._fns.pop(key, None)
            self._running += 1
            closing = self._closing
        if closing:
            job.cancel_message = SHUTDOWN_MESSAGE
            job.cancel.set()
        if stored.portable:
            runner = self.runners[stored.kind]
            payload = claimed.payload

            def run_portable(ctx: JobContext) -> Message:
                return runner(ctx, payload)

            fn = run_portable
        ctx = JobContext(operation=job.name, _job=job, _manager=self, attempt=stored.attempts)
        response: Message | None = None
        error: BaseException | None = None
        token = otel_context.attach(_trace_context(claimed.trace))
        try:
            if fn is None:  # pinned to us but its closure is gone: we restarted under the same id
                raise Unavailable(RESTARTED_MESSAGE)
            ctx.check_cancelled()
            result = fn(ctx)
            if inspect.isawaitable(result):
                result = asyncio.run(_await(result))
            response = result
        except BaseException as exc:  # recorded in the operation, never lost
            error = exc
            if not isinstance(exc, ServiceError | OperationCancelled):
                logger.error("operation %s (%s) failed", job.name, job.kind, exc_info=exc)
        finally:
            otel_context.detach(token)
        try:
            if isinstance(error, OperationCancelled) and job.portable and self._handing_back(job):
                self._hand_back(job)
            else:
                self._finish(job, response, error, owner=self.replica_id)
        finally:
            with self._lock:
                self._running -= 1
                self._wakeup.notify_all()

    def _handing_back(self, job: _Job) -> bool:
        """A portable job cancelled because this process stops (not by a caller) goes back."""
        with self._lock:
            return self._closing and job.cancel_message == SHUTDOWN_MESSAGE

    def _hand_back(self, job: _Job) -> None:
        with self._lock:
            _set_field(job.metadata, "stage", "queued")  # back in the queue for another owner
            record = job.to_operation().SerializeToString()
        try:
            returned = self.store.hand_back(job.tenant, job.op_id, self.replica_id, record)
        except Exception:
            logger.exception("could not hand operation %s back; its lease will expire", job.name)
            returned = False
        if returned:
            logger.info("operation %s handed back to the queue at shutdown", job.name)
        self._forget((job.tenant, job.op_id))

    def _finish(
        self, job: _Job, response: Message | None, error: BaseException | None, *, owner: str | None
    ) -> None:
        """Record the outcome once, run ``on_done``, then make it visible and wake waiters."""
        status: status_pb2.Status | None = None
        packed: any_pb2.Any | None = None
        if error is None:
            try:
                packed = any_pb2.Any()
                packed.Pack(response if response is not None else empty_pb2.Empty())
            except Exception as exc:  # the job returned something that is not a message
                logger.error(
                    "operation %s returned %r, not a message", job.name, type(response), exc_info=exc
                )
                error = exc
        if error is not None:
            status, packed = status_of(error, operation=job.name), None
        with self._lock:
            metadata = type(job.metadata)()
            metadata.CopyFrom(job.metadata)
        _set_time(metadata, "end_time")
        if status is None:
            _set_field(metadata, "progress_percent", 100.0)
        final = dataclasses.replace(job, done=True, error=status, response=packed, metadata=metadata)
        try:
            recorded = self.store.finish(job.tenant, job.op_id, final.to_operation().SerializeToString(),
                                         owner=owner)  # fmt: skip
        except Exception:
            logger.exception("could not record the outcome of operation %s; its lease will expire", job.name)
            recorded = False
        if not recorded:
            logger.warning(
                "operation %s was finished elsewhere (lease lost): this result is dropped", job.name
            )
        try:
            if job.on_done is not None:
                job.on_done()
        except Exception:
            logger.exception("on_done of operation %s failed", job.name)
        with self._lock:
            if recorded:
                job.metadata, job.error, job.response, job.done = metadata, status, packed, True
            job.phase = "done"
            self._local.pop((job.tenant, job.op_id), None)
            self._fns.pop((job.tenant, job.op_id), None)
            waiters, job.waiters = job.waiters, []
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(event.set)

    def _progress(self, job: _Job, stage: str | None, percent: float | None) -> None:
        with self._lock:
            if stage is not None:
                _set_field(job.metadata, "stage", stage)
            if percent is not None:
                _set_field(job.metadata, "progress_percent", max(0.0, min(100.0, float(percent))))
            job.dirty = True

    # --- leases -------------------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Extend our leases, publish progress, pick up cancellations, expire dead owners' jobs."""
        while not self._stopped.wait(self.heartbeat_seconds):
            try:
                self.heartbeat()
            except Exception as error:
                logger.warning("operation lease heartbeat failed: %s", error)

    def heartbeat(self) -> None:
        with self._lock:
            records = {}
            for key, job in self._local.items():
                if job.phase == "running" and job.dirty:
                    records[key] = job.to_operation().SerializeToString()
                    job.dirty = False
        cancelled = self.store.heartbeat(self.replica_id, time.time() + self.lease_seconds, records)
        with self._lock:
            for key in cancelled:
                running = self._local.get(key)
                if running is not None:
                    running.cancel.set()
        self.recover()

    def recover(self) -> int:
        """Take over what owners that stopped heartbeating left: portable jobs are queued again (and
        re-run), jobs only their dead process could run are finished UNAVAILABLE "server restarted;
        retry". Never touches a live owner's jobs. Returns how many were finished."""
        finished = 0
        for stored in self.store.expire(time.time()):
            if stored.owner == self.replica_id:
                continue  # our own (a slow heartbeat): keep it
            job = _job_of(stored)
            job.error = _restart_status(RESTARTED_MESSAGE)
            job.done = True
            _set_time(job.metadata, "end_time")
            if self.store.finish(
                stored.tenant, stored.op_id, job.to_operation().SerializeToString(), owner=None
            ):
                finished += 1
                logger.warning("operation %s belonged to a process that stopped: marked failed", job.name)
        return finished

    # --- reading ----------------------------------------------------------------------------------

    def _current(self, stored: StoredOperation) -> operations_pb2.Operation:
        """The freshest view: this process's live job if it has one, else the stored record."""
        with self._lock:
            job = self._local.get((stored.tenant, stored.op_id))
            if job is not None and not job.done:
                return job.to_operation()
        op = _parse_record(stored.record)
        op.name = operation_name(stored.tenant, stored.op_id)
        return op

    def _require(self, tenant: str, op_id: str) -> StoredOperation:
        stored = self.store.get(tenant, op_id)
        if stored is None:
            raise NotFound(OPERATION_TYPE, operation_name(tenant, op_id))
        return stored

    def get(self, tenant: str, op_id: str) -> operations_pb2.Operation:
        """Blocking (reads the control database): call from a worker thread in async code."""
        return self._current(self._require(tenant, op_id))

    async def wait(self, tenant: str, op_id: str, timeout: float) -> operations_pb2.Operation:
        """The operation once done, or as it is after ``timeout`` seconds (wherever it runs)."""
        deadline = time.monotonic() + max(0.0, timeout)
        current = await asyncio.to_thread(self.get, tenant, op_id)
        while not current.done:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = asyncio.Event()
            with self._lock:
                job = self._local.get((tenant, op_id))
                if job is not None:
                    job.waiters.append((asyncio.get_running_loop(), event))
            with contextlib.suppress(TimeoutError):  # ours: woken at once; elsewhere: polled
                await asyncio.wait_for(event.wait(), timeout=min(left, self.poll_seconds))
            try:
                current = await asyncio.to_thread(self.get, tenant, op_id)
            except NotFound:
                break
        return current

    def list(
        self, tenant: str, *, page_size: int, page_token: str = "", done: bool | None = None
    ) -> tuple[list[operations_pb2.Operation], str]:
        """Newest first; ``page_token`` is the last id of the previous page. Blocking."""
        if page_token and not (len(page_token) == 24 and set(page_token) <= _OP_ID_CHARS):
            raise InvalidArgument("page_token", "not a token from a previous ListOperations response")
        rows = self.store.page(tenant, before=page_token, limit=page_size + 1, done=done)
        page = [self._current(row) for row in rows[:page_size]]
        token = rows[page_size - 1].op_id if len(rows) > page_size else ""
        return page, token

    def cancel(self, tenant: str, op_id: str) -> None:
        """Best effort: a queued job never runs; a running one stops at its next progress report
        (on whichever replica runs it, within a heartbeat)."""
        stored = self.store.request_cancel(tenant, op_id)
        if stored is None:
            raise NotFound(OPERATION_TYPE, operation_name(tenant, op_id))
        with self._lock:
            job = self._local.get((tenant, op_id))
            if job is not None:
                job.cancel.set()
        if stored.state == QUEUED:
            queued = job if job is not None else _job_of(stored)
            self._finish(
                queued, None, OperationCancelled("operation cancelled before it started"), owner=None
            )

    def delete(self, tenant: str, op_id: str) -> None:
        stored = self._require(tenant, op_id)
        if stored.state != DONE or not self.store.delete(tenant, op_id):
            name = operation_name(tenant, op_id)
            raise FailedPrecondition(
                "OPERATION_RUNNING",
                f"operation {name} is still running; cancel it or wait for it first",
                [("OPERATION_RUNNING", name, "not done")],
            )

    # --- reservations -------------------------------------------------------------------------------

    def reserve(self, tenant: str, resource: str, *, lease_seconds: float = 300.0) -> str:
        """Hold ``resource`` (a pack id) for a call of this process; return the holder to release
        it with (or to pass to ``start``). ``ReservationConflict`` names a live holder."""
        holder = f"call:{self.replica_id}:{secrets.token_hex(4)}"
        self.store.reserve(tenant, resource, holder, lease_seconds)
        return holder

    def release(self, tenant: str, resource: str, holder: str) -> None:
        self.store.release(tenant, resource, holder)

    def holder(self, tenant: str, resource: str) -> str | None:
        """Who holds ``resource``: an operation name, a call, or None."""
        return self.store.holder(tenant, resource)

    # --- shutdown -----------------------------------------------------------------------------------

    def running(self) -> int:
        """Jobs running in this process."""
        with self._lock:
            return self._running

    def begin_close(self, grace_seconds: float) -> None:
        """At SIGTERM: stop claiming and cancel running jobs now (portable ones go back to the
        queue for another replica); ``close`` then waits only for what is left of the grace."""
        if self._close_deadline is None:
            self._close_deadline = time.monotonic() + grace_seconds
        self._cancel_all()

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Stop claiming, cancel running jobs, finish the pinned jobs still queued here (they could
        only run in this process), wait up to ``grace_seconds`` (or the ``begin_close`` deadline)."""
        deadline = time.monotonic() + grace_seconds
        if self._close_deadline is not None:
            deadline = min(deadline, self._close_deadline)
        self._cancel_all()
        while self.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._lock:
            pinned = [job for key, job in self._local.items() if key in self._fns and job.phase == "queued"]
        for job in pinned:
            await asyncio.to_thread(self._finish, job, None, OperationCancelled(SHUTDOWN_MESSAGE), owner=None)
        self._stopped.set()

    def _cancel_all(self) -> None:
        with self._lock:
            self._closing = True
            running = [job for job in self._local.values() if job.phase == "running"]
            self._wakeup.notify_all()  # idle workers see _closing and exit
        for job in running:
            job.cancel_message = SHUTDOWN_MESSAGE
            job.cancel.set()


async def _await(awaitable: Any) -> Any:
    return await awaitable


# --- the google.longrunning.Operations service ------------------------------------------------------


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    """``google.longrunning.Operations`` over an ``OperationManager``, tenant-scoped."""

    def __init__(
        self,
        manager: OperationManager,
        tenancy: Tenancy,
        discloser: Discloser | None = None,
        *,
        max_wait_seconds: float = 60.0,
    ) -> None:
        self.manager = manager
        self.tenancy = tenancy
        self.discloser = discloser
        self.max_wait_seconds = max_wait_seconds

    def _shown(
        self, operation: operations_pb2.Operation, context: grpc.aio.ServicerContext
    ) -> operations_pb2.Operation:
        """A finished build's Pack as the caller may see it (tenants: disclosed sizes only)."""
        if self.discloser is None or not operation.HasField("response"):
            return operation
        caller = self.tenancy.caller(context)
        shown = operations_pb2.Operation()
        if operation.response.Is(pack_pb2.Pack.DESCRIPTOR):
            pack = pack_pb2.Pack()
            operation.response.Unpack(pack)
            shown.CopyFrom(operation)
            shown.response.Pack(self.discloser.pack(pack, caller))
            return shown
        if operation.response.Is(lookalike_pb2.ExpandLookalikeResponse.DESCRIPTOR):
            expansion = lookalike_pb2.ExpandLookalikeResponse()
            operation.response.Unpack(expansion)
            exact_pack = pack_pb2.Pack()
            exact_pack.CopyFrom(expansion.pack)
            expansion.pack.CopyFrom(self.discloser.pack(expansion.pack, caller))
            if not is_exact_for(caller) and caller is not None and caller.tenant is not None:
                # The seed's matched members are a count about people too: disclosed like a size.
                expansion.seed_matched, _ = self.discloser.size(
                    caller.tenant, f"seed-of:{fingerprint_of_pack(exact_pack)}", expansion.seed_matched
                )
                if expansion.negative_matched:  # the negative seed's members: the same kind of count
                    expansion.negative_matched, _ = self.discloser.size(
                        caller.tenant,
                        f"negative-of:{fingerprint_of_pack(exact_pack)}",
                        expansion.negative_matched,
                    )
            shown.CopyFrom(operation)
            shown.response.Pack(expansion)
            return shown
        return operation

    def _operation(self, name: str, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        tenant, op_id = parse_operation_name(name)
        self.tenancy.authorize(context, tenant, resource_type=OPERATION_TYPE, name=name)
        return tenant, op_id

    async def GetOperation(self, request, context):
        tenant, op_id = self._operation(request.name, context)
        operation = await asyncio.to_thread(self.manager.get, tenant, op_id)
        return await asyncio.to_thread(self._shown, operation, context)

    async def ListOperations(self, request, context):
        tenant = parse_operations_parent(request.name)
        self.tenancy.authorize(context, tenant)
        if request.page_size < 0 or request.page_size > 1000:
            raise InvalidArgument("page_size", "must be between 0 and 1000 (0 = default 50)")
        done = _parse_done_filter(request.filter)
        operations, token = await asyncio.to_thread(
            self.manager.list,
            tenant,
            page_size=request.page_size or 50,
            page_token=request.page_token,
            done=done,
        )
        shown = await asyncio.to_thread(lambda: [self._shown(op, context) for op in operations])
        return operations_pb2.ListOperationsResponse(operations=shown, next_page_token=token)

    async def WaitOperation(self, request, context):
        tenant, op_id = self._operation(request.name, context)
        timeout = self.max_wait_seconds
        if request.HasField("timeout"):
            requested = request.timeout.ToTimedelta().total_seconds()
            if requested < 0:
                raise InvalidArgument("timeout", "must not be negative")
            timeout = min(timeout, requested)
        remaining = context.time_remaining()
        if remaining is not None:  # answer (not done) just before the caller's deadline
            timeout = min(timeout, max(0.0, remaining - 0.05))
        operation = await self.manager.wait(tenant, op_id, timeout)
        return await asyncio.to_thread(self._shown, operation, context)

    async def CancelOperation(self, request, context):
        tenant, op_id = self._operation(request.name, context)
        await asyncio.to_thread(self.manager.cancel, tenant, op_id)
        return empty_pb2.Empty()

    async def DeleteOperation(self, request, context):
        tenant, op_id = self._operation(request.name, context)
        await asyncio.to_thread(self.manager.delete, tenant, op_id)
        return empty_pb2.Empty()


def _parse_done_filter(text: str) -> bool | None:
    terms = [t.strip() for t in text.split(" AND ")] if text.strip() else []
    done: bool | None = None
    for term in terms:
        key, sep, value = term.partition("=")
        if not sep or key.strip() != "done" or value.strip().lower() not in ("true", "false"):
            raise InvalidArgument(
                "filter", f"unsupported term {term[:80]!r}; supported: done=true, done=false"
            )
        done = value.strip().lower() == "true"
    return done


def operation_error(op: operations_pb2.Operation) -> status_pb2.Status | None:
    """The error status of a finished operation, if it failed."""
    return op.error if op.HasField("error") else None


def unpack_response(op: operations_pb2.Operation, message_type: type[Message]) -> Message:
    message = message_type()
    if not op.response.Unpack(message):
        raise ValueError(f"operation {op.name} response is {op.response.type_url}, not {message_type}")
    return message


def unpack_metadata(op: operations_pb2.Operation, message_type: type[Message]) -> Message:
    message = message_type()
    if not op.metadata.Unpack(message):
        raise ValueError(f"operation {op.name} metadata is {op.metadata.type_url}, not {message_type}")
    return message


class PackClaims(Protocol):
    """Pack-id claims shared with CreatePack (``AudienceServicer.reserve_pack``/``release_pack``:
    the reservations above, answered ALREADY_EXISTS while another holds the id)."""

    def reserve_pack(self, tenant: str, pack_id: str, purpose: str = "") -> str: ...

    def release_pack(self, tenant: str, pack_id: str, holder: str) -> None: ...


__all__ = [
    "RESTARTED_MESSAGE",
    "SHUTDOWN_MESSAGE",
    "JobContext",
    "JobFn",
    "OperationCancelled",
    "OperationManager",
    "OperationsServicer",
    "PackClaims",
    "PortableRunner",
    "ReservationConflict",
    "new_replica_id",
    "operation_error",
    "request_fingerprint",
    "status_of",
    "unpack_metadata",
    "unpack_response",
]
