"""``python -m services.audience`` as a real process, and its configuration errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as api
from flashcrowd.audience.v1 import audience_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.audience.config import AudienceSettings
from services.runtime import ConfigError, load_settings
from tests.fixtures.channels import backend_channel


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FLASHCROWD_MAX_CONCURRENT_BUILDS", "0"),
        ("FLASHCROWD_PERSONA_MIN_SIZE", "-3"),
        ("FLASHCROWD_UPLOAD_MAX_ROWS", "lots"),
        ("FLASHCROWD_PRIVACY_EPSILON_SIZE", "0"),
        ("FLASHCROWD_STORE_URL", "ftp://files/x"),
        ("FLASHCROWD_STORE_URL", "s3://minio:9000"),
        ("FLASHCROWD_DATASET_PREFIX", "../data"),
        ("FLASHCROWD_IDENTITY_PEPPER", "0123456789abcdef"),  # 8 bytes: too short
        ("FLASHCROWD_IDENTITY_PEPPER", "not hex, not base64!"),
    ],
)
def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(AudienceSettings)
    assert variable in str(caught.value)
    if "PEPPER" in variable:
        assert value not in str(caught.value)  # a secret is never echoed


def test_settings_defaults() -> None:
    settings = load_settings(AudienceSettings, store_url="./var/store")
    assert settings.dataset_prefix == "data/" and settings.max_concurrent_builds == 2
    assert settings.persona_min_size == 1000 and settings.upload_max_rows == 5_000_000


async def _serving_port(process: asyncio.subprocess.Process) -> int:
    """The port from the process's JSON "serving" log line."""
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), timeout=60)  # type: ignore[union-attr]
        assert line, "process exited before serving"
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == "serving":
            return int(entry["port"])


async def test_module_serves_and_stops_on_sigterm(local_world) -> None:
    _, url = local_world
    env = {**os.environ, "FLASHCROWD_STORE_URL": url, "FLASHCROWD_PORT": "0", "FLASHCROWD_LOG_JSON": "true"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.audience", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        port = await _serving_port(process)
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "flashcrowd.audience.v1.AudienceService", "google.longrunning.Operations"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = audience_service_pb2_grpc.AudienceServiceStub(channel)
            listed = await stub.ListPacks(api.ListPacksRequest(parent="tenants/nobody"))
            assert not listed.packs
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_during_a_training_ends_within_one_grace(local_world, tmp_path) -> None:
    """A lookalike training (which never checks for cancellation) is running at SIGTERM: the
    process still exits within its grace, not after the RPC grace plus a second job grace."""
    import time

    from flashcrowd.audience.v1 import lookalike_pb2, lookalike_pb2_grpc

    _, url = local_world
    grace = 1.0
    env = {
        **os.environ,
        "FLASHCROWD_STORE_URL": url,
        "FLASHCROWD_PORT": "0",
        "FLASHCROWD_LOG_JSON": "true",
        "FLASHCROWD_GRACE_SECONDS": str(grace),
        # Its own control database: the training must not use up the shared store's daily quota.
        "FLASHCROWD_CONTROL_DATABASE_URL": f"sqlite:///{tmp_path / 'control.sqlite3'}",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.audience", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        port = await _serving_port(process)
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            stub = lookalike_pb2_grpc.LookalikeServiceStub(channel)
            operation = await stub.TrainLookalikeModel(
                lookalike_pb2.TrainLookalikeModelRequest(model_id="sigterm-model", cluster_count=8)
            )
            assert not operation.done
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        assert time.monotonic() - started < grace + 3.0, "the pod would outlive its termination grace"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
