"""Event, profile, identity and truth schemas: polars dtypes as constants, codes as IntEnums.

Conventions (see the design notes, ../shared/docs/ARCHITECTURE.md, "Data conventions"):

* Times are UTC microseconds (``Datetime("us", "UTC")``); windows are half-open ``[start, end)``.
* Money is integer fen (``Int64``), never floats; currency is CNY for the whole data set.
* Codes are small unsigned integers so that Parquet dictionary/RLE encoding keeps files compact.
  0 always means "unspecified/unknown" and is never stored for ``event_type``.
* Ids that do not apply to an event (``item_id`` of a ``live_enter``...) are null, never 0.
* Every event has an **owner** (``owner`` column): ``PLATFORM_OWNER`` (``"_platform"``) for the
  platform's first-party behaviour stream (generated worlds, imported public data, events ingested
  by platform principals holding ``events.platform``), else the id of the tenant whose conversion
  events they are, stamped by ingest from the verified caller and never read from the events. An
  event is identified by ``(owner, event_id)``: two owners may use the same ``event_id``. Data
  written before owners existed has no ``owner`` column and reads as ``PLATFORM_OWNER``.

``EventType`` codes match the proto enum ``flashcrowd.audience.v1.EventType`` (0 = UNSPECIFIED).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from enum import IntEnum

import polars as pl

__all__ = [
    "AGE_BAND_NAMES",
    "EVENTS_SCHEMA",
    "EVENT_SORT_KEY",
    "EVENT_TYPE_NAMES",
    "GENDER_NAMES",
    "IDENTITY_SCHEMA",
    "ID_TYPE_NAMES",
    "INTEREST_TAGS",
    "OWNER",
    "PLATFORM_OWNER",
    "PROFILES_SCHEMA",
    "REGIONS",
    "SEGMENTS_SCHEMA",
    "AgeBand",
    "EventType",
    "Gender",
    "IdType",
    "Reject",
    "empty_events",
    "event_type_code",
    "event_type_name",
    "parse_event_types",
    "validate_events",
    "visible_owners",
]


class EventType(IntEnum):
    """Behaviour event kinds; values are the stored codes and the proto enum numbers."""

    VIDEO_PLAY = 1
    VIDEO_FINISH = 2
    LIVE_ENTER = 3
    PRODUCT_VIEW = 4
    CLICK = 5
    ADD_CART = 6
    ORDER = 7
    PAY = 8
    REFUND = 9
    FOLLOW = 10
    COUPON_CLAIM = 11
    COUPON_REDEEM = 12

    @property
    def label(self) -> str:
        """The lower-case name used in specs, CLIs and world.json (``"add_cart"``)."""
        return self.name.lower()


#: code -> lower-case name, e.g. ``{1: "video_play", ...}``.
EVENT_TYPE_NAMES: dict[int, str] = {t.value: t.label for t in EventType}
_EVENT_TYPE_BY_NAME: dict[str, EventType] = {t.label: t for t in EventType}


def event_type_code(name_or_code: str | int) -> int:
    """``"add_cart"`` / ``"ADD_CART"`` / ``"EVENT_TYPE_ADD_CART"`` / ``6`` -> 6. ``ValueError`` if unknown."""
    if isinstance(name_or_code, int) and not isinstance(name_or_code, bool):
        if name_or_code in EVENT_TYPE_NAMES:
            return int(name_or_code)
        raise ValueError(f"unknown event type code {name_or_code}; known codes are 1..{len(EventType)}")
    if isinstance(name_or_code, str):
        key = name_or_code.strip().lower().removeprefix("event_type_")
        found = _EVENT_TYPE_BY_NAME.get(key)
        if found is not None:
            return found.value
    raise ValueError(f"unknown event type {name_or_code!r}; known: {', '.join(_EVENT_TYPE_BY_NAME)}")


def event_type_name(code: int) -> str:
    """6 -> ``"add_cart"``. ``ValueError`` if unknown (including 0, which is never stored)."""
    try:
        return EVENT_TYPE_NAMES[int(code)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unknown event type code {code!r}; known codes are 1..{len(EventType)}") from None


def parse_event_types(values: Iterable[str | int]) -> list[int]:
    """Names or codes -> sorted unique codes (``["click", 5, "order"]`` -> ``[5, 7]``)."""
    return sorted({event_type_code(v) for v in values})


class AgeBand(IntEnum):
    UNKNOWN = 0
    UNDER_18 = 1
    AGE_18_24 = 2
    AGE_25_30 = 3
    AGE_31_35 = 4
    AGE_36_40 = 5
    AGE_41_50 = 6
    OVER_50 = 7


AGE_BAND_NAMES: dict[int, str] = {
    0: "unknown",
    1: "under_18",
    2: "18_24",
    3: "25_30",
    4: "31_35",
    5: "36_40",
    6: "41_50",
    7: "over_50",
}


class Gender(IntEnum):
    UNKNOWN = 0
    FEMALE = 1
    MALE = 2


GENDER_NAMES: dict[int, str] = {0: "unknown", 1: "female", 2: "male"}


class IdType(IntEnum):
    """External identifier kinds in the identity map and in uploads."""

    PHONE = 1
    OAID = 2
    IMEI = 3
    IDFA = 4
    EMAIL = 5


ID_TYPE_NAMES: dict[int, str] = {t.value: t.name.lower() for t in IdType}

#: Closed interest-tag set of profiles (and of ``interests`` filters in pack specs).
INTEREST_TAGS: tuple[str, ...] = (
    "apparel",
    "deals",
    "beauty",
    "electronics",
    "food",
    "home",
    "sports",
    "mother_baby",
    "books",
    "travel",
)

#: ISO 3166-2:CN codes of the 31 mainland provincial-level divisions used in profiles.
# fmt: off
REGIONS: tuple[str, ...] = (
    "CN-AH", "CN-BJ", "CN-CQ", "CN-FJ", "CN-GD", "CN-GS", "CN-GX", "CN-GZ", "CN-HA", "CN-HB", "CN-HE",
    "CN-HI", "CN-HL", "CN-HN", "CN-JL", "CN-JS", "CN-JX", "CN-LN", "CN-NM", "CN-NX", "CN-QH", "CN-SC",
    "CN-SD", "CN-SH", "CN-SN", "CN-SX", "CN-TJ", "CN-XJ", "CN-XZ", "CN-YN", "CN-ZJ",
)
# fmt: on

UTC_US = pl.Datetime("us", "UTC")

#: Owner of the platform's first-party behaviour events. Not a valid tenant id (tenant ids start
#: with a letter: ``services.runtime.tenant_ids``), so it can never be confused with a tenant.
PLATFORM_OWNER = "_platform"
#: Name of the owner column (events dataset, bus messages, decoded frames).
OWNER = "owner"


def visible_owners(tenant: str | None) -> tuple[str, ...]:
    """Owners whose events a tenant's pack builds read: the platform's, plus the tenant's own.

    ``None`` (no tenant: platform-wide analyses) -> the platform's events only.
    """
    return (PLATFORM_OWNER,) if not tenant else (PLATFORM_OWNER, tenant)


#: Behaviour events. Sorted within each Parquet file by ``EVENT_SORT_KEY``.
EVENTS_SCHEMA = pl.Schema(
    {
        "event_id": pl.UInt64(),  # unique; generator ids are < 2**56 (top byte 0), see generator
        "user_id": pl.UInt32(),
        "bucket": pl.UInt8(),  # services.events.sharding.bucket_of(user_id)
        "ts": UTC_US,
        "event_type": pl.UInt8(),  # EventType code
        "item_id": pl.UInt32(),  # null when n/a
        "category_id": pl.UInt32(),  # null when n/a
        "campaign_id": pl.UInt32(),  # null when n/a
        "video_id": pl.UInt32(),  # null when n/a
        "order_id": pl.UInt64(),  # order/pay/refund/coupon_redeem link; null otherwise
        # order/pay/refund: amount (a refund's is the positive amount refunded); coupon_redeem: the discount
        "amount_fen": pl.Int64(),
        # PLATFORM_OWNER or a tenant id (see the module doc); one value per file run, dictionary-encoded
        "owner": pl.Utf8(),
    }
)
EVENT_SORT_KEY: tuple[str, ...] = ("bucket", "user_id", "ts")

PROFILES_SCHEMA = pl.Schema(
    {
        "user_id": pl.UInt32(),
        "age_band": pl.UInt8(),  # AgeBand
        "gender": pl.UInt8(),  # Gender
        "region": pl.Utf8(),  # one of REGIONS
        "interests": pl.List(pl.Utf8),  # subset of INTEREST_TAGS
        "signup_date": pl.Date(),
    }
)

IDENTITY_SCHEMA = pl.Schema(
    {
        "user_id": pl.UInt32,
        "id_type": pl.UInt8,  # IdType
        # Keyed hashes only (services.events.identity): 64 lower-case hex chars of
        # HMAC-SHA-256(pepper, SHA-256(normalised)) and HMAC-SHA-256(pepper, MD5(normalised)),
        # each HMAC over the raw digest bytes. No plain digest of an identifier is ever stored.
        "key_sha256": pl.Utf8,
        "key_md5": pl.Utf8,
        "pepper_id": pl.Utf8,  # services.events.pepper.Pepper.id of the pepper that keyed the row
    }
)

#: Hidden ground truth for evaluation only (never read by the services themselves).
SEGMENTS_SCHEMA = pl.Schema(
    {
        "user_id": pl.UInt32,
        "segment": pl.UInt8,  # world.json "segments"[].code
        "is_bot": pl.Boolean,
        "n_events": pl.UInt32,  # events this user has in the whole data set
    }
)


def empty_events() -> pl.DataFrame:
    return pl.DataFrame(schema=EVENTS_SCHEMA)


# ---------------------------------------------------------------------------------------------------
# Validation (for ingest): one bad row never fails the batch.

Reject = tuple[int, str, str]  # (row_index, field, reason)

_REQUIRED = ("event_id", "user_id", "ts", "event_type")
_ID_FIELDS = ("item_id", "category_id", "campaign_id", "video_id", "order_id")
_MONEY_TYPES = (EventType.ORDER.value, EventType.PAY.value, EventType.REFUND.value)


def _as_utc_datetime(series: pl.Series) -> pl.Series:
    dtype = series.dtype
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:  # naive datetimes are taken as UTC
            return series.dt.cast_time_unit("us").dt.replace_time_zone("UTC")
        return series.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if dtype.is_integer():  # epoch microseconds
        return series.cast(pl.Int64, strict=False).cast(UTC_US)
    if dtype == pl.Utf8:
        return series.str.to_datetime(time_unit="us", time_zone="UTC", strict=False)
    return pl.Series(series.name, [None] * len(series), dtype=UTC_US)


def _event_type_codes(series: pl.Series) -> pl.Series:
    if series.dtype == pl.Utf8:
        mapping = {name: code for code, name in EVENT_TYPE_NAMES.items()}
        mapping.update({f"event_type_{n}": c for n, c in list(mapping.items())})
        return (
            series.str.strip_chars()
            .str.to_lowercase()
            .replace_strict(mapping, default=None, return_dtype=pl.Int64)
        )
    return series.cast(pl.Int64, strict=False)


def validate_events(
    df: pl.DataFrame,
    *,
    now: datetime | None = None,
    max_future_skew: timedelta = timedelta(minutes=5),
    retention: timedelta | None = timedelta(days=400),
    not_before: datetime | None = None,
    owner: str = PLATFORM_OWNER,
) -> tuple[pl.DataFrame, list[Reject]]:
    """Split ``df`` into rows that conform to ``EVENTS_SCHEMA`` and rejects ``(row_index, field, reason)``.

    Accepts loosely typed input (e.g. Int64 ids, event types by name, ts as epoch microseconds,
    ISO strings or naive datetimes taken as UTC). A row is rejected when: a required field
    (event_id, user_id, ts, event_type) is missing or not representable; an id does not fit its
    unsigned type; the event type is unknown; an amount is negative, or missing on an
    order/pay/refund; ``ts`` is later than ``now + max_future_skew`` or earlier than the retention
    bound (``not_before`` if given, else ``now - retention``; ``retention=None`` disables it). A row
    can have several rejects, one per field. ``bucket`` is always recomputed from ``user_id``, and
    ``owner`` is always ``owner`` (an ``owner`` column of ``df`` is ignored: the caller's identity
    decides it, never the data).
    Row indexes are 0-based positions in ``df``. The valid frame keeps input order.
    """
    from services.events.sharding import bucket_expr  # local: sharding imports nothing from here

    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    lower = not_before if not_before is not None else (now - retention if retention is not None else None)
    if lower is not None and lower.tzinfo is None:
        lower = lower.replace(tzinfo=UTC)
    upper = now + max_future_skew

    n = df.height
    rejects: list[Reject] = []
    bad = pl.Series("bad", [False] * n, dtype=pl.Boolean)
    columns: dict[str, pl.Series] = {}

    def flag(mask: pl.Series, field: str, reason: str) -> None:
        nonlocal bad
        mask = mask.fill_null(False)
        if mask.any():
            rejects.extend((int(i), field, reason) for i in mask.arg_true().to_list())
            bad = bad | mask

    for name, dtype in EVENTS_SCHEMA.items():
        if name in ("bucket", OWNER):
            continue
        if name not in df.columns:
            if name in _REQUIRED:
                flag(pl.Series([True] * n), name, "missing column")
            columns[name] = pl.Series(name, [None] * n, dtype=dtype)
            continue
        raw = df.get_column(name)
        if name == "ts":
            value = _as_utc_datetime(raw)
            flag(value.is_null() & raw.is_not_null(), name, "not a timestamp")
        elif name == "event_type":
            codes = _event_type_codes(raw)
            flag(
                raw.is_not_null() & ~codes.is_in(list(EVENT_TYPE_NAMES)).fill_null(False),
                name,
                "unknown event type",
            )
            value = codes.cast(dtype, strict=False)
        else:
            wide = raw.cast(pl.Int64, strict=False) if raw.dtype != pl.UInt64 else raw
            value = raw.cast(dtype, strict=False)
            if dtype == pl.Int64:
                flag(value.is_null() & raw.is_not_null(), name, "not an integer")
                flag(value < 0, name, "negative amount")
            else:
                flag(value.is_null() & raw.is_not_null(), name, f"not a {dtype} (negative or too large)")
                if name in _REQUIRED:  # proto3 sends an unset id as 0
                    flag(wide == 0, name, "missing (0)")
                else:  # optional ids: 0 means "not applicable", stored as null
                    value = value.zip_with((wide != 0).fill_null(True), pl.Series([None] * n, dtype=dtype))
        if name in _REQUIRED:
            flag(raw.is_null(), name, "missing")
        columns[name] = value.alias(name)

    ts = columns["ts"]
    flag(ts > upper, "ts", f"in the future (later than now + {max_future_skew})")
    if lower is not None:
        flag(ts < lower, "ts", f"older than the retention bound {lower.isoformat()}")
    is_money = columns["event_type"].is_in(list(_MONEY_TYPES))
    flag(is_money & columns["amount_fen"].is_null(), "amount_fen", "missing on order/pay/refund")

    table = pl.DataFrame(columns)
    valid = (
        table.filter(~bad)
        .with_columns(bucket_expr("user_id").alias("bucket"), pl.lit(owner, dtype=pl.Utf8).alias(OWNER))
        .select(list(EVENTS_SCHEMA))
        .cast(EVENTS_SCHEMA)
    )
    rejects.sort()
    return valid, rejects
