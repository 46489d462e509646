"""Structured logging: one JSON object per line, stamped with the current trace and span ids.

Named ``logs`` rather than ``logging`` so it never shadows the standard library module.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

from services.runtime.config import BaseServiceSettings

# Attributes every LogRecord has; anything else came in through ``extra=`` and is emitted as a field.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _trace_ids() -> tuple[str, str] | None:
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return trace.format_trace_id(span_context.trace_id), trace.format_span_id(span_context.span_id)


class JsonFormatter(logging.Formatter):
    """``{"timestamp", "level", "logger", "message", "service", "trace_id", "span_id", ...extra}``."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service_name,
        }
        ids = _trace_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs (``FLASHCROWD_LOG_JSON=false``), still with the trace id."""

    def __init__(self, service_name: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = _trace_ids()
        return f"{line} [trace_id={ids[0]}]" if ids else line


class _RuntimeHandler(logging.StreamHandler):
    """Marks the handler we installed so a second ``setup_logging`` replaces it instead of doubling."""


def setup_logging(settings: BaseServiceSettings, service_name: str, *, stream: TextIO | None = None) -> None:
    """Route the root logger to stderr (stdout stays free for CLI output) in the configured format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _RuntimeHandler):
            root.removeHandler(handler)
    handler = _RuntimeHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service_name) if settings.log_json else TextFormatter(service_name))
    root.addHandler(handler)
    root.setLevel(settings.log_level)


__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]
