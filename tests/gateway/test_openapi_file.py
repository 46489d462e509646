"""The committed OpenAPI document matches the protos (regenerate: python -m services.gateway.openapi)."""

from __future__ import annotations

from pathlib import Path

from services.gateway.cli import render

COMMITTED = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def test_committed_openapi_is_current() -> None:
    assert COMMITTED.read_text() == render(), (
        "openapi/openapi.json is stale: "
        "run `.venv/bin/python -m services.gateway.openapi > openapi/openapi.json`"
    )
