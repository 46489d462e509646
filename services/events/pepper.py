"""The platform identity pepper: the HMAC key of the identity map (``services.events.identity``).

One loader for every process that writes or reads keyed identifiers (``flashcrowd gen``, the
audience service's uploads and exports, data importers of identities):

1. ``FLASHCROWD_IDENTITY_PEPPER`` when set (in Kubernetes: the Secret ``flashcrowd-identity-pepper``,
   key ``pepper``): hex (tried first) or base64 (standard or URL-safe alphabet, padding optional) of
   at least ``MIN_BYTES`` (32) bytes. A bad value stops the process with a ``ConfigError`` naming
   the variable; the value itself is never echoed (not in errors, not in logs, not in ``repr``).
2. Otherwise the embedded default: the file ``./var/identity-pepper`` (relative to the working
   directory, like the other embedded defaults under ``./var``). The first process that needs it
   creates it with 32 random bytes (hex, mode 0600) and logs a warning; later processes (the demo's
   services, tests, another ``flashcrowd gen``) reuse it, so that they all agree. Creation is
   atomic (written to a private temporary file, then hard-linked into place, which fails if
   another process won the race: the winner's file is then read). A deployment must set the
   variable from a Secret: replicas with their own generated files would not match each other.

Invariants: ``Pepper.key`` never leaves this process except as HMAC output. ``Pepper.id`` is a
public fingerprint (the first 8 bytes, hex, of HMAC-SHA-256(key, ``b"flashcrowd identity pepper
id"``)): it is stored with every identity-map row (``pepper_id``) so that a reader with another
pepper fails loudly instead of silently matching nothing, and it reveals nothing about the key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import os
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime import ConfigError

__all__ = ["DEFAULT_FILE", "ENV_VAR", "MIN_BYTES", "Pepper", "load_pepper", "parse_pepper"]

logger = logging.getLogger(__name__)

ENV_VAR = "FLASHCROWD_IDENTITY_PEPPER"
#: The embedded default's file, relative to the working directory.
DEFAULT_FILE = Path("var") / "identity-pepper"
MIN_BYTES = 32
_ID_MESSAGE = b"flashcrowd identity pepper id"
_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})+$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")

_file_cache: dict[Path, Pepper] = {}
_file_lock = threading.Lock()


@dataclass(frozen=True)
class Pepper:
    """The HMAC key of identity digests; ``source`` says where it came from (never the value)."""

    key: bytes = field(repr=False)
    source: str = ENV_VAR

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) < MIN_BYTES:
            raise ValueError(f"an identity pepper has at least {MIN_BYTES} bytes")

    @property
    def id(self) -> str:
        """Public fingerprint of the key (16 hex chars); see the module doc."""
        return hmac.digest(self.key, _ID_MESSAGE, "sha256")[:8].hex()


def parse_pepper(text: str, *, source: str = ENV_VAR) -> Pepper:
    """Decode hex or base64 of >= 32 bytes; ``ConfigError`` naming ``source`` (not the value)."""
    value = text.strip() if isinstance(text, str) else ""
    if not value:
        raise ConfigError(f"{source}: is empty; set hex or base64 of at least {MIN_BYTES} random bytes")
    key: bytes | None = None
    if _HEX.match(value):
        key = bytes.fromhex(value)
    elif _BASE64.match(value):
        core = value.rstrip("=")
        alphabet = b"-_" if ("-" in core or "_" in core) else None  # URL-safe alphabet
        with contextlib.suppress(binascii.Error, ValueError):
            key = base64.b64decode(core + "=" * (-len(core) % 4), altchars=alphabet, validate=True)
    if key is None:
        raise ConfigError(
            f"{source}: not hex or base64 (value not shown); generate one with `openssl rand -hex 32`"
        )
    if len(key) < MIN_BYTES:
        raise ConfigError(
            f"{source}: decodes to {len(key)} bytes; an identity pepper needs at least {MIN_BYTES} "
            "(e.g. `openssl rand -hex 32`)"
        )
    return Pepper(key, source)


def load_pepper(
    configured: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    default_file: str | Path | None = None,
) -> Pepper:
    """The pepper of this process: ``configured`` (a settings value), else ``FLASHCROWD_IDENTITY_PEPPER``,
    else the embedded default file (created on first use; see the module doc)."""
    if configured is not None:
        return parse_pepper(configured)
    env = os.environ if environ is None else environ
    if ENV_VAR in env:
        return parse_pepper(env[ENV_VAR])
    return _default_file_pepper(Path(default_file) if default_file is not None else DEFAULT_FILE)


def _default_file_pepper(path: Path) -> Pepper:
    resolved = path.absolute()
    with _file_lock:
        cached = _file_cache.get(resolved)
        if cached is not None:
            return cached
        created = False
        if not resolved.exists():
            created = _create(resolved)
        pepper = _read(resolved)
        _file_cache[resolved] = pepper
    logger.warning(
        "%s is not set: identity digests are keyed with the embedded default pepper %s %s "
        "(pepper id %s); every local process reuses that file. A deployment must set %s from a Secret.",
        ENV_VAR,
        "generated now in" if created else "from",
        resolved,
        pepper.id,
        ENV_VAR,
    )
    return pepper


def _create(path: Path) -> bool:
    """Write 32 random bytes (hex) to ``path`` atomically, mode 0600; False if another process won."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(secrets.token_bytes(MIN_BYTES).hex() + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)  # fails if the file appeared meanwhile: never overwrite a pepper
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as error:
        raise ConfigError(
            f"{ENV_VAR}: not set, and the embedded default pepper file {path} cannot be created "
            f"({error.strerror or error}); set {ENV_VAR}"
        ) from None


def _read(path: Path) -> Pepper:
    try:
        text = path.read_text(encoding="ascii")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(f"{ENV_VAR}: not set, and {path} cannot be read ({reason})") from None
    if mode & 0o077:
        logger.warning(
            "identity pepper file %s is open to others (mode %o): chmod 600 it", path, mode & 0o777
        )
    parsed = parse_pepper(text, source=f"{ENV_VAR} is not set, and its default file {path}")
    return Pepper(parsed.key, f"default file {path}")
