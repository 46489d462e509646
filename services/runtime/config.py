"""Settings every service shares, read from ``FLASHCROWD_*`` environment variables.

A service subclasses ``BaseServiceSettings`` with its own fields (they inherit the prefix, so
``store_url`` reads ``FLASHCROWD_STORE_URL``) and loads it with ``load_settings`` so that a bad
value fails at start with the variable named, not deep inside the first request.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, AliasPath, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "FLASHCROWD_"
MIB = 1024 * 1024

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ConfigError(Exception):
    """The environment does not describe a valid configuration; the message names the variables."""


class BaseServiceSettings(BaseSettings):
    """Fields common to every gRPC service process."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    #: 0 lets the kernel pick a free port (tests); deployments set a fixed one.
    port: int = Field(default=0, ge=0, le=65535)
    #: Seconds in-flight RPCs get to finish after SIGTERM; keep it below Kubernetes'
    #: terminationGracePeriodSeconds so telemetry still gets flushed.
    grace_seconds: float = Field(default=5.0, ge=0)
    log_level: LogLevel = "INFO"
    log_json: bool = True
    max_message_bytes: int = Field(default=16 * MIB, gt=0)
    #: None means unbounded; a bound makes excess RPCs queue instead of exhausting memory.
    max_concurrent_rpcs: int | None = Field(default=None, gt=0)
    #: Calls queued in gRPC core before a handler takes them (bursts); the hard limit is twice this.
    max_pending_requests: int = Field(default=10_000, ge=100, le=1_000_000)
    #: Key of the gateway's signed assertions (services/runtime/assertion.py): a Secret shared by the
    #: gateway and every backend. Unset: generated once under ./var (embedded default).
    gateway_assertion_key: SecretStr | None = None

    @field_validator("gateway_assertion_key", mode="after")
    @classmethod
    def _assertion_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            from services.runtime.assertion import parse_key

            parse_key(value.get_secret_value())
        return value or None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value


S = TypeVar("S", bound=BaseSettings)


def env_var_name(cls: type[BaseSettings], field_name: str) -> str:
    """The environment variable pydantic-settings reads for ``field_name`` of ``cls``."""
    field = cls.model_fields.get(field_name)
    alias = field.validation_alias if field is not None else None
    if isinstance(alias, str):
        return alias.upper()
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        if isinstance(first, str):
            return first.upper()
    if isinstance(alias, AliasPath) and isinstance(alias.path[0], str):
        return alias.path[0].upper()
    prefix = cls.model_config.get("env_prefix") or ""
    return f"{prefix}{field_name}".upper()


# Values of these variables may carry credentials (URLs with user:password, keys): never echo them.
_SECRET_HINTS = ("URL", "KEY", "SECRET", "PASSWORD", "TOKEN", "DSN")


def _may_hold_secret(variable: str) -> bool:
    return any(hint in variable.upper() for hint in _SECRET_HINTS)


def _describe(cls: type[BaseSettings], error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        loc = item.get("loc") or ()
        name = env_var_name(cls, str(loc[0])) if loc else cls.__name__
        if len(loc) > 1:  # nested model fields: FLASHCROWD_X (field.sub)
            name += " (" + ".".join(str(p) for p in loc) + ")"
        message = item.get("msg", "invalid value")
        if item.get("type") != "missing" and "input" in item and not _may_hold_secret(name):
            message += f" (got {item['input']!r})"
        parts.append(f"{name}: {message}")
    return "; ".join(parts)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build ``cls`` from the environment; raise ``ConfigError`` naming each bad variable.

    ``overrides`` take precedence over the environment (tests, CLIs).
    """
    try:
        return cls(**overrides)
    except ValidationError as error:
        raise ConfigError(_describe(cls, error)) from None
