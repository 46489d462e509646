"""OpenTelemetry setup shared by every service and CLI, configured by the standard ``OTEL_*`` variables.

- ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` override the name and attributes given in code.
- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: comma list of ``otlp``, ``console``, ``none``.
  When unset, ``otlp`` is used if an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or the
  per-signal variant) and nothing otherwise, so a laptop run does not retry a collector that is absent.
- ``OTEL_SDK_DISABLED=true`` turns everything into no-ops.
- The OTLP exporters are the gRPC ones and read their own ``OTEL_EXPORTER_OTLP_*`` variables.

The global tracer provider can be set once per process, so ``setup_telemetry`` is idempotent: later
calls return the same ``Telemetry`` (adding any ``span_exporter`` they pass, which is how tests attach
an ``InMemorySpanExporter``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_NAMESPACE, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

logger = logging.getLogger(__name__)

NAMESPACE = "flashcrowd"
HEALTH_SERVICE = "grpc.health.v1.Health"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _exporter_names(variable: str, signal_endpoint: str) -> list[str]:
    raw = os.environ.get(variable)
    if raw is None or not raw.strip():
        has_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(signal_endpoint)
        return ["otlp"] if has_endpoint else []
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    return [] if "none" in names else names


@dataclass
class Telemetry:
    """Handle on this process's providers; ``shutdown()`` flushes and stops what it created."""

    service_name: str
    enabled: bool
    resource: Resource | None = None
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    _owns_tracer_provider: bool = False
    _shut_down: bool = False
    _exporters: list[SpanExporter] = field(default_factory=list)

    def tracer(self, name: str) -> trace.Tracer:
        return trace.get_tracer(name, tracer_provider=self.tracer_provider)

    def meter(self, name: str) -> metrics.Meter:
        return metrics.get_meter(name, meter_provider=self.meter_provider)

    def add_span_exporter(self, exporter: SpanExporter, *, batch: bool = False) -> None:
        """Attach another exporter; unbatched by default so tests see spans as soon as they end."""
        if self.tracer_provider is None or exporter in self._exporters:
            return
        self._exporters.append(exporter)
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.tracer_provider.add_span_processor(processor)

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        ok = True
        if self.tracer_provider is not None:
            ok = self.tracer_provider.force_flush(timeout_millis) and ok
        if self.meter_provider is not None:
            ok = self.meter_provider.force_flush(timeout_millis) and ok
        return ok

    def shutdown(self) -> None:
        """Flush and stop exporters. Safe to call twice; spans recorded afterwards are dropped."""
        if self._shut_down:
            return
        self._shut_down = True
        try:
            if self.tracer_provider is not None and self._owns_tracer_provider:
                self.tracer_provider.shutdown()
            elif self.tracer_provider is not None:
                self.tracer_provider.force_flush()
            if self.meter_provider is not None:
                self.meter_provider.shutdown()
        except Exception:  # telemetry must never turn a clean stop into a crash
            logger.exception("telemetry shutdown failed")


_lock = threading.Lock()
_telemetry: Telemetry | None = None


def _resource(service_name: str) -> Resource:
    # Resource.create lets code override the environment; we want the reverse (OTEL_SERVICE_NAME,
    # set from the Kubernetes component label, wins), so merge the env detector on top again.
    base = Resource.create({SERVICE_NAME: service_name, SERVICE_NAMESPACE: NAMESPACE})
    return base.merge(OTELResourceDetector().detect())


def _span_exporters(names: Sequence[str]) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            logger.warning("unsupported OTEL_TRACES_EXPORTER entry %r ignored", name)
    return exporters


def _metric_readers(names: Sequence[str]) -> list[MetricReader]:
    readers: list[MetricReader] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        elif name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        else:
            logger.warning("unsupported OTEL_METRICS_EXPORTER entry %r ignored", name)
    return readers


def setup_telemetry(
    service_name: str,
    *,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> Telemetry:
    """Install tracer and meter providers for this process once; later calls return the same handle.

    ``span_exporter`` is attached (unbatched) on every call, first or not. ``metric_reader`` only
    takes effect on the first call, because a meter provider cannot gain readers afterwards.
    """
    global _telemetry
    with _lock:
        if _telemetry is not None:
            if span_exporter is not None:
                _telemetry.add_span_exporter(span_exporter)
            if metric_reader is not None and _telemetry.meter_provider is not None:
                logger.warning("metric_reader ignored: telemetry was already set up in this process")
            return _telemetry

        if _env_flag("OTEL_SDK_DISABLED"):
            _telemetry = Telemetry(service_name=service_name, enabled=False)
            return _telemetry

        resource = _resource(service_name)
        existing = trace.get_tracer_provider()
        # An SDK provider installed by someone else (e.g. opentelemetry-instrument) is reused.
        owns = not isinstance(existing, TracerProvider)
        if isinstance(existing, TracerProvider):
            tracer_provider = existing
        else:
            tracer_provider = TracerProvider(resource=resource)
            trace.set_tracer_provider(tracer_provider)
            for exporter in _span_exporters(
                _exporter_names("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            ):
                tracer_provider.add_span_processor(BatchSpanProcessor(exporter))

        readers = _metric_readers(
            _exporter_names("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        )
        if metric_reader is not None:
            readers.append(metric_reader)
        existing_meters = metrics.get_meter_provider()
        if isinstance(existing_meters, MeterProvider):  # installed by someone else: reuse, as above
            meter_provider = existing_meters
        else:
            meter_provider = MeterProvider(resource=resource, metric_readers=readers)
            metrics.set_meter_provider(meter_provider)

        _telemetry = Telemetry(
            service_name=str(resource.attributes.get(SERVICE_NAME, service_name)),
            enabled=True,
            resource=resource,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            _owns_tracer_provider=owns,
        )
        if span_exporter is not None:
            _telemetry.add_span_exporter(span_exporter)
        return _telemetry


def current_telemetry() -> Telemetry | None:
    """The handle ``setup_telemetry`` installed, or None when nobody has called it yet."""
    return _telemetry


def tracing_server_interceptor() -> grpc.aio.ServerInterceptor:
    """Server spans for every RPC except health checks (kubelet probes every few seconds are noise)."""
    return aio_server_interceptor(filter_=filters.negate(filters.service_name(HEALTH_SERVICE)))


def instrumented_channel(
    target: str,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    credentials: grpc.ChannelCredentials | None = None,
    compression: grpc.Compression | None = None,
) -> grpc.aio.Channel:
    """An aio channel whose calls start client spans and carry the trace context to the server."""
    chain: list[grpc.aio.ClientInterceptor] = [*aio_client_interceptors(), *interceptors]
    if credentials is not None:
        return grpc.aio.secure_channel(
            target, credentials, options=list(options), compression=compression, interceptors=chain
        )
    return grpc.aio.insecure_channel(
        target, options=list(options), compression=compression, interceptors=chain
    )


__all__ = [
    "Telemetry",
    "current_telemetry",
    "instrumented_channel",
    "setup_telemetry",
    "tracing_server_interceptor",
]
