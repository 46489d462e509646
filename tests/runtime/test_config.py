"""Settings from FLASHCROWD_* variables, and errors that name the variable."""

from __future__ import annotations

import pytest
from pydantic import Field

from services.runtime import BaseServiceSettings, ConfigError, load_settings


class AudienceLikeSettings(BaseServiceSettings):
    store_url: str = "file:///tmp/flashcrowd"
    shard_count: int = Field(default=1, ge=1)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOST", "PORT", "GRACE_SECONDS", "LOG_LEVEL", "LOG_JSON", "MAX_MESSAGE_BYTES"):
        monkeypatch.delenv(f"FLASHCROWD_{name}", raising=False)
    settings = load_settings(BaseServiceSettings)
    assert (settings.host, settings.port, settings.grace_seconds) == ("127.0.0.1", 0, 5.0)
    assert settings.log_json is True
    assert settings.max_message_bytes == 16 * 1024 * 1024
    assert settings.max_concurrent_rpcs is None


def test_environment_and_subclass_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHCROWD_PORT", "50051")
    monkeypatch.setenv("FLASHCROWD_LOG_LEVEL", "debug")
    monkeypatch.setenv("FLASHCROWD_STORE_URL", "s3://packs@minio:9000")
    settings = load_settings(AudienceLikeSettings)
    assert (settings.port, settings.log_level, settings.store_url) == (
        50051,
        "DEBUG",
        "s3://packs@minio:9000",
    )
    assert load_settings(AudienceLikeSettings, port=0).port == 0  # explicit overrides win


def test_errors_name_every_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHCROWD_PORT", "abc")
    monkeypatch.setenv("FLASHCROWD_SHARD_COUNT", "0")
    with pytest.raises(ConfigError) as caught:
        load_settings(AudienceLikeSettings)
    message = str(caught.value)
    assert "FLASHCROWD_PORT: Input should be a valid integer" in message
    assert "'abc'" in message
    assert "FLASHCROWD_SHARD_COUNT: Input should be greater than or equal to 1" in message
    assert "\n" not in message


def test_values_of_secret_bearing_variables_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    class WithUrl(BaseServiceSettings):
        store_url: int = 0  # an int field, so that a URL fails validation

    monkeypatch.setenv("FLASHCROWD_STORE_URL", "s3://AKIA:supersecret@host:9000/bucket")
    monkeypatch.setenv("FLASHCROWD_PORT", "abc")
    with pytest.raises(ConfigError) as err:
        load_settings(WithUrl)
    text = str(err.value)
    assert "FLASHCROWD_STORE_URL" in text and "supersecret" not in text
    assert "'abc'" in text  # ordinary values are still shown
