"""CheckMembership: pack bitmaps cached in memory, checked a whole batch at a time.

``MembershipCache`` keeps the most recently used pack bitmaps (LRU, keyed by tenant, pack and
version) and each pack's latest version as last read from the pack store. A pack's latest-version
pointer is re-read at most every ``refresh_ms`` milliseconds, so a refresh (new version) or a delete
is seen within that bound without a store round trip on the hot path; ``invalidate`` makes it
immediate inside this process (DeletePack, RefreshPack).

``check_batch`` is vectorised, never a Python loop per id. Two paths give the same answer:

* dense (the fast one): a cached pack whose largest id is below ``dense_max_ids`` also keeps a plain
  bitset (``np.packbits``, one bit per id up to its maximum: 1.25 MB for ids below 10M), and a batch
  is one numpy gather per pack. About 10x faster than the Roaring path for 1,000 ids.
* Roaring (any pack): the requested ids become one Roaring bitmap, intersected with each pack in C,
  and the sorted intersection is mapped back to request order with a numpy binary search.

Ids beyond uint32 are never members.
"""

from __future__ import annotations

import array
import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flashcrowd.audience.v1 import audience_service_pb2
from pyroaring import BitMap

UINT32_MAX = 0xFFFFFFFF


class PackSource(Protocol):
    """What the cache needs from the pack store."""

    def get(self, tenant: str, pack_id: str, version: int = 0) -> Any: ...

    def load_bitmap(self, tenant: str, pack_id: str, version: int = 0) -> tuple[BitMap, Any]: ...


@dataclass(frozen=True, slots=True)
class CachedPack:
    tenant: str
    pack_id: str
    version: int
    bitmap: BitMap
    #: ``dense_bits(bitmap)`` when the pack's ids are small enough, else None.
    dense: np.ndarray | None = None

    @property
    def name(self) -> str:
        return f"tenants/{self.tenant}/packs/{self.pack_id}"


class MembershipCache:
    """LRU of pack bitmaps with a bounded-staleness latest-version pointer per pack."""

    def __init__(
        self,
        packs: PackSource,
        *,
        capacity: int = 64,
        refresh_ms: int = 2000,
        dense_max_ids: int = 1 << 28,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.packs = packs
        self.capacity = capacity
        self.dense_max_ids = dense_max_ids
        self.refresh_seconds = refresh_ms / 1000.0
        self.clock = clock
        self._bitmaps: OrderedDict[tuple[str, str, int], tuple[BitMap, np.ndarray | None]] = OrderedDict()
        self._latest: dict[tuple[str, str], tuple[int, float]] = {}  # -> (version, checked at)
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], asyncio.Future[CachedPack]] = {}
        self.loads = 0  # bitmaps read from the store (for tests and metrics)

    def _fresh(self, tenant: str, pack_id: str) -> CachedPack | None:
        with self._lock:
            pointer = self._latest.get((tenant, pack_id))
            if pointer is None:
                return None
            version, checked = pointer
            if self.clock() - checked > self.refresh_seconds:
                return None
            key = (tenant, pack_id, version)
            entry = self._bitmaps.get(key)
            if entry is None:
                return None
            self._bitmaps.move_to_end(key)
            return CachedPack(tenant, pack_id, version, *entry)

    def _refresh(self, tenant: str, pack_id: str) -> CachedPack:
        """Blocking: read the latest-version pointer, and the bitmap if it is not cached."""
        pack = self.packs.get(tenant, pack_id)
        version = int(pack.version)
        key = (tenant, pack_id, version)
        with self._lock:
            entry = self._bitmaps.get(key)
        if entry is None:
            bitmap, loaded = self.packs.load_bitmap(tenant, pack_id, version)
            version = int(loaded.version) or version
            key = (tenant, pack_id, version)
            entry = (bitmap, dense_bits(bitmap, self.dense_max_ids))
            self.loads += 1
        with self._lock:
            # Older versions of this pack are no longer served from here: drop them now.
            for old in [k for k in self._bitmaps if k[:2] == (tenant, pack_id) and k != key]:
                del self._bitmaps[old]
            self._bitmaps[key] = entry
            self._bitmaps.move_to_end(key)
            while len(self._bitmaps) > self.capacity:
                (t, p, _), _ = self._bitmaps.popitem(last=False)
                self._latest.pop((t, p), None)
            self._latest[(tenant, pack_id)] = (version, self.clock())
        return CachedPack(tenant, pack_id, version, *entry)

    async def get(self, tenant: str, pack_id: str) -> CachedPack:
        """The latest version of a pack, from memory when the pointer is fresh enough.

        Store errors (``NotFound`` for a missing pack) propagate. Concurrent misses for one pack
        share one store read.
        """
        cached = self._fresh(tenant, pack_id)
        if cached is not None:
            return cached
        key = (tenant, pack_id)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[CachedPack] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await asyncio.to_thread(self._refresh, tenant, pack_id)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        else:
            future.set_result(result)
            return result
        finally:
            self._inflight.pop(key, None)

    def invalidate(self, tenant: str, pack_id: str) -> None:
        with self._lock:
            self._latest.pop((tenant, pack_id), None)
            for key in [k for k in self._bitmaps if k[:2] == (tenant, pack_id)]:
                del self._bitmaps[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._bitmaps)


def as_user_ids(values: Sequence[int]) -> np.ndarray:
    """Request ids (a protobuf repeated uint64) as a uint64 array.

    ``np.array`` reads the repeated field through its sequence protocol in C: about 25x faster
    than ``np.fromiter`` for 1,000 ids.
    """
    return np.array(values, dtype=np.uint64)


def dense_bits(bitmap: BitMap, max_ids: int = 1 << 28) -> np.ndarray | None:
    """The members as a little-endian bitset (bit ``i`` of byte ``i >> 3`` is id ``i``).

    None when the largest member is ``max_ids`` or more (the bitset would cost max / 8 bytes).
    """
    if not bitmap:
        return np.zeros(0, dtype=np.uint8)
    top = int(bitmap.max())
    if top >= max_ids:
        return None
    bits = np.zeros(top + 1, dtype=bool)
    bits[np.frombuffer(bitmap.to_array(), dtype=np.uint32)] = True
    return np.packbits(bits, bitorder="little")


def _check_dense(bits: np.ndarray, user_ids: np.ndarray) -> np.ndarray:
    if bits.size == 0:  # an empty pack
        return np.zeros(len(user_ids), dtype=bool)
    limit = np.uint64(bits.size * 8)
    inside = user_ids < limit
    index = np.where(inside, user_ids, 0) if not inside.all() else user_ids
    hit = (bits[index >> np.uint64(3)] >> (index & np.uint64(7)).astype(np.uint8)) & np.uint8(1)
    return hit.astype(bool) & inside


def check_batch(
    bitmaps: Sequence[BitMap], user_ids: np.ndarray, dense: Sequence[np.ndarray | None] | None = None
) -> list[np.ndarray]:
    """One boolean array per bitmap: is ``user_ids[i]`` a member? Vectorised, request order kept.

    ``dense[i]``, when given and not None, is ``dense_bits(bitmaps[i])`` and is used instead.
    """
    n = len(user_ids)
    if n == 0:
        return [np.zeros(0, dtype=bool) for _ in bitmaps]
    results: list[np.ndarray] = []
    query: BitMap | None = None
    ids32 = in_range = None
    all_in_range = True
    for i, bitmap in enumerate(bitmaps):
        bits = dense[i] if dense is not None else None
        if bits is not None:
            results.append(_check_dense(bits, user_ids))
            continue
        if query is None:  # the Roaring path: built once per batch, for the first pack that needs it
            in_range = user_ids <= UINT32_MAX
            all_in_range = bool(in_range.all())
            ids32 = (user_ids if all_in_range else user_ids[in_range]).astype(np.uint32)
            # Roaring builds a bitmap from sorted input faster; the search below keeps request order.
            query = BitMap(array.array("I", np.sort(ids32).tobytes()))
        assert ids32 is not None  # set with query
        members = np.frombuffer((query & bitmap).to_array(), dtype=np.uint32)
        if members.size == 0:
            results.append(np.zeros(n, dtype=bool))
            continue
        # members is sorted: a binary search per id tells whether it is one of them.
        position = np.searchsorted(members, ids32)
        position[position == members.size] = 0
        hit = members[position] == ids32
        if not all_in_range:
            full = np.zeros(n, dtype=bool)
            full[in_range] = hit
            hit = full
        results.append(hit)
    return results


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def membership_response(
    names: Sequence[str], versions: Sequence[int], flags: Sequence[np.ndarray]
) -> audience_service_pb2.CheckMembershipResponse:
    """``CheckMembershipResponse`` built from bool arrays without a Python object per flag.

    ``PackMembership.members`` is a packed ``repeated bool`` (field 3): one byte 0/1 per flag, which
    is exactly a numpy bool array's memory. Encoding the three fields by hand and parsing the bytes
    once is ~4x cheaper than ``members=flags.tolist()`` for 3 x 1,000 flags (it was the largest
    cost of a CheckMembership call). Equal to the straightforward construction (see the tests).
    """
    parts = []
    for name, version, hit in zip(names, versions, flags, strict=True):
        body = _field(1, name.encode("utf-8"))
        if version:
            body += _varint(2 << 3) + _varint(version)  # field 2, varint
        if len(hit):
            body += _field(3, np.ascontiguousarray(hit, dtype=np.bool_).view(np.uint8).tobytes())
        parts.append(_field(1, body))  # CheckMembershipResponse.results
    return audience_service_pb2.CheckMembershipResponse.FromString(b"".join(parts))


__all__ = [
    "UINT32_MAX",
    "CachedPack",
    "MembershipCache",
    "PackSource",
    "as_user_ids",
    "check_batch",
    "dense_bits",
    "membership_response",
]
