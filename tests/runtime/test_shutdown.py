"""A real service process: serves, drains in-flight RPCs on SIGTERM, exits 0; bad config exits 2."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime import NOT_SERVING, SERVING

from .probe import SERVICE

REPO = Path(__file__).resolve().parents[2]
GRACE = 3.0

LogEntry = dict[str, Any]
Service = tuple[asyncio.subprocess.Process, int, list[LogEntry]]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLASHCROWD_"))}
    return {**env, "FLASHCROWD_HOST": "127.0.0.1", **extra}


async def _start(**env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.runtime.sample_service",
        cwd=REPO,
        env=_env(**env),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _log_lines(process: asyncio.subprocess.Process) -> AsyncIterator[LogEntry]:
    assert process.stderr is not None
    while line := await process.stderr.readline():
        if line.startswith(b"{"):  # grpc core may log plain lines of its own
            yield json.loads(line)


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    process = await _start(FLASHCROWD_PORT="0", FLASHCROWD_GRACE_SECONDS=str(GRACE))
    logs: list[LogEntry] = []
    lines = _log_lines(process)

    async def wait_serving() -> int:
        async for entry in lines:
            logs.append(entry)
            if entry["message"] == "serving":
                return int(entry["port"])
        raise AssertionError(f"service exited before serving: {logs}")

    try:
        port = await asyncio.wait_for(wait_serving(), 20)

        async def drain() -> None:
            async for entry in lines:
                logs.append(entry)

        drainer = asyncio.create_task(drain())
        yield process, port, logs
        if process.returncode is None:  # the test did not stop it itself
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(drainer, GRACE + 5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_drains_in_flight_rpcs_and_exits_zero(service: Service) -> None:
    process, port, logs = service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert (await watch.read()).status == SERVING

        slow = asyncio.ensure_future(channel.unary_unary(f"/{SERVICE}/Sleep")(b"0.5", timeout=10))
        await asyncio.sleep(0.1)  # let the call reach the handler
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)

        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        watch.cancel()
        assert await slow == b"done"  # in-flight work finishes within the grace period
        assert await asyncio.wait_for(process.wait(), GRACE + 5) == 0
        assert time.monotonic() - started < GRACE + 2

    messages = [entry["message"] for entry in logs]
    assert messages[-3:] == ["stopping", "probe closed", "stopped"]
    assert all(entry["service"] == "sample" for entry in logs)


async def test_bad_config_exits_2_naming_the_variable() -> None:
    process = await _start(FLASHCROWD_PORT="abc")
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        "sample: configuration error: FLASHCROWD_PORT: Input should be a valid integer"
    )


async def test_start_failure_exits_1_with_the_reason(service: Service) -> None:
    _, taken_port, _ = service  # a running service holds the port
    process = await _start(FLASHCROWD_PORT=str(taken_port))
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1
    entries = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    [failure] = [entry for entry in entries if entry["level"] == "ERROR"]
    assert f"cannot bind 127.0.0.1:{taken_port}" in failure["exception"]
    assert [e["message"] for e in entries if e["message"] == "probe closed"] == ["probe closed"]
