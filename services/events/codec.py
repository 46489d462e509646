"""Event batches on the bus: proto events -> columns, per-shard batches, Arrow IPC payloads, message ids.

A bus message carries up to ``MAX_EVENTS_PER_MESSAGE`` events of one shard and one owner as an
Arrow IPC stream with exactly the columns of ``EVENTS_SCHEMA`` (validated, ``bucket`` filled in;
``owner`` dictionary-encoded on the wire, one byte per event, a string again once decoded). Its
message id is deterministic: ``<shard>-<sha256 of the owner and the event ids, in order>[:32]``, so
a client retry of the same request produces the same batches and the bus stores each one once
(within its de-duplication window), while another owner's events with the same ids are other
messages; consumers additionally de-duplicate by ``(owner, event_id)``.

Ingest builds them with ``batches_from_columns`` (numpy columns -> one Arrow record batch in shard
order -> zero-copy slices, each serialized once behind the cached schema message);
``split_batches`` does the same from a validated polars frame.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from services.events.bus import OutgoingBatch
from services.events.columns import EventColumns
from services.events.schema import EVENTS_SCHEMA, OWNER, PLATFORM_OWNER
from services.events.sharding import NUM_BUCKETS, Shard

__all__ = [
    "MAX_EVENTS_PER_MESSAGE",
    "PAYLOAD_FORMAT",
    "batch_message_id",
    "batches_from_columns",
    "decode_batch",
    "encode_batch",
    "events_from_proto",
    "shard_table",
    "split_batches",
]

MAX_EVENTS_PER_MESSAGE = 1000
PAYLOAD_FORMAT = "arrow-ipc/v1"

#: Proto field name of each frame column (validation reports frame names).
PROTO_FIELD = {"ts": "event_time"}


def shard_table(shard_count: int) -> np.ndarray:
    """bucket (0..255) -> shard index, for ``Shard(i, shard_count)`` bucket ranges."""
    table = np.empty(NUM_BUCKETS, dtype=np.int16)
    for shard in Shard.all(shard_count):
        lo, hi = shard.bucket_range()
        table[lo:hi] = shard.index
    return table


def events_from_proto(events: Sequence) -> pl.DataFrame:
    """Repeated ``flashcrowd.audience.v1.Event`` -> loosely typed frame for ``validate_events``.

    Unset ``event_time`` becomes null (reported as missing); ids keep proto3's 0 for "unset", which
    validation rejects for required ids and turns into null for optional ones.
    """
    n = len(events)
    event_id = np.empty(n, dtype=np.uint64)
    user_id = np.empty(n, dtype=np.uint64)
    ts = np.empty(n, dtype=np.int64)
    event_type = np.empty(n, dtype=np.int32)
    item_id = np.empty(n, dtype=np.uint32)
    category_id = np.empty(n, dtype=np.uint32)
    campaign_id = np.empty(n, dtype=np.uint32)
    video_id = np.empty(n, dtype=np.uint32)
    order_id = np.empty(n, dtype=np.uint64)
    amount = np.empty(n, dtype=np.int64)
    for i, e in enumerate(events):
        event_id[i] = e.event_id
        user_id[i] = e.user_id
        t = e.event_time
        ts[i] = t.seconds * 1_000_000 + t.nanos // 1000
        event_type[i] = e.event_type
        item_id[i] = e.item_id
        category_id[i] = e.category_id
        campaign_id[i] = e.campaign_id
        video_id[i] = e.video_id
        order_id[i] = e.order_id
        amount[i] = e.amount_fen
    ts_series = pl.Series("ts", ts)
    ts_series = ts_series.zip_with(ts_series != 0, pl.Series([None] * n, dtype=pl.Int64))
    return pl.DataFrame(
        [
            pl.Series("event_id", event_id),
            pl.Series("user_id", user_id),
            ts_series,
            pl.Series("event_type", event_type),
            pl.Series("item_id", item_id),
            pl.Series("category_id", category_id),
            pl.Series("campaign_id", campaign_id),
            pl.Series("video_id", video_id),
            pl.Series("order_id", order_id),
            pl.Series("amount_fen", amount),
        ]
    )


def batch_message_id(shard: int, event_ids: np.ndarray, owner: str = PLATFORM_OWNER) -> str:
    """``<shard>-<sha256(owner, NUL, event ids as little-endian u64)[:32]>``: per owner, so that one
    owner's ids never make another owner's batch a "duplicate" for the bus."""
    sha = hashlib.sha256(owner.encode("utf-8") + b"\x00")
    sha.update(np.ascontiguousarray(event_ids, dtype="<u8").tobytes())
    return f"{shard}-{sha.hexdigest()[:32]}"


def encode_batch(frame: pl.DataFrame) -> bytes:
    sink = io.BytesIO()
    frame.write_ipc_stream(sink, compression="uncompressed")
    return sink.getvalue()


#: The Arrow schema of a bus message: what polars writes for EVENTS_SCHEMA, except ``owner``, which
#: is dictionary-encoded (int8 indices into a one-entry dictionary: a message has one owner).
_OWNER_TYPE = pa.dictionary(pa.int8(), pa.string())
_POLARS_SCHEMA = pl.DataFrame(schema=EVENTS_SCHEMA).to_arrow().schema
ARROW_SCHEMA = _POLARS_SCHEMA.set(
    _POLARS_SCHEMA.get_field_index(OWNER), pa.field(OWNER, _OWNER_TYPE, nullable=False)
)
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


_TYPES = [field.type for field in ARROW_SCHEMA if field.name != OWNER]


@functools.lru_cache(maxsize=4096)
def _schema_message(owner: str) -> bytes:
    """The IPC stream's head for messages of ``owner``: the schema message, then the dictionary batch
    holding ``[owner]`` (index 0 of every row's owner). Cut from a stream pyarrow writes around an
    empty record batch, so the framing is pyarrow's own."""
    empty = pa.RecordBatch.from_arrays(
        [pa.array([], type=kind) for kind in _TYPES]
        + [pa.DictionaryArray.from_arrays(pa.array([], pa.int8()), pa.array([owner]))],
        schema=ARROW_SCHEMA,
    )
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, ARROW_SCHEMA) as writer:
        writer.write_batch(empty)
    stream = sink.getvalue()
    tail = len(empty.serialize()) + len(_END_OF_STREAM)
    if not stream.endswith(empty.serialize().to_pybytes() + _END_OF_STREAM):
        raise RuntimeError("unexpected Arrow IPC stream framing")  # pragma: no cover
    return stream[:-tail]


def _array(kind: pa.DataType, values: np.ndarray, absent: np.ndarray | None = None) -> pa.Array:
    """An Arrow array over the numpy buffer (no copy); ``absent`` rows null (ids where 0 = n/a)."""
    data = pa.py_buffer(values)
    if absent is None or not absent.any():
        return pa.Array.from_buffers(kind, values.size, [None, data], null_count=0)
    present = np.packbits(~absent, bitorder="little")
    return pa.Array.from_buffers(
        kind, values.size, [pa.py_buffer(present), data], null_count=int(absent.sum())
    )


def batches_from_columns(
    valid: EventColumns,
    bucket: np.ndarray,
    shards: np.ndarray,
    *,
    max_events: int = MAX_EVENTS_PER_MESSAGE,
) -> list[OutgoingBatch]:
    """Validated columns (``bucket`` per row) -> messages of at most ``max_events`` events of one shard.

    The same split as ``split_batches`` (request order kept inside a shard, a pure function of the
    events and their owner), encoded once: one record batch in shard order, sliced per message; the
    owner column is a constant (``valid.owner``), built once per request.
    """
    n = len(valid)
    if n == 0:
        return []
    owner = valid.owner
    shard_of_row = shards[bucket]
    order = np.argsort(shard_of_row, kind="stable")
    ids = valid.event_id[order]
    columns = [
        (ids, None),
        (valid.user_id[order].astype(np.uint32), None),
        (bucket[order], None),
        (valid.ts[order], None),
        (valid.event_type[order].astype(np.uint8), None),
    ]
    for name in ("item_id", "category_id", "campaign_id", "video_id", "order_id"):
        values = getattr(valid, name)[order]
        columns.append((values, values == 0))
    columns.append((valid.amount_fen[order], None))
    arrays = [_array(kind, values, absent) for kind, (values, absent) in zip(_TYPES, columns, strict=True)]
    owners = pa.DictionaryArray.from_buffers(
        _OWNER_TYPE, n, [None, pa.py_buffer(np.zeros(n, np.int8))], dictionary=pa.array([owner])
    )
    batch = pa.RecordBatch.from_arrays([*arrays, owners], schema=ARROW_SCHEMA)
    schema_message = _schema_message(owner)
    sizes = np.bincount(shard_of_row, minlength=int(shards.max()) + 1).tolist()
    out: list[OutgoingBatch] = []
    start = 0
    for shard, size in enumerate(sizes):
        end = start + size
        for lo in range(start, end, max_events):
            hi = min(lo + max_events, end)
            body = batch.slice(lo, hi - lo).serialize()
            out.append(
                OutgoingBatch(
                    shard=shard,
                    payload=b"".join((schema_message, body, _END_OF_STREAM)),
                    msg_id=batch_message_id(shard, ids[lo:hi], owner),
                    count=hi - lo,
                    format=PAYLOAD_FORMAT,
                )
            )
        start = end
    return out


def decode_batch(payload: bytes) -> pl.DataFrame:
    """A bus message -> a frame of exactly ``EVENTS_SCHEMA`` (``owner`` a string).

    Messages published before events had owners carry no ``owner`` column: they were the platform's
    stream, so they decode as ``PLATFORM_OWNER``.
    """
    frame = pl.read_ipc_stream(io.BytesIO(payload))
    if frame.schema != EVENTS_SCHEMA:
        if OWNER not in frame.columns:
            frame = frame.with_columns(pl.lit(PLATFORM_OWNER, dtype=pl.Utf8).alias(OWNER))
        frame = frame.select(list(EVENTS_SCHEMA)).cast(EVENTS_SCHEMA)
    return frame


def split_batches(
    valid: pl.DataFrame, shards: np.ndarray, *, max_events: int = MAX_EVENTS_PER_MESSAGE
) -> list[OutgoingBatch]:
    """Valid events (with ``bucket``) -> messages of at most ``max_events`` events of one shard.

    Events keep their request order inside a shard; the split is a pure function of the events, so
    the same request always yields the same messages and message ids. The frame's events must have
    one owner (like a request's): ``ValueError`` otherwise.
    """
    if valid.height == 0:
        return []
    owners = valid.get_column(OWNER).unique()
    if owners.len() != 1 or owners[0] is None:
        raise ValueError(f"events of one owner expected, got owners {sorted(map(str, owners.to_list()))}")
    owner = str(owners[0])
    shard_of_row = shards[valid.get_column("bucket").to_numpy()]
    order = np.argsort(shard_of_row, kind="stable")
    sorted_shards = shard_of_row[order]
    cuts = np.flatnonzero(np.diff(sorted_shards)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [len(order)]))
    ids = valid.get_column("event_id").to_numpy()
    out: list[OutgoingBatch] = []
    for start, end in zip(starts, ends, strict=True):
        shard = int(sorted_shards[start])
        for lo in range(start, end, max_events):
            rows = order[lo : min(lo + max_events, end)]
            part = valid[rows] if len(rows) != valid.height else valid
            out.append(
                OutgoingBatch(
                    shard=shard,
                    payload=encode_batch(part),
                    msg_id=batch_message_id(shard, ids[rows], owner),
                    count=len(rows),
                    format=PAYLOAD_FORMAT,
                )
            )
    return out
