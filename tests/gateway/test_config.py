"""Gateway settings fail at start with the variable named."""

from __future__ import annotations

import pytest

from services.gateway.config import GatewaySettings
from services.runtime import ConfigError, load_settings


def test_rate_limits_from_json_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHCROWD_RATE_LIMITS", '{"CheckMembership": {"rate": 500, "burst": 1000}}')
    settings = load_settings(GatewaySettings)
    assert settings.rate_limit_for("/flashcrowd.audience.v1.AudienceService/CheckMembership").rate == 500
    assert (
        settings.rate_limit_for("/flashcrowd.audience.v1.AudienceService/GetPack")
        == settings.default_rate_limit
    )


@pytest.mark.parametrize(
    "variable, value",
    [
        ("FLASHCROWD_RATE_LIMITS", '{"GetPak": {"rate": 1, "burst": 1}}'),
        ("FLASHCROWD_RATE_LIMITS", '{"GetPack": {"rate": 0, "burst": 1}}'),
        ("FLASHCROWD_JWT_RS256_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"),
        ("FLASHCROWD_JWT_RS256_PUBLIC_KEY", "/no/such/key.pem"),
        ("FLASHCROWD_GATEWAY_ASSERTION_KEY", "too-short"),
        ("FLASHCROWD_RETRY_MAX_BACKOFF_SECONDS", "0.001"),
    ],
)
def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(GatewaySettings)
    if variable != "FLASHCROWD_RETRY_MAX_BACKOFF_SECONDS":
        assert variable in str(caught.value)
