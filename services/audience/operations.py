"""Long-running operations for pack builds (and any other slow job of this process).

``OperationManager`` runs jobs on ``max_workers`` worker threads (polars releases the GIL for most
of a build), keeps each job's ``google.longrunning.Operation`` with live metadata (stage, percent), and
records every operation in the object store as ``{prefix}{tenant}/{id}.json``: once when it is
accepted and again when it finishes, so that GetOperation/ListOperations keep working after a
restart. An operation still marked running when a process starts belonged to a process that died:
``recover()`` marks it failed (UNAVAILABLE, "server restarted; retry").

Jobs wait in a **fair queue** (``FairQueue``): one FIFO lane per tenant, and a free worker takes the
head of the lane of the tenant with the fewest running jobs, ties going to the tenant served least
recently; a tenant already running ``tenant_max_running`` jobs is skipped while it is at that cap.
So a tenant that queued 20 builds delays another tenant's one build by at most the builds already
running, never by its 20. Admission refuses (RESOURCE_EXHAUSTED, nothing recorded):

* a tenant with ``queued_limit`` jobs already waiting (reason ``TENANT_QUOTA``, QuotaFailure naming
  ``FLASHCROWD_TENANT_MAX_QUEUED_BUILDS``), unless the caller is exempt (platform principals);
* anyone once ``max_workers + max_queued`` jobs of all tenants are queued or running (the global
  safety cap, reason ``TOO_MANY_BUILDS``), and everyone while the manager shuts down.

A job is a function ``fn(ctx: JobContext) -> Message`` run in a worker thread (a coroutine function
is run to completion in the worker thread). ``ctx.progress(stage, percent)`` updates the metadata
and raises ``OperationCancelled`` once the operation was cancelled. Its result is packed into
``Operation.response``; a ``ServiceError`` becomes ``Operation.error`` with the same
``google.rpc.Status`` (ErrorInfo, BadRequest...) the error interceptor would send for a unary call.

``OperationsServicer`` is the standard ``google.longrunning.Operations`` service over a manager:
names are ``tenants/{tenant}/operations/{id}``, and another tenant's operations are NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from flashcrowd.audience.v1 import lookalike_pb2, pack_pb2
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

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
)
from services.storage import ObjectNotFound, ObjectStore

logger = logging.getLogger(__name__)

#: Finished operations kept in memory (older ones are read back from the store on demand).
DEFAULT_MEMORY_LIMIT = 2000
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


def _set_time(metadata: Message, field_name: str, *, only_if_unset: bool = False) -> None:
    if field_name not in metadata.DESCRIPTOR.fields_by_name:
        return
    if only_if_unset and metadata.HasField(field_name):
        return
    getattr(metadata, field_name).CopyFrom(_now_ts())


@dataclass
class JobContext:
    """Handed to a running job: progress reporting and cancellation."""

    operation: str
    _job: _Job
    _manager: OperationManager

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
    tenant: str
    op_id: str
    kind: str
    metadata: Message
    request_key: str = ""
    fingerprint: str = ""
    create_time: str = ""
    done: bool = False
    response: Any = None  # any_pb2.Any
    error: status_pb2.Status | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_message: str = "operation cancelled"
    #: "queued" (in the fair queue, not yet taken by a worker), "running" or "done".
    phase: str = "queued"
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


def _record(job: _Job) -> bytes:
    op = job.to_operation()
    document = {
        "tenant": job.tenant,
        "id": job.op_id,
        "kind": job.kind,
        "request_key": job.request_key,
        "fingerprint": job.fingerprint,
        "create_time": job.create_time,
        "done": job.done,
        # Readable summary; the operation itself is stored as bytes so that it always parses back.
        "error": {"code": job.error.code, "message": job.error.message} if job.error is not None else None,
        "operation": base64.b64encode(op.SerializeToString()).decode("ascii"),
    }
    return json.dumps(document, sort_keys=True, indent=1).encode("utf-8")


def _job_from_record(raw: bytes) -> _Job:
    document = json.loads(raw.decode("utf-8"))
    op = operations_pb2.Operation.FromString(base64.b64decode(document["operation"]))
    job = _Job(
        tenant=document["tenant"],
        op_id=document["id"],
        kind=document.get("kind", ""),
        metadata=_unpack_any(op.metadata),
        request_key=document.get("request_key", ""),
        fingerprint=document.get("fingerprint", ""),
        create_time=document.get("create_time", ""),
        done=op.done,
    )
    if op.HasField("error"):
        job.error = op.error
    elif op.HasField("response"):
        job.response = op.response
    return job


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


@dataclass
class _Queued:
    job: _Job
    fn: Callable[[JobContext], Any]
    seq: int


class FairQueue:
    """Jobs waiting for a worker: one FIFO lane per tenant, served fairly (see ``pop``).

    Not thread-safe by itself: ``OperationManager`` calls it with its lock held.
    """

    #: Tenants whose last-served tick is remembered (the oldest are forgotten past this).
    MAX_REMEMBERED = 10_000

    def __init__(self, max_running_per_tenant: int | None = None) -> None:
        self.max_running = max_running_per_tenant
        self._lanes: dict[str, deque[_Queued]] = {}
        self._running: dict[str, int] = {}
        self._served: OrderedDict[str, int] = OrderedDict()  # tenant -> tick of its last dispatch
        self._tick = 0
        self._seq = 0

    def push(self, job: _Job, fn: Callable[[JobContext], Any]) -> None:
        self._seq += 1
        self._lanes.setdefault(job.tenant, deque()).append(_Queued(job, fn, self._seq))

    def pop(self) -> _Queued | None:
        """The next job to run, or None when every waiting tenant is at its running cap (or none waits).

        Among tenants with a waiting job and fewer than ``max_running`` running: the fewest running
        first, then the one whose last job started longest ago (never: first), then the oldest head.
        """
        best: str | None = None
        best_key: tuple[int, int, int] | None = None
        for tenant, lane in self._lanes.items():
            running = self._running.get(tenant, 0)
            if self.max_running is not None and running >= self.max_running:
                continue
            key = (running, self._served.get(tenant, -1), lane[0].seq)
            if best_key is None or key < best_key:
                best, best_key = tenant, key
        if best is None:
            return None
        lane = self._lanes[best]
        item = lane.popleft()
        if not lane:
            del self._lanes[best]
        self._running[best] = self._running.get(best, 0) + 1
        self._tick += 1
        self._served.pop(best, None)
        self._served[best] = self._tick
        if len(self._served) > self.MAX_REMEMBERED:
            self._served.popitem(last=False)
        return item

    def finished(self, tenant: str) -> None:
        """A job ``pop`` returned has finished (its tenant may run another)."""
        left = self._running.get(tenant, 0) - 1
        if left > 0:
            self._running[tenant] = left
        else:
            self._running.pop(tenant, None)

    def remove(self, job: _Job) -> bool:
        """Take a still-waiting job out of its lane (cancelled); False if a worker already took it."""
        lane = self._lanes.get(job.tenant)
        if lane is None:
            return False
        for item in lane:
            if item.job is job:
                lane.remove(item)
                if not lane:
                    del self._lanes[job.tenant]
                return True
        return False

    def waiting(self, tenant: str | None = None) -> int:
        if tenant is not None:
            return len(self._lanes.get(tenant, ()))
        return sum(len(lane) for lane in self._lanes.values())

    def running(self, tenant: str) -> int:
        return self._running.get(tenant, 0)


class OperationManager:
    """Runs jobs on a bounded set of worker threads, fairly across tenants; see the module doc."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str = "operations/",
        *,
        max_workers: int = 2,
        max_queued: int = 16,
        queued_limit: Limit | None = None,
        tenant_max_running: int | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        retry_after_seconds: float = 5.0,
    ) -> None:
        """``max_queued`` is the global cap of waiting jobs; ``queued_limit`` the per-tenant one (none:
        only the global cap); ``tenant_max_running`` caps one tenant's running jobs (none: the pool)."""
        self.store = store
        self.prefix = prefix
        self.max_workers = max_workers
        self.max_queued = max_queued
        self.queued_limit = queued_limit
        self.memory_limit = memory_limit
        self.retry_after_seconds = retry_after_seconds
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue = FairQueue(tenant_max_running)
        self._workers: list[threading.Thread] = []
        self._jobs: OrderedDict[tuple[str, str], _Job] = OrderedDict()
        self._active = 0  # queued + running
        self._admitted: dict[str, int] = {}  # tenant -> jobs admitted and not yet taken by a worker
        self._requests: dict[tuple[str, str], str] = {}  # (tenant, request_key) -> op id
        self._closing = False
        #: Set by ``begin_close`` (SIGTERM): ``close`` waits no longer than this monotonic time.
        self._close_deadline: float | None = None

    # --- keys and persistence ---------------------------------------------------------------------

    def _key(self, tenant: str, op_id: str) -> str:
        return f"{self.prefix}{tenant}/{op_id}.json"

    def _persist(self, job: _Job) -> None:
        with self._lock:
            payload = _record(job)
        self.store.put_bytes(self._key(job.tenant, job.op_id), payload, "application/json")

    def _load(self, tenant: str, op_id: str) -> _Job | None:
        with self._lock:
            job = self._jobs.get((tenant, op_id))
        if job is not None:
            return job
        try:
            raw = self.store.get_bytes(self._key(tenant, op_id))
        except ObjectNotFound:
            return None
        try:
            return _job_from_record(raw)
        except (ValueError, KeyError, TypeError, binascii.Error):
            logger.warning("corrupt operation record %s", self._key(tenant, op_id), exc_info=True)
            return None

    def recover(self) -> int:
        """Mark operations left running by a previous process failed; index request ids.

        Call once at start-up, before serving. Returns how many operations were marked failed.
        """
        failed = 0
        for info in self.store.list(self.prefix):
            if not info.key.endswith(".json"):
                continue
            try:
                job = _job_from_record(self.store.get_bytes(info.key))
            except ObjectNotFound:
                continue
            except (ValueError, KeyError, TypeError, binascii.Error):
                logger.warning("corrupt operation record %s: skipped", info.key, exc_info=True)
                continue
            if job.request_key:
                self._requests[(job.tenant, job.request_key)] = job.op_id
            with self._lock:
                if (job.tenant, job.op_id) in self._jobs:
                    continue  # ours
            if not job.done:
                job.done = True
                job.error = _restart_status(RESTARTED_MESSAGE)
                _set_time(job.metadata, "end_time")
                self.store.put_bytes(info.key, _record(job), "application/json")
                failed += 1
                logger.warning("operation %s was running when its server stopped: marked failed", job.name)
        return failed

    # --- starting jobs ----------------------------------------------------------------------------

    def find_request(
        self, tenant: str, request_key: str, fingerprint: str
    ) -> operations_pb2.Operation | None:
        """The operation an earlier call with the same ``request_key`` started, if any.

        Raise INVALID_ARGUMENT (field ``request_id``) when the key was used for a different request.
        """
        if not request_key:
            return None
        with self._lock:
            op_id = self._requests.get((tenant, request_key))
        if op_id is None:
            return None
        job = self._load(tenant, op_id)
        if job is None:
            return None
        if job.fingerprint and fingerprint and job.fingerprint != fingerprint:
            raise InvalidArgument("request_id", "already used for a different request")
        return self._snapshot(job)

    def _admit(self, tenant: str, exempt: bool) -> None:
        limit = self.max_workers + self.max_queued
        with self._lock:
            if self._closing:
                raise ResourceExhausted(
                    SHUTDOWN_MESSAGE, retry_after_seconds=self.retry_after_seconds, reason="SHUTTING_DOWN"
                )
            waiting = self._admitted.get(tenant, 0)
            if not exempt and self.queued_limit is not None and waiting >= self.queued_limit.value:
                raise quota_refusal(
                    tenant, self.queued_limit, used=waiting, retry_after_seconds=self.retry_after_seconds
                )
            if self._active >= limit:
                raise ResourceExhausted(
                    f"{self._active} builds running or queued (limit {limit}); retry later",
                    retry_after_seconds=self.retry_after_seconds,
                    violations=[("builds", f"at most {limit} builds running or queued per server")],
                    reason="TOO_MANY_BUILDS",
                )
            self._active += 1
            self._admitted[tenant] = waiting + 1

    def _unadmit(self, tenant: str) -> None:
        """With the lock held: a job admitted for ``tenant`` left the queue (taken, cancelled, failed)."""
        left = self._admitted.get(tenant, 0) - 1
        if left > 0:
            self._admitted[tenant] = left
        else:
            self._admitted.pop(tenant, None)

    def _release(self, tenant: str) -> None:
        with self._lock:
            self._active -= 1
            self._unadmit(tenant)

    def queued(self, tenant: str) -> int:
        """Jobs of ``tenant`` accepted and not yet running."""
        with self._lock:
            return self._admitted.get(tenant, 0)

    async def start(
        self,
        tenant: str,
        kind: str,
        fn: Callable[[JobContext], Any],
        metadata: Message,
        *,
        request_key: str = "",
        fingerprint: str = "",
        on_done: Callable[[], None] | None = None,
        exempt: bool = False,
    ) -> operations_pb2.Operation:
        """Accept a job: record it, queue it in its tenant's lane, return its (not yet done) operation.

        RESOURCE_EXHAUSTED (with RetryInfo) when the tenant already has ``queued_limit`` jobs waiting
        (``exempt``: platform principals are not held to it) or ``max_workers + max_queued`` jobs are
        running or queued. ``on_done`` runs in the worker thread after the outcome is recorded,
        whatever it is (release reservations there).
        """
        self._admit(tenant, exempt)
        try:
            job = _Job(
                tenant=tenant,
                op_id=_new_id(),
                kind=kind,
                metadata=metadata,
                request_key=request_key,
                fingerprint=fingerprint,
                create_time=datetime.now(UTC).isoformat(),
                on_done=on_done,
            )
            _set_time(job.metadata, "start_time", only_if_unset=True)
            await asyncio.to_thread(self._persist, job)
            with self._lock:
                self._jobs[(tenant, job.op_id)] = job
                if request_key:
                    self._requests[(tenant, request_key)] = job.op_id
                snapshot = job.to_operation()
                self._queue.push(job, fn)
                self._ensure_workers()
                self._wakeup.notify()
        except BaseException:
            self._release(tenant)
            raise
        return snapshot

    def _ensure_workers(self) -> None:
        """With the lock held: start the worker threads on first use."""
        while len(self._workers) < self.max_workers:
            worker = threading.Thread(
                target=self._work, name=f"audience-build-{len(self._workers)}", daemon=True
            )
            self._workers.append(worker)
            worker.start()

    def _work(self) -> None:
        """A worker thread: take the fair queue's next job, run it, repeat until closed."""
        while True:
            with self._lock:
                item = self._queue.pop()
                while item is None:
                    if self._closing:
                        return
                    self._wakeup.wait()
                    item = self._queue.pop()
                item.job.phase = "running"
                self._unadmit(item.job.tenant)
            try:
                self._run(item.job, item.fn)
            finally:
                with self._lock:
                    self._queue.finished(item.job.tenant)
                    self._wakeup.notify_all()  # this tenant's next job may run now

    def _run(self, job: _Job, fn: Callable[[JobContext], Any]) -> None:
        ctx = JobContext(operation=job.name, _job=job, _manager=self)
        response: Message | None = None
        error: BaseException | None = None
        try:
            ctx.check_cancelled()
            result = fn(ctx)
            if inspect.isawaitable(result):
                result = asyncio.run(_await(result))
            response = result
        except BaseException as exc:  # recorded in the operation, never lost
            error = exc
            if not isinstance(exc, ServiceError | OperationCancelled):
                logger.error("operation %s (%s) failed", job.name, job.kind, exc_info=exc)
        self._finish(job, response, error)

    def _finish(self, job: _Job, response: Message | None, error: BaseException | None) -> None:
        """Record the outcome, run ``on_done``, then make it visible, free the slot and wake waiters.

        In that order: once a caller sees the operation done, its outcome is in the store, the
        job's reservations are released and its worker slot is free.
        """
        released = False
        try:
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
            if status is None and "progress_percent" in metadata.DESCRIPTOR.fields_by_name:
                metadata.progress_percent = 100.0
            final = dataclasses.replace(job, done=True, error=status, response=packed, metadata=metadata)
            try:
                self.store.put_bytes(self._key(job.tenant, job.op_id), _record(final), "application/json")
            except Exception:
                logger.exception("could not record the outcome of operation %s", job.name)
            try:
                if job.on_done is not None:
                    job.on_done()
            except Exception:
                logger.exception("on_done of operation %s failed", job.name)
            with self._lock:
                job.metadata, job.error, job.response, job.done = metadata, status, packed, True
                job.phase = "done"
                self._active -= 1
                released = True
        except Exception:
            logger.exception("finishing operation %s failed", job.name)
        finally:
            if not released:
                with self._lock:
                    job.done = True
                    job.phase = "done"
                    self._active -= 1
            self._wake(job)
            self._trim()

    def _wake(self, job: _Job) -> None:
        with self._lock:
            waiters, job.waiters = job.waiters, []
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(event.set)

    def _trim(self) -> None:
        with self._lock:
            excess = len(self._jobs) - self.memory_limit
            if excess <= 0:
                return
            for key in [k for k, j in self._jobs.items() if j.done][:excess]:
                del self._jobs[key]

    def _progress(self, job: _Job, stage: str | None, percent: float | None) -> None:
        fields = job.metadata.DESCRIPTOR.fields_by_name
        with self._lock:
            if stage is not None and "stage" in fields:
                job.metadata.stage = stage
            if percent is not None and "progress_percent" in fields:
                job.metadata.progress_percent = max(0.0, min(100.0, float(percent)))

    # --- reading ----------------------------------------------------------------------------------

    def _snapshot(self, job: _Job) -> operations_pb2.Operation:
        with self._lock:
            return job.to_operation()

    def _require(self, tenant: str, op_id: str) -> _Job:
        job = self._load(tenant, op_id)
        if job is None:
            raise NotFound(OPERATION_TYPE, operation_name(tenant, op_id))
        return job

    def get(self, tenant: str, op_id: str) -> operations_pb2.Operation:
        """Blocking (may read the store): call from a worker thread in async code."""
        return self._snapshot(self._require(tenant, op_id))

    async def wait(self, tenant: str, op_id: str, timeout: float) -> operations_pb2.Operation:
        """The operation once done, or as it is after ``timeout`` seconds."""
        job = await asyncio.to_thread(self._require, tenant, op_id)
        event = asyncio.Event()
        with self._lock:
            if not job.done:
                job.waiters.append((asyncio.get_running_loop(), event))
            else:
                event.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))
        return self._snapshot(job)

    def list(
        self, tenant: str, *, page_size: int, page_token: str = "", done: bool | None = None
    ) -> tuple[list[operations_pb2.Operation], str]:
        """Newest first; ``page_token`` is the last id of the previous page. Blocking."""
        if page_token and not (len(page_token) == 24 and set(page_token) <= _OP_ID_CHARS):
            raise InvalidArgument("page_token", "not a token from a previous ListOperations response")
        prefix = f"{self.prefix}{tenant}/"
        ids = [
            info.key[len(prefix) : -len(".json")]
            for info in self.store.list(prefix)
            if info.key.endswith(".json") and "/" not in info.key[len(prefix) :]
        ]
        with self._lock:  # accepted but maybe not yet visible in a slow store listing
            ids.extend(op_id for (t, op_id) in self._jobs if t == tenant)
        ordered = sorted(set(ids), reverse=True)
        if page_token:
            ordered = [op_id for op_id in ordered if op_id < page_token]
        page: list[operations_pb2.Operation] = []
        last = ""
        for op_id in ordered:
            if len(page) == page_size:
                return page, last
            job = self._load(tenant, op_id)
            last = op_id
            if job is None or (done is not None and job.done != done):
                continue
            page.append(self._snapshot(job))
        return page, ""

    def cancel(self, tenant: str, op_id: str) -> None:
        """Best effort: a queued job never runs; a running one stops at its next progress report."""
        job = self._require(tenant, op_id)
        with self._lock:
            if job.done:
                return
            job.cancel.set()
            dequeued = self._take_queued(job)
        if dequeued:  # still queued: it will never run
            self._finish(job, None, OperationCancelled("operation cancelled before it started"))

    def _take_queued(self, job: _Job) -> bool:
        """With the lock held: remove a job no worker has taken yet from the queue."""
        if job.phase != "queued" or not self._queue.remove(job):
            return False
        self._unadmit(job.tenant)
        return True

    def delete(self, tenant: str, op_id: str) -> None:
        job = self._require(tenant, op_id)
        if not job.done:
            raise FailedPrecondition(
                "OPERATION_RUNNING",
                f"operation {job.name} is still running; cancel it or wait for it first",
                [("OPERATION_RUNNING", job.name, "not done")],
            )
        with self._lock:
            self._jobs.pop((tenant, op_id), None)
            if job.request_key:
                self._requests.pop((tenant, job.request_key), None)
        self.store.delete(self._key(tenant, op_id))

    # --- shutdown -----------------------------------------------------------------------------------

    def running(self) -> int:
        with self._lock:
            return self._active

    def begin_close(self, grace_seconds: float) -> None:
        """At SIGTERM: refuse new jobs and cancel the others now; ``close`` then waits only for
        what is left of ``grace_seconds`` (one grace for RPCs and jobs together)."""
        if self._close_deadline is None:
            self._close_deadline = time.monotonic() + grace_seconds
        self._cancel_all()

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Refuse new jobs, cancel queued and running ones, wait up to ``grace_seconds`` for them
        (or until the deadline ``begin_close`` set, whichever is first)."""
        deadline = time.monotonic() + grace_seconds
        if self._close_deadline is not None:
            deadline = min(deadline, self._close_deadline)
        self._cancel_all()
        while self.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _cancel_all(self) -> None:
        with self._lock:
            self._closing = True
            jobs = [job for job in self._jobs.values() if not job.done]
        for job in jobs:
            job.cancel_message = SHUTDOWN_MESSAGE
            job.cancel.set()
            with self._lock:
                dequeued = self._take_queued(job)
            if dequeued:
                self._finish(job, None, OperationCancelled(SHUTDOWN_MESSAGE))
        with self._lock:
            self._wakeup.notify_all()  # idle workers see _closing and exit


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


__all__ = [
    "RESTARTED_MESSAGE",
    "FairQueue",
    "JobContext",
    "OperationCancelled",
    "OperationManager",
    "OperationsServicer",
    "operation_error",
    "request_fingerprint",
    "status_of",
    "unpack_metadata",
    "unpack_response",
]
