"""Normalise external identifiers (phone, OAID, IMEI, IDFA, e-mail) and key them under the pepper.

The rule (the design notes, ../shared/docs/ARCHITECTURE.md): raw identifiers are normalised,
hashed at the edge and never written; and no plain digest of one is stored either, because the
mainland mobile space (10^8 numbers) is brute-forced in seconds. The identity map stores *keyed*
hashes only, under the platform pepper ``P`` (``services.events.pepper``; at least 32 bytes):

* ``key_sha256 = HMAC-SHA-256(key=P, msg=SHA-256(n))`` and
* ``key_md5    = HMAC-SHA-256(key=P, msg=MD5(n))``

where ``n`` is the UTF-8 encoding of the *normalised* value and ``msg`` is the raw digest: 32 bytes
for SHA-256, 16 bytes for MD5 (not its hex text). Both columns are 64 lower-case hex characters.
Because the HMAC is taken over the digest, an upload matches whatever form the advertiser holds:
raw values are normalised and SHA-256-hashed at the edge (``hash_identifier``, the CLI's ``--raw``)
and the service keys the digest; uploaded SHA-256 digests are keyed into ``key_sha256``; uploaded
MD5 digests are keyed into ``key_md5``. The service never needs, and never keeps, the digest
itself: ``key_digest`` turns it into the keyed form as soon as the row has been validated.

``hash_identifier`` / ``hash_normalised`` (plain digests) exist for the edge only: what a client
sends. Nothing server-side stores, logs or exports their output.

Normalisation:

* phone: digits only, with country code. ``"+86 138-0013-8000"`` -> ``"8613800138000"``; an
  11-digit mainland mobile without country code (``"13800138000"``) gets ``"86"``; a ``00``
  international prefix is dropped; 7..15 digits after normalisation (E.164), else invalid.
* e-mail: trimmed and lower-cased; must look like ``local@domain.tld``.
* device ids (OAID, IMEI, IDFA): trimmed and lower-cased; IMEI 14-16 digits; IDFA a UUID that is not
  all zeros (the "limit ad tracking" value); OAID 8-64 of ``[0-9a-f-]`` and not all zeros.

Invalid inputs raise ``InvalidIdentifier`` (a ``ValueError``) with a reason fit for an upload's
"invalid rows" report.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from services.events.pepper import Pepper
from services.events.schema import ID_TYPE_NAMES, IdType

__all__ = [
    "IdType",
    "InvalidIdentifier",
    "hash_identifier",
    "hash_normalised",
    "id_type_of",
    "is_hex_digest",
    "key_digest",
    "key_hex_digests",
    "key_identifier",
    "key_normalised",
    "looks_like_raw_phone",
    "normalise",
    "normalise_device_id",
    "normalise_email",
    "normalise_phone",
]


class InvalidIdentifier(ValueError):
    """The value cannot be normalised for its identifier type; the message says why."""


_NON_DIGIT = re.compile(r"\D")
_PHONE_CHARS = re.compile(r"^[\d\s().+\-]+$")
_CN_MOBILE = re.compile(r"^1[3-9]\d{9}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_OAID = re.compile(r"^[0-9a-f-]{8,64}$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_DIGEST_LENGTHS = {"md5": 32, "sha256": 64}


def id_type_of(value: IdType | int | str) -> IdType:
    """``IdType`` from an enum, a code (1..5) or a name (``"phone"``, ``"ID_TYPE_PHONE"``)."""
    if isinstance(value, IdType):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return IdType(value)
        except ValueError:
            pass
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("id_type_")
        for code, name in ID_TYPE_NAMES.items():
            if key == name:
                return IdType(code)
    raise ValueError(f"unknown identifier type {value!r}; known: {', '.join(ID_TYPE_NAMES.values())}")


def normalise_phone(raw: str) -> str:
    """Digits with country code; see the module doc."""
    value = raw.strip()
    if not value:
        raise InvalidIdentifier("empty phone number")
    if not _PHONE_CHARS.match(value) or value.count("+") > 1:
        raise InvalidIdentifier("phone number has characters other than digits, spaces, one +, - ( ) .")
    plus = value.lstrip("( ").startswith("+")
    digits = _NON_DIGIT.sub("", value)
    if not plus and digits.startswith("00"):
        digits, plus = digits[2:], True
    if not plus and _CN_MOBILE.match(digits):
        digits = "86" + digits
    if plus and digits.startswith("86") and len(digits) == 14 and digits[2] == "0":
        digits = "86" + digits[3:]  # "+86 0138..." written with the domestic trunk prefix
    if not 7 <= len(digits) <= 15:
        raise InvalidIdentifier(f"phone number has {len(digits)} digits after normalisation; expected 7..15")
    if digits.startswith("0"):
        raise InvalidIdentifier("phone number without country code (starts with 0)")
    return digits


def normalise_email(raw: str) -> str:
    value = raw.strip().lower()
    if not _EMAIL.match(value):
        raise InvalidIdentifier("not an e-mail address (expected local@domain.tld)")
    return value


def normalise_device_id(id_type: IdType | int | str, raw: str) -> str:
    kind = id_type_of(id_type)
    value = raw.strip().lower()
    if not value:
        raise InvalidIdentifier(f"empty {kind.name.lower()}")
    if kind is IdType.IMEI:
        if not (value.isdigit() and 14 <= len(value) <= 16):
            raise InvalidIdentifier("IMEI must be 14-16 digits")
    elif kind is IdType.IDFA:
        if not _UUID.match(value):
            raise InvalidIdentifier("IDFA must be a UUID (8-4-4-4-12 hex)")
    elif kind is IdType.OAID:
        if not _OAID.match(value):
            raise InvalidIdentifier("OAID must be 8-64 hex characters or dashes")
    else:
        raise ValueError(f"{kind.name.lower()} is not a device id type")
    if not value.replace("-", "").strip("0"):
        raise InvalidIdentifier(f"all-zero {kind.name.lower()} (ad tracking disabled on the device)")
    return value


def normalise(id_type: IdType | int | str, raw: str) -> str:
    """Normalised form of ``raw`` for ``id_type``; ``InvalidIdentifier`` if it cannot be one."""
    if not isinstance(raw, str):
        raise InvalidIdentifier(f"identifier must be text, not {type(raw).__name__}")
    kind = id_type_of(id_type)
    if kind is IdType.PHONE:
        return normalise_phone(raw)
    if kind is IdType.EMAIL:
        return normalise_email(raw)
    return normalise_device_id(kind, raw)


def hash_normalised(value: str) -> tuple[str, str]:
    """``(sha256_hex, md5_hex)`` of an already normalised value (UTF-8): edge side only."""
    data = value.encode("utf-8")
    return hashlib.sha256(data).hexdigest(), hashlib.md5(data, usedforsecurity=False).hexdigest()


def hash_identifier(id_type: IdType | int | str, raw: str) -> tuple[str, str]:
    """Normalise ``raw`` then hash it: ``(sha256_hex, md5_hex)``, lower-case hex; edge side only."""
    return hash_normalised(normalise(id_type, raw))


def key_digest(pepper: Pepper, digest: bytes) -> str:
    """``HMAC-SHA-256(pepper, digest)`` as 64 lower-case hex chars; ``digest`` is the raw 32 (SHA-256)
    or 16 (MD5) bytes."""
    if len(digest) not in (16, 32):
        raise ValueError(f"expected a raw 16-byte MD5 or 32-byte SHA-256 digest, got {len(digest)} bytes")
    return hmac.digest(pepper.key, digest, "sha256").hex()


def key_normalised(pepper: Pepper, value: str) -> tuple[str, str]:
    """``(key_sha256, key_md5)`` of an already normalised value: the identity map's two columns."""
    data = value.encode("utf-8")
    key = pepper.key
    return (
        hmac.digest(key, hashlib.sha256(data).digest(), "sha256").hex(),
        hmac.digest(key, hashlib.md5(data, usedforsecurity=False).digest(), "sha256").hex(),
    )


def key_identifier(pepper: Pepper, id_type: IdType | int | str, raw: str) -> tuple[str, str]:
    """Normalise ``raw`` then key it: ``(key_sha256, key_md5)``."""
    return key_normalised(pepper, normalise(id_type, raw))


def key_hex_digests(pepper: Pepper, digests: Iterable[str]) -> list[str]:
    """Keyed form of hex digests (either case; 32 or 64 hex chars each), in order.

    ``ValueError`` on anything else: callers validate rows first (``services.audience.uploads``).
    """
    key = pepper.key
    out: list[str] = []
    append = out.append
    for text in digests:
        raw = bytes.fromhex(text)
        if len(raw) not in (16, 32):
            raise ValueError(f"expected a 32- or 64-hex-char digest, got {len(text)} chars")
        append(hmac.digest(key, raw, "sha256").hex())
    return out


def looks_like_raw_phone(value: str) -> bool:
    """True when ``value`` looks like a phone number in clear (e.g. in a column declared "hashed").

    Digits with the usual separators and optional ``+``, 7..15 digits in total. Hex digests (32 or
    64 characters) never match, nor do short codes.
    """
    if not isinstance(value, str):
        return False
    text = value.strip()
    if not text or not _PHONE_CHARS.match(text) or text.count("+") > 1:
        return False
    return 7 <= len(_NON_DIGIT.sub("", text)) <= 15


def is_hex_digest(value: str, algo: str = "sha256") -> bool:
    """True when ``value`` (trimmed; either case) is a hex digest of ``algo`` ("sha256" or "md5")."""
    try:
        length = _DIGEST_LENGTHS[algo.lower()]
    except KeyError:
        raise ValueError(f"unknown digest algorithm {algo!r}; expected 'sha256' or 'md5'") from None
    if not isinstance(value, str):
        return False
    text = value.strip()
    return len(text) == length and bool(_HEX.match(text))
