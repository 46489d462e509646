from __future__ import annotations

import hashlib
import hmac

import pytest

from services.events.identity import (
    IdType,
    InvalidIdentifier,
    hash_identifier,
    id_type_of,
    is_hex_digest,
    key_digest,
    key_hex_digests,
    key_identifier,
    key_normalised,
    looks_like_raw_phone,
    normalise,
)
from services.events.pepper import Pepper


@pytest.mark.parametrize(
    "raw",
    [
        "+86 138-0013-8000",
        "13800138000",
        "138 0013 8000",
        "0086 138 0013 8000",
        "+8613800138000",
        "(+86) 138.0013.8000",
        " 8613800138000 ",
    ],
)
def test_phone_normalisation(raw: str) -> None:
    assert normalise(IdType.PHONE, raw) == "8613800138000"


def test_foreign_phone_keeps_country_code() -> None:
    assert normalise("phone", "+1 (415) 555-0100") == "14155550100"
    assert normalise(1, "+44 20 7946 0958") == "442079460958"


@pytest.mark.parametrize(
    "raw", ["", "abc", "12345", "010 1234 5678", "+86 138-0013-8000-1234567", "138x0013"]
)
def test_invalid_phones(raw: str) -> None:
    with pytest.raises(InvalidIdentifier):
        normalise(IdType.PHONE, raw)


def test_email_and_device_ids() -> None:
    assert normalise(IdType.EMAIL, "  Lily.Wang@QQ.com ") == "lily.wang@qq.com"
    assert (
        normalise(IdType.IDFA, " 6D92078A-8246-4BA4-AE5B-76104861E7DC")
        == "6d92078a-8246-4ba4-ae5b-76104861e7dc"
    )
    assert normalise(IdType.OAID, "ABCDEF01-2345") == "abcdef01-2345"
    assert normalise(IdType.IMEI, " 867530912345678 ") == "867530912345678"
    for kind, raw in [
        (IdType.EMAIL, "not-an-email"),
        (IdType.IDFA, "00000000-0000-0000-0000-000000000000"),
        (IdType.IDFA, "xyz"),
        (IdType.IMEI, "12ab"),
        (IdType.OAID, ""),
    ]:
        with pytest.raises(InvalidIdentifier):
            normalise(kind, raw)


def test_hash_identifier_hashes_the_normalised_value() -> None:
    sha, md5 = hash_identifier(IdType.PHONE, "+86 138-0013-8000")
    assert sha == hashlib.sha256(b"8613800138000").hexdigest()
    assert md5 == hashlib.md5(b"8613800138000").hexdigest()
    assert hash_identifier("email", "A@B.cn ") == hash_identifier(IdType.EMAIL, "a@b.cn")
    assert is_hex_digest(sha, "sha256") and is_hex_digest(md5, "md5")
    assert sha == sha.lower()


def test_digest_and_raw_phone_detection() -> None:
    assert is_hex_digest("A" * 64, "sha256") and not is_hex_digest("a" * 63, "sha256")
    assert not is_hex_digest("g" * 32, "md5") and is_hex_digest(" " + "0" * 32, "MD5")
    with pytest.raises(ValueError):
        is_hex_digest("00", "sha1")
    assert looks_like_raw_phone("13800138000") and looks_like_raw_phone("+86 138-0013-8000")
    assert not looks_like_raw_phone("a" * 64) and not looks_like_raw_phone("12345")
    assert not looks_like_raw_phone("0" * 32)  # an all-digit md5 is still too long to be a phone


def test_id_type_of() -> None:
    assert id_type_of("ID_TYPE_OAID") is IdType.OAID and id_type_of(5) is IdType.EMAIL
    with pytest.raises(ValueError, match="unknown identifier type"):
        id_type_of("passport")


# --- keyed hashes (the identity map's columns) ------------------------------------------------------

PEPPER = Pepper(bytes(range(32)))
OTHER = Pepper(bytes(range(1, 33)))


def test_keyed_hashes_are_hmac_sha256_over_the_raw_digests() -> None:
    normalised = b"8613800138000"
    key_sha256, key_md5 = key_identifier(PEPPER, IdType.PHONE, "+86 138-0013-8000")
    assert key_sha256 == hmac.new(PEPPER.key, hashlib.sha256(normalised).digest(), "sha256").hexdigest()
    assert key_md5 == hmac.new(PEPPER.key, hashlib.md5(normalised).digest(), "sha256").hexdigest()
    assert key_normalised(PEPPER, "8613800138000") == (key_sha256, key_md5)
    # The keyed form of an uploaded digest (either case) is the map's column: raw, SHA-256 and MD5
    # uploads of one person meet on the same row.
    sha, md5 = hash_identifier(IdType.PHONE, "13800138000")
    assert key_hex_digests(PEPPER, [sha, sha.upper(), md5]) == [key_sha256, key_sha256, key_md5]
    assert key_digest(PEPPER, bytes.fromhex(sha)) == key_sha256
    # Nothing plain survives, and another pepper gives other keys.
    assert sha not in (key_sha256, key_md5) and md5 not in (key_sha256, key_md5)
    assert set(key_identifier(OTHER, IdType.PHONE, "13800138000")).isdisjoint({key_sha256, key_md5})


def test_keyed_digests_refuse_other_lengths() -> None:
    with pytest.raises(ValueError):
        key_hex_digests(PEPPER, ["00" * 20])  # a SHA-1
    with pytest.raises(ValueError):
        key_digest(PEPPER, b"8613800138000")  # the value itself, not a digest
