"""The identity pepper loader: the variable (hex / base64, >= 32 bytes), the embedded default file."""

from __future__ import annotations

import base64
import logging
import multiprocessing
import stat
from pathlib import Path

import pytest

from services.audience.config import AudienceSettings
from services.events import pepper as pepper_module
from services.events.pepper import ENV_VAR, MIN_BYTES, Pepper, load_pepper, parse_pepper
from services.runtime import ConfigError, load_settings

KEY = bytes(range(40))


@pytest.mark.parametrize(
    "text",
    [
        KEY.hex(),
        KEY.hex().upper(),
        base64.b64encode(KEY).decode(),
        base64.b64encode(KEY).decode().rstrip("="),
        base64.urlsafe_b64encode(KEY).decode(),
        f"  {KEY.hex()}\n",
    ],
)
def test_hex_and_base64_values(text: str) -> None:
    assert parse_pepper(text).key == KEY


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("00" * (MIN_BYTES - 1), f"decodes to {MIN_BYTES - 1} bytes"),
        (base64.b64encode(b"short secret").decode(), "decodes to 12 bytes"),
        ("not a pepper!" * 5, "not hex or base64"),
        ("abcde", "not hex or base64"),  # odd-length hex, and no base64 has 4k+1 chars
    ],
)
def test_bad_values_name_the_variable_and_never_echo_the_value(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pepper(text)
    message = str(caught.value)
    assert message.startswith(ENV_VAR + ":") and says in message
    if text.strip():
        assert text.strip() not in message


def test_pepper_repr_and_id_do_not_reveal_the_key() -> None:
    pepper = Pepper(KEY)
    assert KEY.hex() not in repr(pepper) and str(list(KEY)) not in repr(pepper)
    assert len(pepper.id) == 16 and pepper.id != KEY.hex()[:16]
    assert Pepper(KEY).id == pepper.id and Pepper(bytes(40)).id != pepper.id
    with pytest.raises(ValueError):
        Pepper(b"x" * (MIN_BYTES - 1))


def test_the_variable_wins_over_the_default_file(tmp_path: Path) -> None:
    file = tmp_path / "var" / "identity-pepper"
    assert load_pepper(environ={ENV_VAR: KEY.hex()}, default_file=file).key == KEY
    assert not file.exists()
    assert load_pepper("11" * 32, environ={ENV_VAR: KEY.hex()}, default_file=file).key == b"\x11" * 32


def test_default_file_is_generated_once_private_and_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "var" / "identity-pepper"
    with caplog.at_level(logging.WARNING, logger=pepper_module.__name__):
        first = load_pepper(environ={}, default_file=file)
    assert file.is_file() and stat.S_IMODE(file.stat().st_mode) == 0o600
    assert len(first.key) == MIN_BYTES and file.read_text().strip() == first.key.hex()
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "generated now" in warning and str(file) in warning and ENV_VAR in warning
    assert "Secret" in warning and first.key.hex() not in warning
    # Another process (no cache) reads the same file instead of generating a new pepper.
    pepper_module._file_cache.clear()
    assert load_pepper(environ={}, default_file=file).key == first.key
    assert list(file.parent.iterdir()) == [file]  # no temporary files left behind


def _load_in_child(path: str, queue: multiprocessing.Queue) -> None:
    queue.put(load_pepper(environ={}, default_file=path).key)


def test_processes_racing_for_the_default_file_agree(tmp_path: Path) -> None:
    file = str(tmp_path / "var" / "identity-pepper")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_load_in_child, args=(file, queue)) for _ in range(3)]
    for child in children:
        child.start()
    keys = {queue.get(timeout=60) for _ in children}
    for child in children:
        child.join(timeout=60)
    assert len(keys) == 1 and keys == {bytes.fromhex(Path(file).read_text().strip())}


def test_a_broken_default_file_stops_with_the_variable_named(tmp_path: Path) -> None:
    file = tmp_path / "identity-pepper"
    file.write_text("too short\n")
    file.chmod(0o600)
    with pytest.raises(ConfigError, match=f"{ENV_VAR} is not set, and its default file"):
        load_pepper(environ={}, default_file=file)


def test_audience_settings_validate_the_pepper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "deadbeef")
    with pytest.raises(ConfigError) as caught:
        load_settings(AudienceSettings, store_url="./var/store")
    assert ENV_VAR in str(caught.value) and "deadbeef" not in str(caught.value)
    monkeypatch.setenv(ENV_VAR, KEY.hex())
    settings = load_settings(AudienceSettings, store_url="./var/store")
    assert settings.pepper().key == KEY and KEY.hex() not in repr(settings)
