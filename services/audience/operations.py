"""Long-running operations for pack builds (and any other slow job of this process).

``OperationManager`` runs jobs in a bounded thread pool (polars releases the GIL for most of a
build), keeps each job's ``google.longrunning.Operation`` with live metadata (stage, percent), and
records every operation in the object store as ``{prefix}{tenant}/{id}.json``: once when it is
accepted and again when it finishes, so that GetOperation/ListOperations keep working after a
restart. An operation still marked running when a process starts belonged to a process that died:
``recover()`` marks it failed (UNAVAILABLE, "server restarted; retry").

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
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from flashcrowd.audience.v1 import pack_pb2
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.audience.privacy import Discloser
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
    future: concurrent.futures.Future[None] | None = None
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


class OperationManager:
    """Runs jobs in a bounded pool and serves their operations; see the module doc."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str = "operations/",
        *,
        max_workers: int = 2,
        max_queued: int = 16,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        retry_after_seconds: float = 5.0,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.max_workers = max_workers
        self.max_queued = max_queued
        self.memory_limit = memory_limit
        self.retry_after_seconds = retry_after_seconds
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="audience-build"
        )
        self._lock = threading.Lock()
        self._jobs: OrderedDict[tuple[str, str], _Job] = OrderedDict()
        self._active = 0  # queued + running
        self._requests: dict[tuple[str, str], str] = {}  # (tenant, request_key) -> op id
        self._closing = False

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

    def _admit(self) -> None:
        limit = self.max_workers + self.max_queued
        with self._lock:
            if self._closing:
                raise ResourceExhausted(
                    SHUTDOWN_MESSAGE, retry_after_seconds=self.retry_after_seconds, reason="SHUTTING_DOWN"
                )
            if self._active >= limit:
                raise ResourceExhausted(
                    f"{self._active} builds running or queued (limit {limit}); retry later",
                    retry_after_seconds=self.retry_after_seconds,
                    violations=[("builds", f"at most {limit} builds running or queued per server")],
                    reason="TOO_MANY_BUILDS",
                )
            self._active += 1

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

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
    ) -> operations_pb2.Operation:
        """Accept a job: record it, queue it, return its (not yet done) operation.

        RESOURCE_EXHAUSTED (with RetryInfo) when ``max_workers + max_queued`` jobs are already
        running or queued. ``on_done`` runs in the worker thread after the outcome is recorded,
        whatever it is (release reservations there).
        """
        self._admit()
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
            job.future = self._pool.submit(self._run, job, fn)
        except BaseException:
            self._release()
            raise
        return snapshot

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
                self._active -= 1
                released = True
        except Exception:
            logger.exception("finishing operation %s failed", job.name)
        finally:
            if not released:
                with self._lock:
                    job.done = True
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
            future = job.future
        if future is not None and future.cancel():  # still queued: it will never run
            self._finish(job, None, OperationCancelled("operation cancelled before it started"))

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

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Refuse new jobs, cancel queued and running ones, wait up to ``grace_seconds`` for them."""
        with self._lock:
            self._closing = True
            jobs = [job for job in self._jobs.values() if not job.done]
        for job in jobs:
            job.cancel_message = SHUTDOWN_MESSAGE
            job.cancel.set()
            if job.future is not None and job.future.cancel():
                self._finish(job, None, OperationCancelled(SHUTDOWN_MESSAGE))
        deadline = time.monotonic() + grace_seconds
        while self.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._pool.shutdown(wait=False, cancel_futures=True)


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
        if not operation.response.Is(pack_pb2.Pack.DESCRIPTOR):
            return operation
        pack = pack_pb2.Pack()
        operation.response.Unpack(pack)
        shown = operations_pb2.Operation()
        shown.CopyFrom(operation)
        shown.response.Pack(self.discloser.pack(pack, self.tenancy.caller(context)))
        return shown

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
