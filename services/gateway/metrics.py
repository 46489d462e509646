"""Gateway metrics: requests, latency and errors per method and tenant.

Attribute keys are the runtime's (``attributes.TENANT``) and OpenTelemetry's RPC conventions
(``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``); instrument names are the runtime's
``flashcrowd.gateway.*`` constants in ``services.runtime.attributes``.
"""

from __future__ import annotations

from opentelemetry import metrics

from services.runtime import attributes

METRIC_REQUESTS = attributes.METRIC_GATEWAY_REQUESTS
METRIC_DURATION = attributes.METRIC_GATEWAY_DURATION
METRIC_ERRORS = attributes.METRIC_GATEWAY_ERRORS
METRIC_RETRIES = attributes.METRIC_GATEWAY_RETRIES
METRIC_RATE_LIMITED = attributes.METRIC_GATEWAY_RATE_LIMITED

# Gateway-only instruments (not in services.runtime.attributes yet).
METRIC_AUDIT_WRITTEN = "flashcrowd.gateway.audit.written"
METRIC_AUDIT_DROPPED = "flashcrowd.gateway.audit.dropped"
METRIC_AUTH_FAILURES = "flashcrowd.gateway.auth_failures"

RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_STATUS = "rpc.grpc.status_code"
TRANSPORT = "flashcrowd.gateway.transport"  # "grpc" or "http"


class GatewayMetrics:
    """Instruments created once from the global meter provider (set up by ``setup_telemetry``)."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = metrics.get_meter("flashcrowd.gateway", meter_provider=meter_provider)
        self.requests = meter.create_counter(METRIC_REQUESTS, unit="{request}", description="Calls handled")
        self.duration = meter.create_histogram(
            METRIC_DURATION, unit="s", description="Time from receiving a call to answering it"
        )
        self.errors = meter.create_counter(
            METRIC_ERRORS, unit="{request}", description="Calls answered non-OK"
        )
        self.retries = meter.create_counter(METRIC_RETRIES, unit="{retry}", description="Backend retries")
        self.rate_limited = meter.create_counter(
            METRIC_RATE_LIMITED, unit="{request}", description="Calls refused by a rate or stream limit"
        )
        self.auth_failures = meter.create_counter(
            METRIC_AUTH_FAILURES, unit="{request}", description="Failed authentications (by outcome)"
        )
        self.audit_written = meter.create_counter(
            METRIC_AUDIT_WRITTEN, unit="{entry}", description="Audit entries written to the audit table"
        )
        self.audit_dropped = meter.create_counter(
            METRIC_AUDIT_DROPPED,
            unit="{entry}",
            description="Audit entries dropped (queue full, write failed)",
        )

    def record(
        self, service: str, method: str, tenant: str, code: int, seconds: float, transport: str
    ) -> None:
        labels: dict[str, str | int] = {
            RPC_SERVICE: service,
            RPC_METHOD: method,
            attributes.TENANT: tenant,
            RPC_STATUS: code,
            TRANSPORT: transport,
        }
        self.requests.add(1, labels)
        self.duration.record(seconds, labels)
        if code != 0:
            self.errors.add(1, labels)


__all__ = ["GatewayMetrics"]
