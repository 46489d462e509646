"""Shared runtime of every flashcrowd gRPC service: config, server bootstrap, errors, telemetry, logs.

A service's ``__main__`` is ``run_service(name, SettingsClass, build)``; tests start the same server
with ``create_server(settings, service_names=..., register=...)`` on port 0.
"""

from services.runtime import attributes
from services.runtime.channels import channel_options, make_channel, retry_service_config
from services.runtime.config import BaseServiceSettings, ConfigError, load_settings
from services.runtime.errors import (
    DOMAIN,
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    ErrorDetails,
    ErrorInterceptor,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    error_details,
    rich_status,
)
from services.runtime.logs import JsonFormatter, setup_logging
from services.runtime.server import (
    NOT_SERVING,
    SERVING,
    HealthServicer,
    ServiceDefinition,
    create_server,
    graceful_stop,
    run_service,
    serve_forever,
    server_options,
    start_callbacks,
)
from services.runtime.telemetry import (
    Telemetry,
    current_telemetry,
    instrumented_channel,
    setup_telemetry,
    tracing_server_interceptor,
)

__all__ = [
    "DOMAIN",
    "NOT_SERVING",
    "SERVING",
    "Aborted",
    "AlreadyExists",
    "BaseServiceSettings",
    "ConfigError",
    "DeadlineExceeded",
    "ErrorDetails",
    "ErrorInterceptor",
    "FailedPrecondition",
    "HealthServicer",
    "InvalidArgument",
    "JsonFormatter",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceDefinition",
    "ServiceError",
    "Telemetry",
    "Unauthenticated",
    "Unavailable",
    "attributes",
    "channel_options",
    "create_server",
    "current_telemetry",
    "error_details",
    "graceful_stop",
    "instrumented_channel",
    "load_settings",
    "make_channel",
    "retry_service_config",
    "rich_status",
    "run_service",
    "serve_forever",
    "server_options",
    "setup_logging",
    "setup_telemetry",
    "start_callbacks",
    "tracing_server_interceptor",
]
