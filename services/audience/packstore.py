"""Versioned, immutable packs in the object store.

Layout under ``prefix`` (default ``packs/``)::

    packs/{tenant}/{pack}/v000003/members.roaring              one file, or per shard:
    packs/{tenant}/{pack}/v000003/members-000-of-004.roaring   (disjoint parts, union = the pack)
    packs/{tenant}/{pack}/v000003/manifest.json                written by ``publish``: data first
    packs/{tenant}/{pack}/latest.json                          pointer, written last of all
    packs/{tenant}/{pack}/staging/{run}/shard-1-of-4.roaring   CLI shard parts, each with
    packs/{tenant}/{pack}/staging/{run}/shard-1-of-4.manifest.json

Readers trust only pointer -> manifest -> data: a version is visible once the pointer names it (or an
older version is asked for explicitly), so a build that dies before the pointer leaves nothing
visible, and a manifest that exists without the pointer reaching it stays invisible. Deleting removes
the pointer first (the pack vanishes at once), then the data.

The whole ``Pack`` (spec included, as protobuf JSON) is kept in each version's manifest, so a refresh
can rebuild it and ``pack_from_manifest`` can answer ``GetPack`` from the manifest alone. The pointer
repeats the fields ``list`` sorts and filters on so that listing reads one small object per pack.

One writer per pack at a time is assumed (the servicer serialises builds of a pack); concurrent
writers cannot corrupt a version (``publish`` refuses existing keys) but may leave the pointer at the
older of two new versions.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flashcrowd.audience.v1 import pack_pb2, spec_pb2
from google.protobuf import json_format, timestamp_pb2
from pyroaring import BitMap, FrozenBitMap

from services.audience.compiler import bitmap_to_numpy
from services.audience.names import ID_RULE, PACK_TYPE, is_valid_id, pack_name, parse_pack_name
from services.events.sharding import Shard, buckets_np
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.runtime.tenant_ids import valid_tenant_id
from services.storage import ObjectNotFound, ObjectStore, check_prefix, publish, read_manifest

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "PackStore",
    "ShardPart",
    "check_ids",
    "pack_from_manifest",
    "split_by_shard",
]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MANIFEST_KIND = "flashcrowd.pack/v1"
SHARD_MANIFEST_KIND = "flashcrowd.pack-shard/v1"
_VERSION_DIR = re.compile(r"v(\d{6,})/")
_FILTER_TERM = re.compile(r'\s*(labels\.([A-Za-z0-9_.\-/]+)|state)\s*=\s*("([^"]*)"|[^\s"]+)\s*')
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def check_ids(tenant: str, pack_id: str) -> None:
    """``InvalidArgument`` unless both ids follow the id rule."""
    problems = []
    if not valid_tenant_id(tenant):
        problems.append(("tenant", f"{tenant!r} must be {ID_RULE}"))
    if not is_valid_id(pack_id):
        problems.append(("pack_id", f"{pack_id!r} must be {ID_RULE}"))
    if problems:
        raise InvalidArgument(problems)


def split_by_shard(bitmap: BitMap, count: int) -> list[BitMap]:
    """The disjoint parts of ``bitmap`` owned by shards ``0/count .. count-1/count``."""
    if count == 1:
        return [bitmap]
    ids = bitmap_to_numpy(bitmap)
    buckets = buckets_np(ids)
    parts = []
    for shard in Shard.all(count):
        lo, hi = shard.bucket_range()
        parts.append(BitMap(ids[(buckets >= lo) & (buckets < hi)]))
    return parts


@dataclass(frozen=True)
class ShardPart:
    """One staged shard of a CLI run: where it is and what it holds."""

    shard: Shard
    manifest_key: str
    size: int


class PackStore:
    """Packs of every tenant under ``prefix`` of one object store."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str = "packs/",
        *,
        clock: Callable[[], datetime] = _now,
        cache_size: int = 32,
    ) -> None:
        check_prefix(prefix)
        self.store = store
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.clock = clock
        self._cache: OrderedDict[tuple[str, str, int], FrozenBitMap] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # --- keys --------------------------------------------------------------------------------

    def pack_prefix(self, tenant: str, pack_id: str) -> str:
        return f"{self.prefix}{tenant}/{pack_id}/"

    def version_prefix(self, tenant: str, pack_id: str, version: int) -> str:
        return f"{self.pack_prefix(tenant, pack_id)}v{version:06d}/"

    def manifest_key(self, tenant: str, pack_id: str, version: int) -> str:
        return self.version_prefix(tenant, pack_id, version) + "manifest.json"

    def pointer_key(self, tenant: str, pack_id: str) -> str:
        return self.pack_prefix(tenant, pack_id) + "latest.json"

    def staging_prefix(self, tenant: str, pack_id: str, run_id: str) -> str:
        return f"{self.pack_prefix(tenant, pack_id)}staging/{run_id}/"

    @staticmethod
    def _members_file(index: int, count: int) -> str:
        return "members.roaring" if count == 1 else f"members-{index:03d}-of-{count:03d}.roaring"

    # --- writing -----------------------------------------------------------------------------

    def publish_version(
        self,
        tenant: str,
        pack_id: str,
        bitmap: BitMap,
        pack: pack_pb2.Pack,
        stats: pack_pb2.BuildStats | None = None,
        shards: int = 1,
        *,
        resolved_spec: spec_pb2.PackSpec | None = None,
        operation: str = "",
    ) -> pack_pb2.Pack:
        """Publish ``bitmap`` as the next version of the pack; return the stored ``Pack``.

        From ``pack`` the caller's fields are kept (display_name, labels, spec, options, ttl, source,
        upload_stats, inputs); name, version, state, size, times, etag and build_stats are set here.
        ``shards > 1`` stores one file per shard (readers union them). ``resolved_spec`` (relative
        windows made absolute) is recorded in the manifest next to the spec as written, and
        ``operation`` (the build's operation name) so that a re-run of that build finds its result.
        """
        check_ids(tenant, pack_id)
        if not 1 <= shards <= 256:
            raise InvalidArgument("shards", f"must be in 1..256, got {shards}")
        parts = list(zip(Shard.all(shards), split_by_shard(bitmap, shards), strict=True))
        return self._publish(tenant, pack_id, parts, pack, stats, resolved_spec, operation)

    def _publish(
        self,
        tenant: str,
        pack_id: str,
        parts: Sequence[tuple[Shard, BitMap]],
        pack: pack_pb2.Pack,
        stats: pack_pb2.BuildStats | None,
        resolved_spec: spec_pb2.PackSpec | None,
        operation: str = "",
    ) -> pack_pb2.Pack:
        name = pack_name(tenant, pack_id)
        previous = self._pointer(tenant, pack_id)
        now = self.clock()
        size = sum(len(part) for _, part in parts)
        stored = pack_pb2.Pack()
        stored.CopyFrom(pack)
        for output_only in ("version", "state", "size", "build_stats", "create_time", "update_time",
                            "expire_time", "etag", "failure_reason"):  # fmt: skip
            stored.ClearField(output_only)
        stored.name = name
        stored.state = pack_pb2.Pack.STATE_READY
        stored.size = size
        if stats is not None:
            stored.build_stats.CopyFrom(stats)
        created = (
            _parse_iso(previous["create_time"])
            if previous and not self._expired(previous.get("expire_time"))
            else now
        )
        stored.create_time.CopyFrom(_ts(created))
        stored.update_time.CopyFrom(_ts(now))
        if stored.HasField("ttl") and stored.ttl.ToTimedelta().total_seconds() > 0:
            # Each version lives ttl from its own creation: a refresh renews the pack.
            stored.expire_time.CopyFrom(_ts(now + stored.ttl.ToTimedelta()))

        count = len(parts)
        payloads = {index: bytes(part.serialize()) for index, (_, part) in enumerate(parts)}
        for attempt in range(3):
            version = self._next_version(tenant, pack_id, previous)
            stored.version = version
            stored.etag = f'W/"{version}-{hashlib.sha256(b"".join(payloads.values())).hexdigest()[:16]}"'
            base = self.version_prefix(tenant, pack_id, version)
            data = {base + self._members_file(i, count): payloads[i] for i in range(count)}
            manifest: dict[str, Any] = {
                "kind": MANIFEST_KIND,
                "name": name,
                "tenant": tenant,
                "pack_id": pack_id,
                "version": version,
                "size": size,
                "shards": {
                    "count": count,
                    "parts": [
                        {"shard": str(shard), "key": base + self._members_file(i, count), "size": len(part)}
                        for i, (shard, part) in enumerate(parts)
                    ],
                },
                "pack": json_format.MessageToDict(stored),
            }
            if resolved_spec is not None:
                manifest["resolved_spec"] = json_format.MessageToDict(resolved_spec)
            if operation:
                manifest["operation"] = operation
            try:
                publish(self.store, data=data, manifest_key=base + "manifest.json", manifest=manifest)
                break
            except FileExistsError:
                if attempt == 2:
                    raise
                log.warning("version %d of %s appeared while publishing; trying the next one", version, name)
        self._write_pointer(tenant, pack_id, stored, base + "manifest.json")
        return stored

    def _write_pointer(self, tenant: str, pack_id: str, pack: pack_pb2.Pack, manifest_key: str) -> None:
        pointer = {
            "name": pack.name,
            "version": pack.version,
            "manifest": manifest_key,
            "create_time": _iso(pack.create_time.ToDatetime(UTC)),
            "update_time": _iso(pack.update_time.ToDatetime(UTC)),
            "expire_time": _iso(pack.expire_time.ToDatetime(UTC)) if pack.HasField("expire_time") else None,
            "labels": dict(pack.labels),
            "state": pack_pb2.Pack.State.Name(pack.state),
            "size": pack.size,
        }
        payload = json.dumps(pointer, sort_keys=True, indent=2).encode()
        self.store.put_bytes(self.pointer_key(tenant, pack_id), payload, "application/json")

    def _next_version(self, tenant: str, pack_id: str, pointer: dict[str, Any] | None) -> int:
        # Versions whose publish died still occupy their number: skip past every version directory.
        latest = pointer["version"] if pointer else 0
        base = self.pack_prefix(tenant, pack_id)
        for info in self.store.list(base, recursive=False):
            match = _VERSION_DIR.fullmatch(info.key[len(base) :])
            if match:
                latest = max(latest, int(match.group(1)))
        return latest + 1

    def published_by(self, tenant: str, pack_id: str, operation: str) -> pack_pb2.Pack | None:
        """The version ``operation`` published, if it did (a build re-run after its first owner died).

        A version whose data and manifest were written but whose pointer was not (the owner died in
        between) is completed here: its pointer is written, so the re-run publishes nothing twice.
        """
        pointer = self._pointer(tenant, pack_id)
        base = self.pack_prefix(tenant, pack_id)
        versions = sorted(
            (int(match.group(1)) for info in self.store.list(base, recursive=False)
             if (match := _VERSION_DIR.fullmatch(info.key[len(base) :]))),
            reverse=True,
        )  # fmt: skip
        for version in versions[:3]:  # the newest few: a build publishes one version
            try:
                manifest = read_manifest(self.store, self.manifest_key(tenant, pack_id, version))
            except ObjectNotFound:
                continue
            if manifest.get("operation") != operation:
                continue
            stored = pack_from_manifest(manifest)
            if pointer is None or pointer["version"] < version:
                self._write_pointer(tenant, pack_id, stored, self.manifest_key(tenant, pack_id, version))
            return stored
        return None

    def delete(self, tenant: str, pack_id: str) -> None:
        """Make the pack vanish (pointer first), then delete its data. ``NotFound`` if absent/expired."""
        self.get(tenant, pack_id)
        self.store.delete(self.pointer_key(tenant, pack_id))
        with self._lock:
            for key in [k for k in self._cache if k[:2] == (tenant, pack_id)]:
                del self._cache[key]
        try:
            self.store.delete_prefix(self.pack_prefix(tenant, pack_id))
        except Exception:
            # Invisible already; gc_orphans removes what is left.
            log.warning("could not delete the data of %s", pack_name(tenant, pack_id), exc_info=True)

    def purge_expired(self, tenant: str) -> list[str]:
        """Delete the data of the tenant's expired packs (already invisible); return their names."""
        purged = []
        base = f"{self.prefix}{tenant}/"
        for info in self.store.list(base, recursive=False):
            if not info.key.endswith("/"):
                continue
            pack_id = info.key[len(base) : -1]
            pointer = self._pointer(tenant, pack_id)
            if pointer is not None and self._expired(pointer.get("expire_time")):
                self.store.delete(self.pointer_key(tenant, pack_id))
                self.store.delete_prefix(self.pack_prefix(tenant, pack_id))
                purged.append(pointer["name"])
        return purged

    # --- shard staging (batch CLI) -----------------------------------------------------------

    def stage_shard(
        self,
        tenant: str,
        pack_id: str,
        run_id: str,
        shard: Shard,
        bitmap: BitMap,
        pack: pack_pb2.Pack,
        stats: pack_pb2.BuildStats | None = None,
        *,
        resolved_spec: spec_pb2.PackSpec | None = None,
        files_read: Sequence[str] = (),
    ) -> ShardPart:
        """Write one shard's part of a run (data, then its manifest); invisible until merged.

        ``files_read`` (event file keys) lets the merge report distinct files rather than a sum.
        """
        check_ids(tenant, pack_id)
        _check_run_id(run_id)
        owned = shard.mask_np(bitmap_to_numpy(bitmap))
        if not owned.all():
            raise ValueError(f"bitmap has {int((~owned).sum())} member(s) outside shard {shard}")
        base = self.staging_prefix(tenant, pack_id, run_id) + f"shard-{shard.index}-of-{shard.count}"
        stored = pack_pb2.Pack()
        stored.CopyFrom(pack)
        stored.name = pack_name(tenant, pack_id)
        if stats is not None:
            stored.build_stats.CopyFrom(stats)
        manifest: dict[str, Any] = {
            "kind": SHARD_MANIFEST_KIND,
            "name": stored.name,
            "run_id": run_id,
            "shard": str(shard),
            "size": len(bitmap),
            "key": base + ".roaring",
            "pack": json_format.MessageToDict(stored),
            "files_read": sorted(files_read),
        }
        if resolved_spec is not None:
            manifest["resolved_spec"] = json_format.MessageToDict(resolved_spec)
        publish(
            self.store,
            data={base + ".roaring": bytes(bitmap.serialize())},
            manifest_key=base + ".manifest.json",
            manifest=manifest,
            overwrite=True,  # a retried shard Job replaces its own earlier attempt
        )
        return ShardPart(shard=shard, manifest_key=base + ".manifest.json", size=len(bitmap))

    def merge_shards(
        self, tenant: str, pack_id: str, run_id: str, shards: int, *, cleanup: bool = True
    ) -> pack_pb2.Pack:
        """Publish the ``shards`` staged parts of ``run_id`` as one new version (their union).

        ``FailedPrecondition`` naming the missing shards if any part is absent, or when the parts
        disagree on spec, options or dataset version.
        """
        check_ids(tenant, pack_id)
        _check_run_id(run_id)
        base = self.staging_prefix(tenant, pack_id, run_id)
        manifests: list[dict[str, Any]] = []
        missing: list[str] = []
        for shard in Shard.all(shards):
            key = f"{base}shard-{shard.index}-of-{shard.count}.manifest.json"
            try:
                manifests.append(read_manifest(self.store, key))
            except ObjectNotFound:
                missing.append(str(shard))
        if missing:
            raise FailedPrecondition(
                "SHARDS_MISSING",
                f"run {run_id!r} of {pack_name(tenant, pack_id)} lacks shard(s) {', '.join(missing)} "
                f"of {shards}: build them (flashcrowd pack build --shard i/{shards} --run-id {run_id}) first",
                [("SHARDS_MISSING", f"shard {m}", "not built or not finished") for m in missing],
            )
        packs = [json_format.ParseDict(m["pack"], pack_pb2.Pack()) for m in manifests]
        first = packs[0]
        for shard, other in zip(Shard.all(shards), packs, strict=True):
            for what, mine, theirs in (
                ("spec", first.spec, other.spec),
                ("options", first.options, other.options),
                ("dataset version", first.build_stats.dataset_version, other.build_stats.dataset_version),
                ("as_of", first.build_stats.as_of, other.build_stats.as_of),
            ):
                if mine != theirs:
                    raise FailedPrecondition(
                        "SHARDS_INCONSISTENT",
                        f"run {run_id!r}: shard {shard} was built with another {what} than shard 0/{shards}",
                    )
        parts = []
        for shard, manifest in zip(Shard.all(shards), manifests, strict=True):
            bitmap = self._read_bitmap(manifest["key"], manifest)
            parts.append((shard, bitmap))
        stats = _merged_stats([p.build_stats for p in packs])
        if all(m.get("files_read") for m in manifests):
            stats.files_read = len({key for m in manifests for key in m["files_read"]})
        resolved = manifests[0].get("resolved_spec")
        resolved_spec = json_format.ParseDict(resolved, spec_pb2.PackSpec()) if resolved else None
        merged = self._publish(tenant, pack_id, parts, first, stats, resolved_spec)
        if cleanup:
            try:
                self.store.delete_prefix(base)
            except Exception:
                log.warning("could not clean up %s", base, exc_info=True)
        return merged

    def staged_parts(self, tenant: str, pack_id: str, run_id: str) -> list[ShardPart]:
        """The parts of a run that have landed (manifest present)."""
        base = self.staging_prefix(tenant, pack_id, run_id)
        parts = []
        for info in self.store.list(base):
            if info.key.endswith(".manifest.json"):
                manifest = read_manifest(self.store, info.key)
                parts.append(ShardPart(Shard.parse(manifest["shard"]), info.key, int(manifest["size"])))
        return sorted(parts, key=lambda p: p.shard)

    # --- reading -----------------------------------------------------------------------------

    def _pointer(self, tenant: str, pack_id: str) -> dict[str, Any] | None:
        try:
            raw = self.store.get_bytes(self.pointer_key(tenant, pack_id))
        except ObjectNotFound:
            return None
        return json.loads(raw)

    def _expired(self, expire_time: str | None) -> bool:
        return expire_time is not None and bool(expire_time) and _parse_iso(expire_time) <= self.clock()

    def _not_found(self, tenant: str, pack_id: str, version: int = 0) -> NotFound:
        name = pack_name(tenant, pack_id)
        if version:
            return NotFound(PACK_TYPE, name, message=f"{PACK_TYPE} not found: {name} version {version}")
        return NotFound(PACK_TYPE, name)

    def manifest(self, tenant: str, pack_id: str, version: int = 0) -> dict[str, Any]:
        """The manifest of a visible version (0 = latest). ``NotFound`` otherwise (also when expired)."""
        if not (valid_tenant_id(tenant) and is_valid_id(pack_id)) or version < 0:
            raise self._not_found(tenant, pack_id, version)
        pointer = self._pointer(tenant, pack_id)
        if pointer is None or version > pointer["version"]:
            raise self._not_found(tenant, pack_id, version)
        key = (
            pointer["manifest"]
            if version in (0, pointer["version"])
            else self.manifest_key(tenant, pack_id, version)
        )
        try:
            manifest = read_manifest(self.store, key)
        except ObjectNotFound:
            raise self._not_found(tenant, pack_id, version) from None
        if self._expired(manifest["pack"].get("expireTime")):
            raise self._not_found(tenant, pack_id, version)
        return manifest

    def get(self, tenant: str, pack_id: str, version: int = 0) -> pack_pb2.Pack:
        """The pack (latest visible version when ``version`` is 0). ``NotFound`` if absent or expired."""
        return pack_from_manifest(self.manifest(tenant, pack_id, version))

    def exists(self, tenant: str, pack_id: str, version: int = 0) -> bool:
        try:
            self.manifest(tenant, pack_id, version)
        except NotFound:
            return False
        return True

    def latest_version(self, tenant: str, pack_id: str) -> int:
        """Latest visible version, 0 when the pack does not exist (or expired)."""
        try:
            return int(self.manifest(tenant, pack_id)["version"])
        except NotFound:
            return 0

    def resolved_spec(self, tenant: str, pack_id: str, version: int = 0) -> spec_pb2.PackSpec | None:
        """The spec as built (relative windows made absolute), if recorded."""
        data = self.manifest(tenant, pack_id, version).get("resolved_spec")
        return json_format.ParseDict(data, spec_pb2.PackSpec()) if data else None

    def load_bitmap(self, tenant: str, pack_id: str, version: int = 0) -> tuple[BitMap, pack_pb2.Pack]:
        """Members (a fresh, mutable bitmap) and the pack. Data is checked against the manifest."""
        manifest = self.manifest(tenant, pack_id, version)
        parts = manifest["shards"]["parts"]
        bitmap = BitMap()
        for part in parts:
            bitmap |= self._read_bitmap(part["key"], manifest)
        return bitmap, pack_from_manifest(manifest)

    def load_frozen(self, tenant: str, pack_id: str, version: int = 0) -> tuple[FrozenBitMap, pack_pb2.Pack]:
        """Like ``load_bitmap`` but immutable, cached per (tenant, pack, version): versions never change."""
        manifest = self.manifest(tenant, pack_id, version)  # resolves "latest" and checks expiry
        key = (tenant, pack_id, int(manifest["version"]))
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached, pack_from_manifest(manifest)
        bitmap = BitMap()
        for part in manifest["shards"]["parts"]:
            bitmap |= self._read_bitmap(part["key"], manifest)
        frozen = FrozenBitMap(bitmap)
        with self._lock:
            self._cache[key] = frozen
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return frozen, pack_from_manifest(manifest)

    def _read_bitmap(self, key: str, manifest: dict[str, Any]) -> BitMap:
        entry = next((f for f in manifest["files"] if f["key"] == key), None)
        try:
            raw = self.store.get_bytes(key)
        except ObjectNotFound:
            raise FailedPrecondition(
                "PACK_DATA_MISSING",
                f"{manifest['name']}: data object {key} listed in its manifest is missing",
            ) from None
        if entry is not None and hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise FailedPrecondition(
                "PACK_DATA_CORRUPT", f"{manifest['name']}: {key} does not match its manifest"
            )
        return BitMap.deserialize(raw)

    # --- listing -----------------------------------------------------------------------------

    def list(
        self, tenant: str, *, page_size: int = 0, page_token: str = "", filter: str = ""
    ) -> tuple[list[pack_pb2.Pack], str]:
        """One page of the tenant's packs, newest first (update time, then name); next token or "".

        ``filter``: ``labels.KEY=VALUE`` and ``state=READY`` terms joined by `` AND ``. Tokens are
        opaque, stable under concurrent creates (they hold the last item's sort key) and bound to
        the filter.
        """
        if page_size < 0:
            raise InvalidArgument("page_size", f"must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        terms = _parse_filter(filter)
        filter_tag = hashlib.sha256(filter.encode()).hexdigest()[:8]
        after = _decode_token(page_token, filter_tag) if page_token else None
        if not valid_tenant_id(tenant):
            return [], ""

        entries: list[tuple[tuple[int, str], dict[str, Any]]] = []
        base = f"{self.prefix}{tenant}/"
        for info in self.store.list(base, recursive=False):
            if not info.key.endswith("/"):
                continue
            pack_id = info.key[len(base) : -1]
            pointer = self._pointer(tenant, pack_id)
            if pointer is None or self._expired(pointer.get("expire_time")) or not _matches(pointer, terms):
                continue
            entries.append((_sort_key(pointer), pointer))
        entries.sort(key=lambda e: e[0])
        if after is not None:
            entries = [e for e in entries if e[0] > after]
        page: list[pack_pb2.Pack] = []
        last_key: tuple[int, str] | None = None
        for key, pointer in entries:
            if len(page) == size:
                break
            _, pack_id = parse_pack_name(pointer["name"])
            try:
                page.append(self.get(tenant, pack_id))
            except NotFound:
                continue  # deleted or expired since the listing
            last_key = key
        more = last_key is not None and entries and entries[-1][0] > last_key
        return page, (_encode_token(last_key, filter_tag) if more and last_key else "")

    def list_all(self, tenant: str, *, filter: str = "") -> Iterable[pack_pb2.Pack]:
        token = ""
        while True:
            page, token = self.list(tenant, page_size=MAX_PAGE_SIZE, page_token=token, filter=filter)
            yield from page
            if not token:
                return

    # --- resolution for the builder ----------------------------------------------------------

    def resolve_pack(self, tenant: str) -> Callable[[str, int], tuple[BitMap, int]]:
        """Builder callback ``(name, version) -> (members, version used)``; foreign packs are NotFound."""

        def resolve(name: str, version: int) -> tuple[BitMap, int]:
            ref_tenant, ref_pack = self._own(tenant, name)
            frozen, pack = self.load_frozen(ref_tenant, ref_pack, version)
            return BitMap(frozen), pack.version

        return resolve

    def resolve_spec(self, tenant: str) -> Callable[[str, int], tuple[spec_pb2.PackSpec | None, int]]:
        """Builder callback for cycle detection: ``(name, version) -> (spec or None, version)``."""

        def resolve(name: str, version: int) -> tuple[spec_pb2.PackSpec | None, int]:
            ref_tenant, ref_pack = self._own(tenant, name)
            pack = self.get(ref_tenant, ref_pack, version)
            return (pack.spec if pack.HasField("spec") else None), pack.version

        return resolve

    @staticmethod
    def _own(tenant: str, name: str) -> tuple[str, str]:
        try:
            ref_tenant, ref_pack = parse_pack_name(name)
        except ValueError:
            raise NotFound(PACK_TYPE, name) from None
        if ref_tenant != tenant:  # same answer as a missing pack: never reveal other tenants' packs
            raise NotFound(PACK_TYPE, name)
        return ref_tenant, ref_pack


def pack_from_manifest(manifest: dict[str, Any]) -> pack_pb2.Pack:
    """The ``Pack`` a version manifest describes."""
    pack = json_format.ParseDict(manifest["pack"], pack_pb2.Pack(), ignore_unknown_fields=True)
    pack.version = int(manifest["version"])
    pack.size = int(manifest["size"])
    return pack


def _merged_stats(all_stats: Sequence[pack_pb2.BuildStats]) -> pack_pb2.BuildStats:
    merged = pack_pb2.BuildStats()
    merged.CopyFrom(all_stats[0])
    merged.files_total = max(s.files_total for s in all_stats)
    merged.files_read = sum(s.files_read for s in all_stats)
    merged.events_matched = sum(s.events_matched for s in all_stats)
    merged.bots_excluded = sum(s.bots_excluded for s in all_stats)
    # Shards run in parallel: the slowest one is the wall time of the build.
    merged.duration.CopyFrom(max((s.duration for s in all_stats), key=lambda d: (d.seconds, d.nanos)))
    merged.shard = "0/1"
    return merged


def _check_run_id(run_id: str) -> None:
    if not _RUN_ID.fullmatch(run_id or ""):
        raise InvalidArgument("run_id", f"{run_id!r} must be 1-64 characters of [A-Za-z0-9_.-]")


def _sort_key(pointer: dict[str, Any]) -> tuple[int, str]:
    # Newest first: negate the update time in microseconds so that ascending order is newest first.
    updated = _parse_iso(pointer["update_time"])
    micros = int(updated.timestamp()) * 1_000_000 + updated.microsecond
    return -micros, pointer["name"]


def _encode_token(key: tuple[int, str], filter_tag: str) -> str:
    raw = json.dumps([key[0], key[1], filter_tag], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, filter_tag: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        micros, name, tag = json.loads(raw)
        if not isinstance(micros, int) or not isinstance(name, str):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidArgument("page_token", "malformed page token") from None
    if tag != filter_tag:
        raise InvalidArgument("page_token", "page token was issued for a different filter")
    return micros, name


def _parse_filter(text: str) -> list[tuple[str, str]]:
    """``labels.a=b AND state=READY`` -> ``[("labels.a", "b"), ("state", "READY")]``."""
    if not text.strip():
        return []
    terms = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        match = _FILTER_TERM.fullmatch(part)
        if match is None:
            raise InvalidArgument(
                "filter", f"cannot parse {part!r}: expected labels.KEY=VALUE or state=STATE joined by ' AND '"
            )
        key = match.group(1)
        value = match.group(4) if match.group(4) is not None else match.group(3)
        if key == "state":
            value = value.upper().removeprefix("STATE_")
            if "STATE_" + value not in pack_pb2.Pack.State.DESCRIPTOR.values_by_name:
                raise InvalidArgument("filter", f"unknown state {value!r}; known: BUILDING, READY, FAILED")
        terms.append((key, value))
    return terms


def _matches(pointer: dict[str, Any], terms: Iterable[tuple[str, str]]) -> bool:
    labels = pointer.get("labels") or {}
    for key, value in terms:
        if key == "state":
            if pointer.get("state") != "STATE_" + value:
                return False
        elif labels.get(key.removeprefix("labels.")) != value:
            return False
    return True
