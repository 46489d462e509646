"""The error interceptor, over real RPCs of every shape."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest

from services.runtime import DOMAIN, ErrorDetails, error_details, rich_status

from .conftest import ProbeServer
from .probe import SECRET, SERVICE

C = grpc.StatusCode

# kind -> (code, message, ErrorInfo reason)
EXPECTED: dict[str, tuple[grpc.StatusCode, str, str]] = {
    "invalid_argument": (
        C.INVALID_ARGUMENT,
        "invalid argument: spec.window: end before start; parent: required",
        "INVALID_ARGUMENT",
    ),
    "invalid_single": (
        C.INVALID_ARGUMENT,
        "invalid argument: page_size: must be between 1 and 1000",
        "INVALID_ARGUMENT",
    ),
    "not_found": (C.NOT_FOUND, "flashcrowd.dev/Pack not found: tenants/t1/packs/p9", "PACK_NOT_FOUND"),
    "already_exists": (
        C.ALREADY_EXISTS,
        "flashcrowd.dev/Pack already exists: tenants/t1/packs/p1",
        "PACK_ALREADY_EXISTS",
    ),
    "failed_precondition": (C.FAILED_PRECONDITION, "seed has 12 users, needs 100", "SEED_TOO_SMALL"),
    "permission_denied": (C.PERMISSION_DENIED, "tenant t2 does not own this pack", "PERMISSION_DENIED"),
    "unauthenticated": (C.UNAUTHENTICATED, "authentication required", "UNAUTHENTICATED"),
    "aborted": (C.ABORTED, "aborted by a concurrent change", "ABORTED"),
    "resource_exhausted": (C.RESOURCE_EXHAUSTED, "rate limit exceeded", "RESOURCE_EXHAUSTED"),
    "unavailable": (C.UNAVAILABLE, "service unavailable", "UNAVAILABLE"),
    "deadline_exceeded": (C.DEADLINE_EXCEEDED, "deadline exceeded", "DEADLINE_EXCEEDED"),
    "unexpected": (C.INTERNAL, "internal error", "INTERNAL"),
}

SHAPES = ["unary", "server_stream", "write_stream", "client_stream", "bidi_stream"]


async def call(
    channel: grpc.aio.Channel, shape: str, kind: str
) -> tuple[list[bytes], grpc.aio.AioRpcError | None]:
    """Run one RPC; return the responses received before the failure, and the failure."""
    payload = kind.encode()
    received: list[bytes] = []
    try:
        if shape == "unary":
            received.append(await channel.unary_unary(f"/{SERVICE}/Unary")(payload))
        elif shape in ("server_stream", "write_stream"):
            method = "ServerStream" if shape == "server_stream" else "WriteStream"
            async for response in channel.unary_stream(f"/{SERVICE}/{method}")(payload):
                received.append(response)
        elif shape == "client_stream":
            requests: Iterator[bytes] = iter([b"ok", payload])
            received.append(await channel.stream_unary(f"/{SERVICE}/ClientStream")(requests))
        else:
            async for response in channel.stream_stream(f"/{SERVICE}/BidiStream")(iter([b"ok", payload])):
                received.append(response)
    except grpc.aio.AioRpcError as error:
        return received, error
    return received, None


@pytest.mark.parametrize("shape", SHAPES)
async def test_success_passes_through(channel: grpc.aio.Channel, shape: str) -> None:
    received, error = await call(channel, shape, "ok")
    assert error is None
    expected = {
        "unary": [b"ok:ok"],
        "server_stream": [b"first", b"second"],
        "write_stream": [b"first", b"second"],
        "client_stream": [b"ok,ok"],
        "bidi_stream": [b"echo:ok", b"echo:ok"],
    }[shape]
    assert received == expected


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", sorted(EXPECTED))
async def test_domain_errors_map_to_rich_status(channel: grpc.aio.Channel, shape: str, kind: str) -> None:
    received, error = await call(channel, shape, kind)
    assert error is not None
    code, message, reason = EXPECTED[kind]
    assert error.code() is code
    assert error.details() == message
    details = error_details(error)
    assert details.status is not None and details.status.code == code.value[0]
    assert details.error_info is not None
    assert details.reason == reason
    assert details.error_info.domain == DOMAIN
    # messages written before the failure still reach the client
    if shape in ("server_stream", "write_stream"):
        assert received == [b"first"]
    if shape == "bidi_stream":
        assert received == [b"echo:ok"]


async def _unary_details(channel: grpc.aio.Channel, kind: str) -> ErrorDetails:
    _, error = await call(channel, "unary", kind)
    assert error is not None
    return error_details(error)


async def test_bad_request_field_violations(channel: grpc.aio.Channel) -> None:
    details = await _unary_details(channel, "invalid_argument")
    assert details.field_violations == [("spec.window", "end before start"), ("parent", "required")]
    single = await _unary_details(channel, "invalid_single")
    assert single.field_violations == [("page_size", "must be between 1 and 1000")]


async def test_resource_info_on_not_found_and_permission_denied(channel: grpc.aio.Channel) -> None:
    details = await _unary_details(channel, "not_found")
    assert details.resource_info is not None
    assert details.resource_info.resource_type == "flashcrowd.dev/Pack"
    assert details.resource_info.resource_name == "tenants/t1/packs/p9"
    assert details.error_info is not None
    assert dict(details.error_info.metadata)["resourceName"] == "tenants/t1/packs/p9"
    denied = await _unary_details(channel, "permission_denied")
    assert denied.resource_info is not None and denied.resource_info.resource_name == "tenants/t1/packs/p1"


async def test_precondition_failure(channel: grpc.aio.Channel) -> None:
    details = await _unary_details(channel, "failed_precondition")
    assert details.precondition_failure is not None
    [violation] = details.precondition_failure.violations
    assert (violation.type, violation.subject, violation.description) == (
        "SEED_SIZE",
        "tenants/t1/packs/p1",
        "12 < 100",
    )


async def test_retry_and_quota_details(channel: grpc.aio.Channel) -> None:
    exhausted = await _unary_details(channel, "resource_exhausted")
    assert exhausted.retry_after_seconds == 1.5
    assert exhausted.quota_failure is not None
    assert exhausted.quota_failure.violations[0].subject == "tenants/t1"
    unavailable = await _unary_details(channel, "unavailable")
    assert unavailable.retry_after_seconds == 0.2
    assert unavailable.quota_failure is None


async def test_unexpected_error_is_generic_and_logged(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="services.runtime.errors"):
        details = await _unary_details(channel, "unexpected")
    assert details.code is grpc.StatusCode.INTERNAL
    assert SECRET not in details.message and "ValueError" not in details.message
    assert details.error_info is not None and SECRET not in str(details.status)
    # the caller gets a trace id to report; the stack trace stays in the server log
    assert len(details.error_info.metadata["traceId"]) == 32
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None and SECRET in str(record.exc_info[1])


async def test_handler_abort_passes_through(channel: grpc.aio.Channel) -> None:
    for shape in ("unary", "server_stream", "write_stream"):
        _, error = await call(channel, shape, "abort")
        assert error is not None
        assert (error.code(), error.details()) == (grpc.StatusCode.OUT_OF_RANGE, "handler chose this")
        assert rich_status(error) is None


async def test_code_set_by_handler_survives_unexpected_error(channel: grpc.aio.Channel) -> None:
    _, error = await call(channel, "unary", "set_code_then_raise")
    assert error is not None
    assert (error.code(), error.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "handler set this")
    assert SECRET not in str(error)


async def test_unknown_method_is_unimplemented(channel: grpc.aio.Channel) -> None:
    for method in (f"/{SERVICE}/NoSuchMethod", "/flashcrowd.nope.v1.Nope/Get"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(method)(b"")
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_error_details_reads_sync_errors_too(probe_server: ProbeServer) -> None:
    def blocking_call() -> grpc.RpcError:
        with grpc.insecure_channel(probe_server.target) as sync_channel:
            try:
                sync_channel.unary_unary(f"/{SERVICE}/Unary")(b"not_found", timeout=5)
            except grpc.RpcError as error:
                return error
        raise AssertionError("call succeeded")

    details = error_details(await asyncio.to_thread(blocking_call))
    assert details.code is grpc.StatusCode.NOT_FOUND
    assert details.reason == "PACK_NOT_FOUND"
