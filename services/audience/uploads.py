"""UploadPack: hashed identifiers in, a pack of matched users out; and hashing at the edge.

Server side (``read_upload`` -> ``check_rows`` -> ``match_rows``):

* The stream's first message is the header (``parent``, ``pack_id``, ``id_type``, ``hash_type``);
  a missing, late or repeated header, or a header field out of range, is INVALID_ARGUMENT naming the
  field, before any row is looked at.
* More than ``max_rows`` rows refuses the whole upload (INVALID_ARGUMENT, reason
  ``UPLOAD_TOO_LARGE``) and nothing is written.
* Each row is checked on its own (vectorised with polars): wrong length or non-hex rows, and rows
  that look like raw PII (a phone number, an e-mail, a device id in clear) are invalid, reported by
  zero-based index and reason, and never written anywhere. One bad row never fails the upload.
* Valid rows are lower-cased and de-duplicated (counted), then keyed at once with the platform
  pepper (``key_upload``: HMAC-SHA-256 over the raw digest bytes, ``services.events.identity``) and
  semi-joined with the identity map's ``key_sha256`` (SHA-256 uploads) or ``key_md5`` (MD5 uploads)
  column for the declared ``id_type``; the matched users form the pack. The uploaded digests
  themselves are never written, logged or returned: the response reports counts and invalid rows
  by index and reason (the reasons never quote the row).
* ``check_identity_pepper`` refuses (FAILED_PRECONDITION, ``IDENTITY_PEPPER_MISMATCH``) to match
  against an identity map keyed under another pepper (rows carry ``pepper_id``): a wrong or
  rotated ``FLASHCROWD_IDENTITY_PEPPER`` fails loudly instead of answering a 0% match rate.

Edge side (``hash_at_edge``): the CLI normalises raw identifiers and hashes them (SHA-256) before
anything leaves the machine, so that raw values are never sent; the service keys those digests
like any SHA-256 upload (the edge does not hold the pepper).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from flashcrowd.audience.v1 import audience_service_pb2, pack_pb2
from pyroaring import BitMap

from services.audience.tenancy import check_id, parse_parent
from services.events.identity import InvalidIdentifier, hash_identifier, key_hex_digests
from services.events.pepper import Pepper
from services.runtime import FailedPrecondition, InvalidArgument

#: Invalid rows returned in the response (all are counted).
MAX_REPORTED_INVALID = 1000
RAW_PII_REASON = "raw PII: hash before upload (SHA-256 of the normalised value)"

#: hash type -> (identity-map column of its keyed form, hex length, label)
_HASH_NAMES = {
    audience_service_pb2.HASH_TYPE_SHA256: ("key_sha256", 64, "SHA-256"),
    audience_service_pb2.HASH_TYPE_MD5: ("key_md5", 32, "MD5"),
}
#: Platform user ids (rows in ``chunk.user_ids``, not hashed): platform principals only.
USER_ID_TYPE = audience_service_pb2.ID_TYPE_USER_ID
MAX_USER_ID = 2**32 - 1  # user ids are uint32 inside a shard (Roaring)
_ID_TYPES = {
    audience_service_pb2.ID_TYPE_PHONE,
    audience_service_pb2.ID_TYPE_OAID,
    audience_service_pb2.ID_TYPE_IMEI,
    audience_service_pb2.ID_TYPE_IDFA,
    audience_service_pb2.ID_TYPE_EMAIL,
}


@dataclass(frozen=True)
class UploadHeader:
    """A validated upload header."""

    tenant: str
    pack_id: str
    id_type: int  # IdType number == services.events.schema.IdType code
    key_column: str  # identity-map column the keyed rows join: "key_sha256" or "key_md5"
    hash_length: int
    hash_label: str
    header: audience_service_pb2.UploadPackHeader

    @property
    def user_ids(self) -> bool:
        """Rows are platform user ids (``chunk.user_ids``), not digests."""
        return self.id_type == USER_ID_TYPE


def parse_header(header: audience_service_pb2.UploadPackHeader) -> UploadHeader:
    """Validate the header; INVALID_ARGUMENT listing every bad field (``header.<field>``)."""
    problems: list[tuple[str, str]] = []
    tenant = pack_id = ""
    try:
        tenant = parse_parent(header.parent, "header.parent")
    except InvalidArgument as error:
        problems.extend(error.violations)
    try:
        pack_id = check_id(header.pack_id, "header.pack_id", "pack id")
    except InvalidArgument as error:
        problems.extend(error.violations)
    user_ids = header.id_type == USER_ID_TYPE
    if header.id_type not in _ID_TYPES and not user_ids:
        problems.append(("header.id_type", "required: one of PHONE, OAID, IMEI, IDFA, EMAIL, USER_ID"))
    if user_ids and header.hash_type:
        problems.append(("header.hash_type", "not used with ID_TYPE_USER_ID (user ids are not hashed)"))
    elif not user_ids and header.hash_type not in _HASH_NAMES:
        problems.append(("header.hash_type", "required: SHA256 or MD5"))
    if header.HasField("ttl") and (header.ttl.seconds < 0 or header.ttl.nanos < 0):
        problems.append(("header.ttl", "must not be negative"))
    for key in header.labels:
        if not key or len(key) > 63:
            problems.append((f"header.labels[{key[:40]!r}]", "label keys are 1-63 characters"))
    if problems:
        raise InvalidArgument(problems, reason="INVALID_UPLOAD_HEADER")
    if user_ids:
        return UploadHeader(tenant, pack_id, int(header.id_type), "", 0, "user id", header)
    column, length, label = _HASH_NAMES[header.hash_type]
    return UploadHeader(tenant, pack_id, int(header.id_type), column, length, label, header)


@dataclass
class Upload:
    header: UploadHeader
    rows: pl.Series  # Utf8, in upload order


async def read_upload(
    requests: AsyncIterator[audience_service_pb2.UploadPackRequest],
    *,
    max_rows: int,
    on_header: object = None,
) -> Upload:
    """Consume the client stream: header first, then chunks; enforce ``max_rows``.

    ``on_header`` (an async callable taking the ``UploadHeader``) runs before any chunk is read, so
    that e.g. ALREADY_EXISTS fails the call before the client streams millions of rows.
    """
    header: UploadHeader | None = None
    chunks: list[pl.Series] = []
    received = 0
    index = 0
    async for message in requests:
        kind = message.WhichOneof("payload")
        if kind == "header":
            if index != 0:
                raise InvalidArgument(
                    "header",
                    f"only the first message may carry the header (message {index} repeats it)",
                    reason="UPLOAD_HEADER_REPEATED",
                )
            header = parse_header(message.header)
            if on_header is not None:
                await on_header(header)  # type: ignore[operator]
        elif kind == "chunk":
            if header is None:
                raise InvalidArgument(
                    "header", "the first message must carry the header", reason="UPLOAD_HEADER_MISSING"
                )
            wanted, other = ("user_ids", "hashed_ids") if header.user_ids else ("hashed_ids", "user_ids")
            if getattr(message.chunk, other):
                raise InvalidArgument(
                    f"chunk.{other}",
                    f"message {index}: this upload's id_type carries its rows in chunk.{wanted}",
                    reason="UPLOAD_WRONG_ROWS",
                )
            received += len(message.chunk.hashed_ids) + len(message.chunk.user_ids)
            if received > max_rows:
                raise InvalidArgument(
                    f"chunk.{wanted}",
                    f"upload too large: more than {max_rows} rows; split it into several packs",
                    reason="UPLOAD_TOO_LARGE",
                    metadata={"maxRows": max_rows},
                )
            if message.chunk.hashed_ids:
                chunks.append(pl.Series("id", list(message.chunk.hashed_ids), dtype=pl.Utf8))
            if message.chunk.user_ids:
                chunks.append(pl.Series("id", list(message.chunk.user_ids), dtype=pl.UInt64))
        else:
            raise InvalidArgument(
                "payload", f"message {index} has neither header nor chunk", reason="UPLOAD_EMPTY_MESSAGE"
            )
        index += 1
    if header is None:
        raise InvalidArgument(
            "header", "the first message must carry the header", reason="UPLOAD_HEADER_MISSING"
        )
    if received == 0:
        raise InvalidArgument("chunk.hashed_ids", "no identifiers uploaded", reason="UPLOAD_EMPTY")
    rows = pl.concat(chunks) if len(chunks) > 1 else chunks[0]
    return Upload(header, rows)


@dataclass
class RowCheck:
    """Outcome of the per-row checks."""

    hashes: pl.Series  # distinct valid digests, lower-case
    received: int
    valid: int
    invalid: int
    duplicates: int
    invalid_rows: list[tuple[int, str]] = field(default_factory=list)  # the first MAX_REPORTED_INVALID


def check_rows(rows: pl.Series, *, hash_length: int, hash_label: str) -> RowCheck:
    """Classify every row (vectorised): valid digests, and invalid rows with index and reason."""
    other_label, other_length = ("MD5", 32) if hash_length == 64 else ("SHA-256", 64)
    frame = (
        pl.DataFrame({"raw": rows})
        .with_row_index("index")
        .with_columns(pl.col("raw").fill_null("").str.strip_chars().alias("text"))
    )
    text = pl.col("text")
    length = text.str.len_chars()
    is_hex = text.str.contains(r"^[0-9a-fA-F]+$")
    digits = text.str.count_matches(r"\d")
    looks_phone = text.str.contains(r"^\+?[\d\s().\-]+$") & digits.is_between(7, 15)
    looks_email = text.str.contains(r"^[^@\s]+@[^@\s]+$")
    looks_device = text.str.contains(r"^[0-9a-fA-F]+(-[0-9a-fA-F]+)+$")  # UUID-style OAID / IDFA
    valid = is_hex & (length == hash_length)
    reason = (
        pl.when(valid)
        .then(pl.lit(None, dtype=pl.Utf8))
        .when(length == 0)
        .then(pl.lit("empty row"))
        .when(looks_phone | looks_email | looks_device)
        .then(pl.lit(RAW_PII_REASON))
        .when(is_hex & (length == other_length))
        .then(
            pl.lit(
                f"wrong length: {other_length} hex chars looks like {other_label}, header says {hash_label}"
            )
        )
        .when(is_hex)
        .then(
            pl.format(
                "wrong length: {} hex chars, expected {} for {}", length, hash_length, pl.lit(hash_label)
            )
        )
        .otherwise(pl.lit(f"not a hex {hash_label} digest"))
    )
    checked = frame.with_columns(reason.alias("reason"), valid.alias("valid"))
    good = checked.filter(pl.col("valid")).get_column("text").str.to_lowercase()
    bad = checked.filter(~pl.col("valid"))
    distinct = good.unique()
    return RowCheck(
        hashes=distinct,
        received=len(rows),
        valid=len(good),
        invalid=bad.height,
        duplicates=len(good) - len(distinct),
        invalid_rows=[
            (int(i), str(r)) for i, r in bad.head(MAX_REPORTED_INVALID).select("index", "reason").iter_rows()
        ],
    )


def check_user_ids(rows: pl.Series) -> RowCheck:
    """Platform user ids: ids above ``MAX_USER_ID`` are invalid (index and reason); the rest distinct."""
    frame = pl.DataFrame({"id": rows.cast(pl.UInt64)}).with_row_index("index")
    bad = frame.filter(pl.col("id") > MAX_USER_ID)
    good = frame.filter(pl.col("id") <= MAX_USER_ID).get_column("id").cast(pl.UInt32)
    distinct = good.unique()
    return RowCheck(
        hashes=distinct,
        received=len(rows),
        valid=len(good),
        invalid=bad.height,
        duplicates=len(good) - len(distinct),
        invalid_rows=[
            (int(i), f"not a platform user id (above {MAX_USER_ID})")
            for i in bad.head(MAX_REPORTED_INVALID).get_column("index")
        ],
    )


def match_user_ids(users: pl.LazyFrame, ids: pl.Series) -> tuple[BitMap, int]:
    """The uploaded ids that are users of the dataset (``users`` has a ``user_id`` column)."""
    wanted = pl.LazyFrame({"user_id": ids.cast(pl.UInt32)})
    found = (
        users.select(pl.col("user_id").cast(pl.UInt32))
        .join(wanted, on="user_id", how="semi")
        .unique()
        .collect()
        .get_column("user_id")
        .to_numpy()
    )
    bitmap = BitMap(np.asarray(found, dtype=np.uint32))
    return bitmap, len(bitmap)


def key_upload(pepper: Pepper, hashes: pl.Series) -> pl.Series:
    """The keyed form (64 hex chars each) of validated, distinct hex digests, in order."""
    return pl.Series("key", key_hex_digests(pepper, hashes.to_list()), dtype=pl.Utf8)


def check_identity_pepper(identity: pl.LazyFrame, pepper: Pepper) -> None:
    """FAILED_PRECONDITION unless every identity-map row was keyed under ``pepper`` (blocking).

    An empty map passes (nothing to match). A map written before keyed identities (no
    ``pepper_id`` column) fails the same way, asking for a re-generation.
    """
    try:
        found = identity.select(pl.col("pepper_id").unique()).collect().get_column("pepper_id").to_list()
    except (pl.exceptions.ColumnNotFoundError, pl.exceptions.SchemaError):
        found = [None]
    if None in found:
        description = (
            "the identity map predates keyed identities (plain digests, no pepper_id): regenerate or "
            "re-import it (`flashcrowd gen --overwrite`); plain digests are never matched"
        )
    else:
        others = sorted(str(p) for p in found if p != pepper.id)
        if not others:
            return
        description = (
            f"the identity map is keyed under pepper id(s) {', '.join(others)}, but this service's "
            f"pepper (FLASHCROWD_IDENTITY_PEPPER) has id {pepper.id}: set the pepper the data was "
            "written with, or re-key the identity map (services/events/README.md, rotation)"
        )
    raise FailedPrecondition(
        "IDENTITY_PEPPER_MISMATCH", description, [("IDENTITY_PEPPER_MISMATCH", "identity", description)]
    )


def match_rows(identity: pl.LazyFrame, id_type: int, key_column: str, keys: pl.Series) -> tuple[BitMap, int]:
    """Users whose identity-map ``key_column`` of ``id_type`` is in ``keys``; and how many keys matched.

    ``identity`` is the identity map (``IDENTITY_SCHEMA``); ``keys`` are keyed upload rows
    (``key_upload``), never plain digests.
    """
    wanted = pl.LazyFrame({key_column: keys})
    found = (
        identity.filter(pl.col("id_type") == id_type)
        .select("user_id", key_column)
        .join(wanted, on=key_column, how="semi")
        .collect()
    )
    user_ids = found.get_column("user_id").unique().to_numpy().astype(np.uint32)
    matched = found.get_column(key_column).n_unique() if found.height else 0
    return BitMap(user_ids), int(matched)


def upload_stats(check: RowCheck, matched: int) -> pack_pb2.UploadStats:
    distinct = len(check.hashes)
    return pack_pb2.UploadStats(
        received=check.received,
        valid=check.valid,
        invalid=check.invalid,
        duplicates=check.duplicates,
        matched=matched,
        match_rate=(matched / distinct) if distinct else 0.0,
    )


def invalid_row_messages(check: RowCheck) -> list[audience_service_pb2.InvalidRow]:
    return [audience_service_pb2.InvalidRow(index=i, reason=r) for i, r in check.invalid_rows]


# --- edge hashing (CLI) ---------------------------------------------------------------------------


@dataclass
class EdgeHashed:
    """Raw identifiers hashed on the client: digests in input order of the valid rows."""

    hashes: list[str]
    invalid_rows: list[tuple[int, str]]  # (input index, reason): never contains the raw value


def hash_at_edge(id_type: int | str, values: Iterable[str]) -> EdgeHashed:
    """Normalise each raw identifier for ``id_type`` and SHA-256 it; invalid ones are reported.

    Raw values stay in this process: only digests are returned for sending.
    """
    hashes: list[str] = []
    invalid: list[tuple[int, str]] = []
    for index, value in enumerate(values):
        try:
            sha256, _ = hash_identifier(id_type, value)
        except InvalidIdentifier as error:
            invalid.append((index, str(error)))
            continue
        hashes.append(sha256)
    return EdgeHashed(hashes, invalid)


def upload_requests(
    header: audience_service_pb2.UploadPackHeader, hashes: Sequence[str], *, chunk_rows: int = 50_000
) -> Iterable[audience_service_pb2.UploadPackRequest]:
    """The request stream of an upload: the header, then chunks of ``chunk_rows`` digests."""
    yield audience_service_pb2.UploadPackRequest(header=header)
    for start in range(0, len(hashes), chunk_rows):
        yield audience_service_pb2.UploadPackRequest(
            chunk=audience_service_pb2.UploadPackChunk(hashed_ids=hashes[start : start + chunk_rows])
        )


__all__ = [
    "MAX_REPORTED_INVALID",
    "RAW_PII_REASON",
    "EdgeHashed",
    "RowCheck",
    "Upload",
    "UploadHeader",
    "check_identity_pepper",
    "check_rows",
    "hash_at_edge",
    "invalid_row_messages",
    "key_upload",
    "match_rows",
    "parse_header",
    "read_upload",
    "upload_requests",
    "upload_stats",
]
