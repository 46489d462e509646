"""``AudienceService``: the RPC layer over the pack builder, the pack store and the operations.

Every handler validates its request first (INVALID_ARGUMENT with ``BadRequest`` field violations
naming the request fields), resolves the tenant through ``Tenancy`` (another tenant's resources are
NOT_FOUND, as if missing), and does blocking work (object-store reads, polars, Roaring) in worker
threads so the event loop keeps serving CheckMembership. Errors are raised as the runtime's domain
exceptions; the runtime's one interceptor maps them to ``google.rpc.Status``.

Builds (CreatePack, RefreshPack) are long-running operations (``OperationManager``); the spec is
validated and its pack references resolved before the operation starts, so a bad spec fails the
call itself and nothing is written. A build that fails midway publishes nothing: the pack store
makes a version visible only when its pointer is written, after data and manifest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
import polars as pl
from flashcrowd.audience.v1 import audience_service_pb2, audience_service_pb2_grpc, pack_pb2, spec_pb2
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2
from opentelemetry import metrics, trace
from pyroaring import BitMap

from services.audience import builder as pack_builder
from services.audience.compute_pool import ComputePool
from services.audience.config import AudienceSettings
from services.audience.membership import MembershipCache, as_user_ids, check_batch, membership_response
from services.audience.operations import OperationManager, ReservationConflict, request_fingerprint
from services.audience.pack_builds import PACK_SIZE, build_payload, open_dataset
from services.audience.packstore import PackStore
from services.audience.privacy import BELOW_MINIMUM, Discloser, fingerprint_of_pack, is_exact_for
from services.audience.quotas import TenantQuotas
from services.audience.spec_validation import validate_spec
from services.audience.tenancy import (
    LIVE_PACK_TYPE,
    PACK_TYPE,
    Tenancy,
    check_id,
    is_live_pack_name,
    pack_name,
    parse_live_pack_name,
    parse_pack_name,
    parse_parent,
)
from services.audience.uploads import (
    UploadHeader,
    check_identity_pepper,
    check_rows,
    check_user_ids,
    invalid_row_messages,
    key_upload,
    match_rows,
    match_user_ids,
    read_upload,
    upload_stats,
)
from services.events.dataset import EventDataset
from services.events.sharding import NUM_BUCKETS, Shard
from services.runtime import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, attributes
from services.storage import ObjectStore

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("flashcrowd.audience")
meter = metrics.get_meter("flashcrowd.audience")
UPLOAD_ROWS = meter.create_counter(
    attributes.METRIC_UPLOAD_ROWS, unit="{row}", description="Upload rows by outcome"
)

MAX_CHECK_PACKS = 16
MAX_CHECK_IDS = 10_000
DEFAULT_EXPORT_PAGE = 10_000
MAX_EXPORT_PAGE = 100_000
DEFAULT_PERSONA_TOP_N = 10
MAX_PERSONA_TOP_N = 100
DEFAULT_SAMPLE_FRACTION = 1 / 16
MAX_REQUEST_ID = 128
Z95 = 1.959963984540054
# Timestamp range of the protobuf well-known type (0001-01-01 .. 9999-12-31).
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799

ExportFormat = audience_service_pb2.ExportFormat
#: Keyed export formats -> (identity-map id_type code, keyed column): HMAC hex for platform joins.
_KEYED_EXPORTS: dict[int, tuple[int, str]] = {
    audience_service_pb2.EXPORT_FORMAT_KEYED_SHA256_PHONE: (audience_service_pb2.ID_TYPE_PHONE, "key_sha256"),
    audience_service_pb2.EXPORT_FORMAT_KEYED_SHA256_OAID: (audience_service_pb2.ID_TYPE_OAID, "key_sha256"),
}
#: Formats that exported plain digests (brute-forceable back to the person): refused -> what instead.
_REFUSED_EXPORTS: dict[int, str] = {
    audience_service_pb2.EXPORT_FORMAT_SHA256_PHONE: "EXPORT_FORMAT_KEYED_SHA256_PHONE",
    audience_service_pb2.EXPORT_FORMAT_SHA256_OAID: "EXPORT_FORMAT_KEYED_SHA256_OAID",
    audience_service_pb2.EXPORT_FORMAT_MD5_PHONE: "EXPORT_FORMAT_KEYED_SHA256_PHONE",
}


# --- export page tokens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportToken:
    """Where an export resumes: the pack, its version, the format and the member offset."""

    name: str
    version: int
    format: int
    offset: int

    def encode(self) -> str:
        raw = json.dumps([1, self.name, self.version, self.format, self.offset], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> ExportToken:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            tag, name, version, fmt, offset = json.loads(raw)
            if tag != 1 or not isinstance(name, str):
                raise ValueError
            if not all(isinstance(v, int) and v >= 0 for v in (version, fmt, offset)):
                raise ValueError
        except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
            raise InvalidArgument("page_token", "not a token from a previous ExportPack response") from None
        return cls(name, version, fmt, offset)


# --- size estimates -------------------------------------------------------------------------------


def sample_shard(fraction: float) -> Shard:
    """The shard ``0/n`` whose share of the 256 user buckets is closest to ``fraction``."""
    count = max(1, min(NUM_BUCKETS, round(1 / fraction)))
    return Shard(0, count)


def shard_fraction(shard: Shard) -> float:
    lo, hi = shard.bucket_range()
    return (hi - lo) / NUM_BUCKETS


def scale_estimate(sample_size: int, fraction: float) -> tuple[int, int, int]:
    """``(estimate, lower, upper)`` of a pack's size from ``sample_size`` members in ``fraction``.

    Users fall in buckets by a hash of their id, so each member of the full pack is in the sample
    with probability ``f``: the sample count X is Binomial(N, f). The estimate is X / f; its 95%
    interval is the normal approximation X / f +- 1.96 sqrt(X (1 - f)) / f (the lower bound never
    below X, the members actually found), and the rule of three (upper 3 / f) when X = 0. With
    f = 1 nothing is estimated: the count is exact.
    """
    if fraction >= 1.0:
        return sample_size, sample_size, sample_size
    estimate = sample_size / fraction
    if sample_size == 0:
        return 0, 0, math.ceil(3.0 / fraction)
    spread = Z95 * math.sqrt(sample_size * (1 - fraction)) / fraction
    lower = max(sample_size, math.floor(estimate - spread))
    upper = math.ceil(estimate + spread)
    return round(estimate), lower, upper


# --- the servicer -----------------------------------------------------------------------------------


class LiveMembership(Protocol):
    """What CheckMembership needs from live packs (sliding windows kept by a real-time service)."""

    def live_members(self, tenant: str, live_pack_id: str) -> tuple[int, BitMap]:
        """``(last stream sequence applied, current members)``; ``NotFound`` for an unknown live pack.

        Called on the event loop for every check: it must return at once (in-memory state).
        """
        ...


class AudienceServicer(audience_service_pb2_grpc.AudienceServiceServicer):
    """The ``AudienceService`` RPCs; see the module doc."""

    def __init__(
        self,
        settings: AudienceSettings,
        store: ObjectStore,
        packs: PackStore,
        operations: OperationManager,
        membership: MembershipCache,
        tenancy: Tenancy,
        discloser: Discloser,
        quotas: TenantQuotas | None = None,
        live_packs: LiveMembership | None = None,
        compute: ComputePool | None = None,
    ) -> None:
        self.settings = settings
        #: Where personas are computed (child processes, or this process's threads).
        self.compute = compute or ComputePool(store, settings.dataset_prefix)
        #: What tenants may learn of counts (noisy sizes and personas above minimums; privacy.py).
        self.discloser = discloser
        #: Per-tenant limits and counters (None: no tenant quotas, e.g. servicers wired by hand).
        self.quotas = quotas
        self.store = store
        self.packs = packs
        self.operations = operations
        self.membership = membership
        self.tenancy = tenancy
        #: HMAC key of the identity map (uploads key their digests with it; keyed exports check it).
        self.pepper = settings.pepper()
        self._estimates = asyncio.Semaphore(settings.max_concurrent_builds)
        #: The process's live-pack engine: CheckMembership answers ``tenants/{t}/livePacks/{id}``
        #: names from it; without one they are NOT_FOUND.
        self.live_packs = live_packs

    # --- helpers ------------------------------------------------------------------------------------

    def dataset(self) -> EventDataset:
        """A snapshot of the event dataset (blocking: reads its manifest)."""
        return open_dataset(self.store, self.settings.dataset_prefix)

    def _pack(self, name: str, context: grpc.aio.ServicerContext, field: str = "name") -> tuple[str, str]:
        tenant, pack_id = parse_pack_name(name, field)
        self.tenancy.authorize(context, tenant, resource_type=PACK_TYPE, name=name)
        span = trace.get_current_span()
        span.set_attribute(attributes.TENANT, tenant)
        span.set_attribute(attributes.PACK_NAME, name)
        return tenant, pack_id

    def _parent(self, parent: str, context: grpc.aio.ServicerContext, field: str = "parent") -> str:
        tenant = self.tenancy.authorize(context, parse_parent(parent, field))
        trace.get_current_span().set_attribute(attributes.TENANT, tenant)
        return tenant

    def reserve_pack(self, tenant: str, pack_id: str, purpose: str = "") -> str:
        """Claim a pack id for one build or upload (shared by every replica); ALREADY_EXISTS while
        another holds it. Returns the holder to release it with (or to hand to an operation). Blocking."""
        try:
            return self.operations.reserve(tenant, pack_id)
        except ReservationConflict as conflict:
            raise AlreadyExists(
                PACK_TYPE, pack_name(tenant, pack_id), description=f"being built by {conflict.holder}"
            ) from None

    def release_pack(self, tenant: str, pack_id: str, holder: str) -> None:
        """Release a claim (only ``holder``'s, never a later claim of the same id). Blocking."""
        self.operations.release(tenant, pack_id, holder)

    def _building_op(self, tenant: str, pack_id: str) -> str | None:
        """The operation (or call) building the pack on any replica, None if none is. Blocking."""
        return self.operations.holder(tenant, pack_id)

    def check_references(self, tenant: str, spec: spec_pb2.PackSpec, path: str, self_id: str = "") -> None:
        """Every pack a spec references must be one of the tenant's visible packs (NOT_FOUND otherwise).

        Following the referenced packs' specs back to the pack being built (``self_id``) is a cycle
        (FAILED_PRECONDITION naming it). Blocking.
        """
        references = list(_references(spec, path))
        parsed = []
        for ref, ref_path in references:
            ref_tenant, ref_pack = parse_pack_name(ref.pack, f"{ref_path}.pack")
            if ref_tenant != tenant:  # another tenant's pack: exactly as if it did not exist
                raise NotFound(
                    PACK_TYPE, ref.pack, description=f"referenced by {ref_path}", metadata={"field": ref_path}
                )
            parsed.append((ref, ref_path, ref_pack))
        if self_id:
            cycle = pack_builder.find_reference_cycle(
                spec, start=pack_name(tenant, self_id), resolve_spec=self.packs.resolve_spec(tenant)
            )
            if cycle:
                shown = " -> ".join(cycle)
                raise FailedPrecondition(
                    "PACK_REFERENCE_CYCLE",
                    f"pack references form a cycle: {shown}",
                    [("PACK_REFERENCE_CYCLE", path, f"references {cycle[0]} again through {shown}")],
                    metadata={"field": path},
                )
        for ref, ref_path, ref_pack in parsed:
            if not self.packs.exists(tenant, ref_pack, ref.version):
                raise NotFound(
                    PACK_TYPE,
                    ref.pack if not ref.version else f"{ref.pack} version {ref.version}",
                    description=f"referenced by {ref_path}",
                    metadata={"field": ref_path},
                )

    # --- CreatePack / RefreshPack -------------------------------------------------------------------

    def _quota_exempt(self, context: grpc.aio.ServicerContext | None) -> bool:
        """Platform principals (and direct calls) are not held to tenant quotas (``quotas.py``)."""
        return not TenantQuotas.applies_to(self.tenancy.caller(context))

    async def CreatePack(self, request, context):
        tenant = self._parent(request.parent, context)
        problems: list[tuple[str, str]] = []
        try:
            check_id(request.pack_id, "pack_id", "pack id")
        except InvalidArgument as error:
            problems.extend(error.violations)
        if len(request.request_id) > MAX_REQUEST_ID:
            problems.append(("request_id", f"at most {MAX_REQUEST_ID} characters"))
        if not request.HasField("pack") or not request.pack.HasField("spec"):
            problems.append(("pack.spec", "required"))
        if problems:
            raise InvalidArgument(problems)
        validate_spec(request.pack.spec, request.pack.options, field="pack.spec")
        _check_pack_fields(request.pack, "pack")

        fingerprint = request_fingerprint(request)
        request_key = f"create:{request.request_id}" if request.request_id else ""
        if request_key:
            existing = await asyncio.to_thread(self.operations.find_request, tenant, request_key, fingerprint)
            if existing is not None:
                return existing
        pack_id = request.pack_id
        name = pack_name(tenant, pack_id)
        try:
            reservation = await asyncio.to_thread(self.reserve_pack, tenant, pack_id)
        except AlreadyExists:
            if request_key:  # the same request accepted by another replica a moment ago
                existing = await self._accepted_elsewhere(tenant, request_key, fingerprint)
                if existing is not None:
                    return existing
            raise
        try:
            if await asyncio.to_thread(self.packs.exists, tenant, pack_id):
                raise AlreadyExists(PACK_TYPE, name)
            await asyncio.to_thread(self.check_references, tenant, request.pack.spec, "pack.spec", pack_id)
            template = pack_pb2.Pack()
            template.CopyFrom(request.pack)
            metadata = audience_service_pb2.BuildPackMetadata(pack=name, version=1, stage="queued")
            return await self.operations.start(
                tenant,
                "CreatePack",
                None,
                metadata,
                payload=build_payload(name, template),
                request_key=request_key,
                fingerprint=fingerprint,
                exempt=self._quota_exempt(context),  # else TENANT_QUOTA past the tenant's queued builds
                reservation=(pack_id, reservation),  # released when the operation ends
            )
        except BaseException:
            await asyncio.to_thread(self.release_pack, tenant, pack_id, reservation)
            raise

    async def _accepted_elsewhere(
        self, tenant: str, request_key: str, fingerprint: str
    ) -> operations_pb2.Operation | None:
        """The operation of a request another replica is accepting right now (a few seconds' wait)."""
        for _ in range(50):
            existing = await asyncio.to_thread(self.operations.find_request, tenant, request_key, fingerprint)
            if existing is not None:
                return existing
            await asyncio.sleep(0.1)
        return None

    async def RefreshPack(self, request, context):
        tenant, pack_id = self._pack(request.name, context)
        if request.HasField("as_of") and not (
            _MIN_SECONDS <= request.as_of.seconds <= _MAX_SECONDS and 0 <= request.as_of.nanos < 1_000_000_000
        ):
            raise InvalidArgument("as_of", "not a valid timestamp (years 1-9999)")
        current = await asyncio.to_thread(self.packs.get, tenant, pack_id)
        if current.source == pack_pb2.Pack.SOURCE_UPLOAD or not current.HasField("spec"):
            raise FailedPrecondition(
                "PACK_NOT_REFRESHABLE",
                f"{request.name} was uploaded, not built from a spec: upload a new pack instead",
                [
                    (
                        "PACK_NOT_REFRESHABLE",
                        request.name,
                        f"source {pack_pb2.Pack.Source.Name(current.source)}",
                    )
                ],
            )
        reservation = await asyncio.to_thread(self._reserve_refresh, tenant, pack_id, request.name)
        try:
            template = pack_pb2.Pack()
            template.CopyFrom(current)
            if request.HasField("as_of"):
                template.options.as_of.CopyFrom(request.as_of)
            else:  # relative windows move with the data unless the caller pins them
                template.options.ClearField("as_of")
            await asyncio.to_thread(self.check_references, tenant, template.spec, "pack.spec", pack_id)
            metadata = audience_service_pb2.BuildPackMetadata(
                pack=request.name, version=current.version + 1, stage="queued"
            )
            return await self.operations.start(
                tenant,
                "RefreshPack",
                None,
                metadata,
                payload=build_payload(request.name, template),
                exempt=self._quota_exempt(context),
                reservation=(pack_id, reservation),
            )
        except BaseException:
            await asyncio.to_thread(self.release_pack, tenant, pack_id, reservation)
            raise

    def _reserve_refresh(self, tenant: str, pack_id: str, name: str) -> str:
        try:
            return self.operations.reserve(tenant, pack_id)
        except ReservationConflict as conflict:
            raise FailedPrecondition(
                "PACK_BUILDING",
                f"{name} is being built by {conflict.holder}; wait for it to finish",
                [("PACK_BUILDING", name, conflict.holder)],
            ) from None

    # --- EstimatePackSize ---------------------------------------------------------------------------

    async def EstimatePackSize(self, request, context):
        tenant = self._parent(request.parent, context)
        fraction = request.sample_fraction or DEFAULT_SAMPLE_FRACTION
        problems: list[tuple[str, str]] = []
        if not request.HasField("spec"):
            problems.append(("spec", "required"))
        if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
            problems.append(("sample_fraction", f"must be in (0, 1], got {request.sample_fraction}"))
        if problems:
            raise InvalidArgument(problems)
        validate_spec(request.spec, request.options, field="spec")
        await asyncio.to_thread(self.check_references, tenant, request.spec, "spec")
        shard = sample_shard(fraction)
        actual = shard_fraction(shard)

        def estimate() -> BitMap:
            result = pack_builder.build_pack(
                self.dataset(),
                request.spec,
                request.options,
                resolve_pack=self.packs.resolve_pack(tenant),
                shard=shard,
                tenant=tenant,
            )
            return result.bitmap

        async with self._estimates:
            sample = await asyncio.to_thread(estimate)
        caller = self.tenancy.caller(context)
        if is_exact_for(caller):
            sample_size, disclosure = len(sample), pack_pb2.SIZE_DISCLOSURE_EXACT
        else:
            sample_size, _, disclosure = await asyncio.to_thread(
                self.discloser.estimate, tenant, sample, 1.0 / actual
            )
        estimated, lower, upper = scale_estimate(sample_size, actual)
        if disclosure != pack_pb2.SIZE_DISCLOSURE_EXACT and (
            disclosure != pack_pb2.SIZE_DISCLOSURE_NOISY
            or estimated < self.settings.privacy_min_reported_size
        ):
            sample_size = estimated = lower = upper = 0
            disclosure = disclosure if disclosure != pack_pb2.SIZE_DISCLOSURE_NOISY else BELOW_MINIMUM
        return audience_service_pb2.EstimatePackSizeResponse(
            estimated_size=estimated,
            sample_size=sample_size,
            sample_fraction=actual,
            lower_bound=lower,
            upper_bound=upper,
            disclosure=disclosure,
        )

    # --- GetPack / ListPacks / DeletePack -----------------------------------------------------------

    async def GetPack(self, request, context):
        tenant, pack_id = self._pack(request.name, context)
        caller = self.tenancy.caller(context)
        try:
            pack = await asyncio.to_thread(self.packs.get, tenant, pack_id)
            return await asyncio.to_thread(self.discloser.pack, pack, caller)
        except NotFound:
            building = await asyncio.to_thread(self._building_op, tenant, pack_id)
            if building:  # first version still being built (in this process)
                return pack_pb2.Pack(name=request.name, state=pack_pb2.Pack.STATE_BUILDING)
            raise

    async def ListPacks(self, request, context):
        tenant = self._parent(request.parent, context)
        if not 0 <= request.page_size <= 1000:
            raise InvalidArgument(
                "page_size", f"must be between 1 and 1000 (0 = default 50), got {request.page_size}"
            )
        packs, token = await asyncio.to_thread(
            self.packs.list,
            tenant,
            page_size=request.page_size or 50,
            page_token=request.page_token,
            filter=request.filter,
        )
        caller = self.tenancy.caller(context)
        shown = await asyncio.to_thread(lambda: [self.discloser.pack(pack, caller) for pack in packs])
        return audience_service_pb2.ListPacksResponse(packs=shown, next_page_token=token)

    async def DeletePack(self, request, context):
        tenant, pack_id = self._pack(request.name, context)
        running = await asyncio.to_thread(self._building_op, tenant, pack_id)
        if running is not None:
            raise FailedPrecondition(
                "PACK_BUILDING",
                f"{request.name} is being built by {running or 'another call'}; cancel or wait for it first",
                [("PACK_BUILDING", request.name, running or "build in progress")],
            )
        await asyncio.to_thread(self.packs.delete, tenant, pack_id)
        self.membership.invalidate(tenant, pack_id)
        return empty_pb2.Empty()

    # --- CheckMembership ----------------------------------------------------------------------------

    async def CheckMembership(self, request, context):
        self.tenancy.require_members(context)
        tenant = self._parent(request.parent, context)
        n_packs, n_ids = len(request.packs), len(request.user_ids)
        if not 1 <= n_packs <= MAX_CHECK_PACKS or not 1 <= n_ids <= MAX_CHECK_IDS:
            problems = []
            if not 1 <= n_packs <= MAX_CHECK_PACKS:
                problems.append(("packs", f"between 1 and {MAX_CHECK_PACKS} packs, got {n_packs}"))
            if not 1 <= n_ids <= MAX_CHECK_IDS:
                problems.append(("user_ids", f"between 1 and {MAX_CHECK_IDS} ids, got {n_ids}"))
            raise InvalidArgument(problems)
        targets: list[tuple[bool, str]] = []  # (is live, id)
        for i, name in enumerate(request.packs):
            live = is_live_pack_name(name)
            if live:
                pack_tenant, pack_id = parse_live_pack_name(name, f"packs[{i}]")
            else:
                pack_tenant, pack_id = parse_pack_name(name, f"packs[{i}]")
            if pack_tenant != tenant:  # another tenant's pack: as if it did not exist
                raise NotFound(LIVE_PACK_TYPE if live else PACK_TYPE, name)
            targets.append((live, pack_id))
        bitmaps: list[BitMap] = []
        dense: list[np.ndarray | None] = []
        versions: list[int] = []
        for (live, pack_id), name in zip(targets, request.packs, strict=True):
            if live:
                if self.live_packs is None:  # no live-pack service in this process
                    raise NotFound(LIVE_PACK_TYPE, name)
                version, bitmap = self.live_packs.live_members(tenant, pack_id)
                bitmaps.append(bitmap)
                dense.append(None)
            else:
                cached = await self.membership.get(tenant, pack_id)
                version = cached.version
                bitmaps.append(cached.bitmap)
                dense.append(cached.dense)
            versions.append(version)
        flags = check_batch(bitmaps, as_user_ids(request.user_ids), dense)
        return membership_response(request.packs, versions, flags)

    # --- ExportPack ---------------------------------------------------------------------------------

    async def ExportPack(self, request, context) -> AsyncIterator[audience_service_pb2.ExportPackResponse]:
        self.tenancy.require_members(context)
        tenant, pack_id = self._pack(request.name, context)
        problems: list[tuple[str, str]] = []
        if request.format in _REFUSED_EXPORTS:
            problems.append(
                (
                    "format",
                    f"{ExportFormat.Name(request.format)} is refused: plain digests of identifiers are "
                    f"not exported (they are brute-forced back to the person); use "
                    f"{_REFUSED_EXPORTS[request.format]} (HMAC under the platform pepper, for "
                    "platform-internal joins) or EXPORT_FORMAT_USER_ID",
                )
            )
        elif request.format not in ExportFormat.values() or request.format == 0:
            problems.append(("format", "required: USER_ID, KEYED_SHA256_PHONE or KEYED_SHA256_OAID"))
        if not 0 <= request.page_size <= MAX_EXPORT_PAGE:
            problems.append(
                ("page_size", f"must be between 1 and {MAX_EXPORT_PAGE} (0 = default {DEFAULT_EXPORT_PAGE})")
            )
        if request.version < 0:
            problems.append(("version", "must not be negative"))
        if problems:
            raise InvalidArgument(problems)
        page_size = request.page_size or DEFAULT_EXPORT_PAGE
        version, offset = request.version, 0
        if request.page_token:
            token = ExportToken.decode(request.page_token)
            if token.name != request.name:
                raise InvalidArgument("page_token", "token belongs to another pack")
            if request.version and token.version != request.version:
                raise InvalidArgument(
                    "page_token", f"token belongs to version {token.version}, not {request.version}"
                )
            if token.format != request.format:
                raise InvalidArgument("page_token", "token belongs to an export in another format")
            version, offset = token.version, token.offset

        bitmap, pack = await asyncio.to_thread(self.packs.load_bitmap, tenant, pack_id, version)
        members = np.frombuffer(bitmap.to_array(), dtype=np.uint32)
        total = len(members)
        if offset > total:
            raise InvalidArgument("page_token", "offset beyond the end of the pack")
        keyed = _KEYED_EXPORTS.get(request.format)
        digests: pl.Series | None = None
        digest_ids = np.zeros(0, dtype=np.uint32)
        if keyed is not None:
            frame = await asyncio.to_thread(self._identity_of, members[offset:], *keyed)
            digests, digest_ids = frame.get_column("digest"), frame.get_column("user_id").to_numpy()
        start = offset
        while True:
            end = min(start + page_size, total)
            next_token = (
                ExportToken(request.name, pack.version, request.format, end).encode() if end < total else ""
            )
            response = audience_service_pb2.ExportPackResponse(
                next_page_token=next_token, exported=end, total=total
            )
            page = members[start:end]
            if digests is None:
                response.user_ids.extend(page.tolist())
            elif len(page):
                # digests are sorted by user id: this page's users own one contiguous run of them.
                lo = int(np.searchsorted(digest_ids, page[0], side="left"))
                hi = int(np.searchsorted(digest_ids, page[-1], side="right"))
                response.hashed_ids.extend(digests.slice(lo, hi - lo).to_list())
            yield response
            if end >= total:
                return
            start = end

    def _identity_of(self, members: np.ndarray, id_type: int, column: str) -> pl.DataFrame:
        """Keyed hashes of ``members`` for one id type, sorted by user id (then key). Blocking."""
        wanted = pl.LazyFrame({"user_id": members}, schema={"user_id": pl.UInt32})
        identity = self.dataset().scan_identity()
        check_identity_pepper(identity, self.pepper)  # one key space per export, the service's own
        return (
            identity.select("user_id", "id_type", column)
            .filter(pl.col("id_type") == id_type)
            .join(wanted, on="user_id", how="semi")
            .select("user_id", pl.col(column).alias("digest"))
            .sort("user_id", "digest")
            .collect()
        )

    # --- UploadPack ---------------------------------------------------------------------------------

    async def UploadPack(self, request_iterator, context):
        reserved: list[tuple[str, str, str]] = []
        quotas = None if self._quota_exempt(context) else self.quotas

        async def on_header(header: UploadHeader) -> None:
            self.tenancy.authorize(context, header.tenant)
            if header.user_ids:  # a tenant holds no platform user ids: member-level, platform only
                self.tenancy.require_members(context)
            if quotas is not None:  # refuse before the rows are streamed when none is left today
                await asyncio.to_thread(quotas.require_room, header.tenant, quotas.limits.uploads_per_day)
            name = pack_name(header.tenant, header.pack_id)
            holder = await asyncio.to_thread(self.reserve_pack, header.tenant, header.pack_id, "upload")
            reserved.append((header.tenant, header.pack_id, holder))
            if await asyncio.to_thread(self.packs.exists, header.tenant, header.pack_id):
                raise AlreadyExists(PACK_TYPE, name)

        try:
            upload = await read_upload(
                request_iterator, max_rows=self.settings.upload_max_rows, on_header=on_header
            )
            header = upload.header

            def work() -> tuple[pack_pb2.Pack, pack_pb2.UploadStats, list[Any]]:
                grant = None
                if quotas is not None:  # one upload and its rows, both or neither; refunded on failure
                    limits = quotas.limits
                    grant = quotas.charge(
                        header.tenant,
                        [(limits.uploads_per_day, 1), (limits.upload_rows_per_day, len(upload.rows))],
                    )
                try:
                    return publish()
                except BaseException:
                    if grant is not None:
                        grant.refund()
                    raise

            def publish() -> tuple[pack_pb2.Pack, pack_pb2.UploadStats, list[Any]]:
                if header.user_ids:
                    checked = check_user_ids(upload.rows)
                    users = self.dataset().scan_profiles(["user_id"])
                    bitmap, matched = match_user_ids(users, checked.hashes)
                else:
                    checked = check_rows(
                        upload.rows, hash_length=header.hash_length, hash_label=header.hash_label
                    )
                    identity = self.dataset().scan_identity()
                    check_identity_pepper(identity, self.pepper)
                    keys = key_upload(self.pepper, checked.hashes)
                    bitmap, matched = match_rows(identity, header.id_type, header.key_column, keys)
                stats = upload_stats(checked, matched)
                template = pack_pb2.Pack(
                    display_name=header.header.display_name,
                    labels=header.header.labels,
                    source=pack_pb2.Pack.SOURCE_UPLOAD,
                    upload_stats=stats,
                )
                if header.header.HasField("ttl"):
                    template.ttl.CopyFrom(header.header.ttl)
                stored = self.packs.publish_version(header.tenant, header.pack_id, bitmap, template)
                for outcome, rows in (
                    ("valid", stats.valid),
                    ("invalid", stats.invalid),
                    ("matched", stats.matched),
                ):
                    UPLOAD_ROWS.add(rows, {"outcome": outcome})
                PACK_SIZE.record(stored.size, {attributes.PACK_KIND: "upload"})
                return stored, stats, invalid_row_messages(checked)

            stored, stats, invalid = await asyncio.to_thread(work)
            span = trace.get_current_span()
            span.set_attribute(attributes.TENANT, header.tenant)
            span.set_attribute(attributes.PACK_NAME, stored.name)
            span.set_attribute(attributes.PACK_SIZE, stored.size)
            span.set_attribute(attributes.UPLOAD_RECEIVED, stats.received)
            span.set_attribute(attributes.UPLOAD_MATCHED, stats.matched)
            span.set_attribute(attributes.UPLOAD_INVALID, stats.invalid)
        finally:
            for tenant, pack_id, holder in reserved:
                await asyncio.to_thread(self.release_pack, tenant, pack_id, holder)
        shown = await asyncio.to_thread(self.discloser.pack, stored, self.tenancy.caller(context))
        return audience_service_pb2.UploadPackResponse(
            pack=shown, stats=shown.upload_stats, invalid_rows=invalid
        )

    # --- GetPackPersona -----------------------------------------------------------------------------

    async def GetPackPersona(self, request, context):
        tenant, pack_id = self._pack(request.name, context)
        if not 0 <= request.top_n <= MAX_PERSONA_TOP_N:
            raise InvalidArgument(
                "top_n", f"must be between 1 and {MAX_PERSONA_TOP_N} (0 = default {DEFAULT_PERSONA_TOP_N})"
            )
        top_n = request.top_n or DEFAULT_PERSONA_TOP_N
        minimum = self.settings.persona_min_size
        bitmap, pack = await asyncio.to_thread(self.packs.load_bitmap, tenant, pack_id)
        caller = self.tenancy.caller(context)
        noise = (
            None
            if is_exact_for(caller)
            else await asyncio.to_thread(
                self.discloser.persona_noise, tenant, fingerprint_of_pack(pack), request.name
            )
        )

        return await self.compute.persona(
            bitmap,
            top_n=top_n,
            min_size=minimum,
            pack=request.name,
            version=pack.version,
            bots_excluded_at_build=pack.build_stats.bots_excluded,
            noise=noise,
        )


def _check_pack_fields(pack: pack_pb2.Pack, path: str) -> None:
    problems = []
    if pack.HasField("ttl") and (pack.ttl.seconds < 0 or pack.ttl.nanos < 0):
        problems.append((f"{path}.ttl", "must not be negative"))
    if len(pack.display_name) > 200:
        problems.append((f"{path}.display_name", "at most 200 characters"))
    for key, value in pack.labels.items():
        if not key or len(key) > 63:
            problems.append((f"{path}.labels", f"label key {key[:70]!r} must be 1-63 characters"))
        if len(value) > 63:
            problems.append((f"{path}.labels[{key}]", "label values are at most 63 characters"))
    if problems:
        raise InvalidArgument(problems)


def _references(spec: spec_pb2.PackSpec, path: str) -> Iterator[tuple[spec_pb2.PackReference, str]]:
    """Every pack reference in a spec tree, with its field path."""
    kind = spec.WhichOneof("node")
    if kind == "pack":
        yield spec.pack, f"{path}.pack"
    elif kind in ("union", "intersect"):
        for i, operand in enumerate(getattr(spec, kind).operands):
            yield from _references(operand, f"{path}.{kind}.operands[{i}]")
    elif kind == "exclude":
        yield from _references(spec.exclude.base, f"{path}.exclude.base")
        for i, operand in enumerate(spec.exclude.subtract):
            yield from _references(operand, f"{path}.exclude.subtract[{i}]")


__all__ = [
    "AudienceServicer",
    "ExportToken",
    "LiveMembership",
    "sample_shard",
    "scale_estimate",
    "shard_fraction",
]
