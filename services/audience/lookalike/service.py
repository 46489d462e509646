"""``LookalikeService``: train clustering models and expand seed packs, as long-running operations.

Served by the audience process (``services.audience.server`` imports ``lookalike_service(app)``
from here) with the same object store, pack store, tenancy and operation manager as
``AudienceService``: ExpandLookalike's operations are ordinary ``tenants/{t}/operations/{id}``.

Every check that can fail is done before the operation starts, so a bad request fails the call
itself and nothing is written (the pack store makes a version visible only after data and manifest):

=====================  ===========================================================================
INVALID_ARGUMENT       malformed names/ids (field named); ``reach_fraction`` outside [1%, 20%];
                       ``reach_size`` outside [1, 20% of the model's population]; no reach;
                       ``seed_pack`` below the minimum seed size (``FLASHCROWD_LOOKALIKE_MIN_SEED``,
                       default 100) counted in the pack *and* in the model's population — the
                       message gives both numbers; ``profile`` with unknown values;
                       ``cluster_count`` outside [2, 1024] or above the population (0 = chosen from
                       the population); ``feature_exclusions[i]`` empty or with unknown event types;
                       ``model_version`` < 0; ``min_seed_size`` below the platform's floor
                       (``FLASHCROWD_LOOKALIKE_MIN_SEED_FLOOR``, default 20); unknown
                       ``seed_weighting``; ``refresh_policy.interval`` outside [1 hour, 30 days];
                       ExportLookalikeScores: ``page_size``, ``version``, ``max_tier``, ``name`` of
                       a pack that is not a lookalike (``NOT_A_LOOKALIKE``)
NOT_FOUND              unknown or other tenants' ``seed_pack`` / ``exclude_packs[i]`` /
                       ``negative_seed_packs[i]`` (exactly as if missing); unknown ``model`` or
                       ``model_version``; an export's unknown pack or version
PERMISSION_DENIED      ExportLookalikeScores without a platform principal holding ``members.read``
FAILED_PRECONDITION    ``LOOKALIKE_SCORES_MISSING``: an export of a version expanded before scores
                       were stored; no model trained yet; the model was built from another feature schema (or
                       its snapshot is gone); no event dataset; fewer eligible users than the reach;
                       ``MODEL_VERSION_GONE``: a refresh's pinned model version no longer exists
ALREADY_EXISTS         ``pack_id`` names a pack that is not a lookalike (a lookalike pack gets a
                       new version: re-expanding is how a lookalike is refreshed)
=====================  ===========================================================================

A refresh (re-expanding into an existing lookalike pack) uses the model version the pack's previous
expansion used unless ``refresh_model`` (or ``model_version``) says otherwise; the behaviour that
defines the seed pack's spec is kept out of the features automatically (``pipeline`` module doc).

Training operations belong to the caller's tenant when the gateway names one, else to the
``FLASHCROWD_LOOKALIKE_OPERATIONS_TENANT`` (default ``platform``): models are platform-wide
(``lookalikeModels/{m}``), trained over the whole population. Bots (the audience service's rule)
are removed from seeds and never selected, unless ``FLASHCROWD_LOOKALIKE_EXCLUDE_BOTS=false``.

Quotas (``services/audience/quotas.py``; RESOURCE_EXHAUSTED ``TENANT_QUOTA`` naming the limit, and a
refused call consumes nothing): a tenant principal's accepted expansions per UTC day
(``FLASHCROWD_TENANT_MAX_EXPANSIONS_PER_DAY``, checked before the seed is read and charged once
every other check passed) and its queued builds; accepted trainings per day of the operation's
owner (``FLASHCROWD_MAX_TRAININGS_PER_DAY``, the one limit platform principals are held to, since
only they train).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from flashcrowd.audience.v1 import audience_service_pb2, lookalike_pb2, lookalike_pb2_grpc, pack_pb2, spec_pb2
from opentelemetry import trace
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from pyroaring import BitMap

from services.audience.lookalike import pipeline
from services.audience.lookalike.expand import (
    MAX_REACH_FRACTION,
    MIN_REACH_FRACTION,
    ExpandError,
    resolve_reach,
)
from services.audience.lookalike.jobs import EXPAND_KIND, TRAIN_KIND, expansion_payload
from services.audience.lookalike.messages import (
    WEIGHTING_NAMES,
    exclusion_from_proto,
    model_proto,
    tiers_proto,
)
from services.audience.lookalike.model import MODEL_ID
from services.audience.lookalike.scores import read_scores
from services.audience.operations import OperationManager, PackClaims, ReservationConflict
from services.audience.packstore import PackStore
from services.audience.quotas import Grant, TenantQuotas
from services.audience.tenancy import (
    PACK_TYPE,
    Tenancy,
    check_id,
    pack_name,
    parse_pack_name,
    parse_parent,
)
from services.events.dataset import EventDataset
from services.runtime import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceDefinition,
    load_settings,
)
from services.runtime.assertion import require_platform
from services.runtime.scopes import MEMBERS_READ, MODELS_TRAIN
from services.storage import ObjectStore

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("flashcrowd.audience.lookalike")

LOOKALIKE_SERVICE = lookalike_pb2.DESCRIPTOR.services_by_name["LookalikeService"].full_name
MODEL_TYPE = "flashcrowd.dev/LookalikeModel"
MAX_CLUSTERS = 1024
MAX_MIN_SEED = 1_000_000
MIN_REFRESH_SECONDS, MAX_REFRESH_SECONDS = 3_600, 30 * 86_400
DEFAULT_SCORE_PAGE, MAX_SCORE_PAGE = 10_000, 100_000
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799

__all__ = [
    "LOOKALIKE_SERVICE",
    "LookalikeDeps",
    "LookalikeServicer",
    "LookalikeSettings",
    "lookalike_service",
    "model_proto",
]


class LookalikeSettings(BaseSettings):
    """``FLASHCROWD_LOOKALIKE_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="FLASHCROWD_LOOKALIKE_", extra="ignore", frozen=True)

    #: Where snapshots, models and expansion records live in the store.
    root: str = "lookalike/"
    #: Smallest seed expanded (members in the pack and in the model's population).
    min_seed: int = Field(default=100, ge=1)
    #: The lowest ``min_seed_size`` a request may ask for (the platform's floor).
    min_seed_floor: int = Field(default=20, ge=1)
    #: Remove bots from seeds and never select them.
    exclude_bots: bool = True
    #: Tenant that owns training operations of direct (non-gateway) callers.
    operations_tenant: str = "platform"


def _model_id(name: str, field: str) -> str:
    try:
        return pipeline.model_id_of(name)
    except ValueError as error:
        raise InvalidArgument(field, str(error)) from None


@dataclass(frozen=True)
class LookalikeDeps:
    """What the LookalikeService needs of the audience process."""

    store: ObjectStore
    packs: PackStore
    operations: OperationManager
    tenancy: Tenancy
    claims: PackClaims
    #: A snapshot of the event dataset (blocking; FAILED_PRECONDITION when there is none).
    dataset: Callable[[], EventDataset]
    quotas: TenantQuotas | None = None


class LookalikeServicer(lookalike_pb2_grpc.LookalikeServiceServicer):
    """The three RPCs; see the module doc."""

    def __init__(self, deps: LookalikeDeps, settings: LookalikeSettings | None = None) -> None:
        self.deps = deps
        self.settings = settings or LookalikeSettings()
        self.root = self.settings.root if self.settings.root.endswith("/") else self.settings.root + "/"

    @property
    def store(self) -> ObjectStore:
        return self.deps.store

    # --- helpers --------------------------------------------------------------------------------

    def _own_pack(self, tenant: str, name: str, field: str) -> str:
        ref_tenant, ref_pack = parse_pack_name(name, field)
        if ref_tenant != tenant:  # another tenant's pack: exactly as if it did not exist
            raise NotFound(PACK_TYPE, name, description=f"named by {field}", metadata={"field": field})
        return ref_pack

    def _bitmap(self, tenant: str, pack_id: str, field: str) -> tuple[BitMap, pack_pb2.Pack]:
        try:
            return self.deps.packs.load_bitmap(tenant, pack_id)
        except NotFound:
            raise NotFound(
                PACK_TYPE,
                pack_name(tenant, pack_id),
                description=f"named by {field}",
                metadata={"field": field},
            ) from None

    def _bots(self) -> BitMap:
        if not self.settings.exclude_bots:
            return BitMap()
        from services.audience.bots import bot_bitmap

        return bot_bitmap(self.deps.dataset())

    # --- RPCs -----------------------------------------------------------------------------------

    async def GetLookalikeModel(self, request, context):
        model_id = _model_id(request.name, "name")
        try:
            model = await asyncio.to_thread(pipeline.resolve_model, self.store, self.root, model_id)
        except pipeline.LookalikeError as error:
            raise pipeline.as_service_error(error, "name") from None
        return model_proto(model)

    async def TrainLookalikeModel(self, request, context):
        # Models are platform-owned and every tenant expands with them: no tenant may change them.
        require_platform(context, MODELS_TRAIN)
        problems: list[tuple[str, str]] = []
        if not request.model_id:
            problems.append(("model_id", "required"))
        elif not MODEL_ID.fullmatch(request.model_id):
            problems.append(("model_id", f"invalid id {request.model_id[:80]!r}: 1-63 chars of [a-z0-9-], "
                                         "starting with a letter"))  # fmt: skip
        clusters = request.cluster_count or None  # None: chosen from the population (model.py)
        if clusters is not None and not 2 <= clusters <= MAX_CLUSTERS:
            problems.append(
                ("cluster_count", f"{request.cluster_count} is outside [2, {MAX_CLUSTERS}] (0 = chosen from "
                                  "the population)")
            )  # fmt: skip
        problems.extend(exclusion_from_proto(request.feature_exclusions)[1])
        if request.HasField("as_of") and not (
            _MIN_SECONDS <= request.as_of.seconds <= _MAX_SECONDS and 0 <= request.as_of.nanos < 10**9
        ):
            problems.append(("as_of", "not a valid timestamp (years 1-9999)"))
        if problems:
            raise InvalidArgument(problems)
        tenant = self.deps.tenancy.trusted_tenant(context) or self.settings.operations_tenant
        dataset = await asyncio.to_thread(self.deps.dataset)
        population = dataset.population_size()
        if clusters is not None and clusters > population:
            raise InvalidArgument(
                "cluster_count", f"{clusters} clusters for a population of {population:,} users"
            )
        name = f"lookalikeModels/{request.model_id}"
        metadata = lookalike_pb2.TrainLookalikeModelMetadata(model=name, stage="queued")
        try:  # one training of a model id at a time, across replicas
            holder = await asyncio.to_thread(self.deps.operations.reserve, tenant, name)
        except ReservationConflict:
            raise AlreadyExists(MODEL_TYPE, name, description="being trained") from None

        grant: Grant | None = None
        try:
            quotas = self.deps.quotas
            if quotas is not None:  # the training limit holds for every caller (only platform trains)
                grant = await asyncio.to_thread(quotas.charge, tenant, [(quotas.limits.trainings_per_day, 1)])
            return await self.deps.operations.start(
                tenant,
                TRAIN_KIND,
                None,
                metadata,
                payload=request.SerializeToString(),  # any replica or worker trains it (jobs.py)
                exempt=True,  # platform principals are not held to a tenant's queued-builds limit
                reservation=(name, holder),
            )
        except BaseException:
            await asyncio.to_thread(self.deps.operations.release, tenant, name, holder)
            if grant is not None:
                await asyncio.to_thread(grant.refund)
            raise

    async def ExpandLookalike(self, request, context):
        tenant = self.deps.tenancy.authorize(context, parse_parent(request.parent, "parent"))
        problems: list[tuple[str, str]] = []
        try:
            check_id(request.pack_id, "pack_id", "pack id")
        except InvalidArgument as error:
            problems.extend(error.violations)
        if not request.seed_pack:
            problems.append(("seed_pack", "required (tenants/{tenant}/packs/{pack})"))
        reach = request.WhichOneof("reach")
        fraction = request.reach_fraction if reach == "reach_fraction" else None
        size = request.reach_size if reach == "reach_size" else None
        if reach is None:
            problems.append(("reach_fraction", f"set reach_fraction in [{MIN_REACH_FRACTION:g}, "
                                               f"{MAX_REACH_FRACTION:g}] or reach_size"))  # fmt: skip
        elif fraction is not None:
            try:
                resolve_reach(1_000_000, fraction=fraction)
            except ExpandError as error:
                problems.append((error.field, f"{fraction:g} is outside [{MIN_REACH_FRACTION:g}, "
                                              f"{MAX_REACH_FRACTION:g}] of the population"))  # fmt: skip
        elif size is not None and size < 1:
            problems.append(("reach_size", f"{size} users: must be at least 1"))
        if request.HasField("profile"):
            problems.extend(_profile_violations(request.profile))
        model_id = _model_id(request.model, "model") if request.model else ""
        if request.model_version < 0:
            problems.append(
                ("model_version", f"{request.model_version}: must be 0 (pinned/newest) or a version")
            )
        exclusion, exclusion_problems = exclusion_from_proto(request.feature_exclusions)
        problems.extend(exclusion_problems)
        floor = min(self.settings.min_seed_floor, self.settings.min_seed)
        if request.min_seed_size and not floor <= request.min_seed_size <= MAX_MIN_SEED:
            default = self.settings.min_seed
            problems.append(
                ("min_seed_size", f"{request.min_seed_size}: must be 0 (the server's {default}) or in "
                                  f"[{floor}, {MAX_MIN_SEED:,}] (the platform's floor is {floor})")
            )  # fmt: skip
        if request.seed_weighting not in WEIGHTING_NAMES:
            problems.append(("seed_weighting", f"unknown value {request.seed_weighting}"))
        policy = request.refresh_policy
        interval = pipeline.DEFAULT_REFRESH_SECONDS
        if policy.HasField("interval"):
            seconds = policy.interval.seconds + policy.interval.nanos / 1e9
            if not MIN_REFRESH_SECONDS <= seconds <= MAX_REFRESH_SECONDS:
                problems.append(("refresh_policy.interval", f"{seconds:g}s is outside [1 hour, 30 days]"))
            interval = int(seconds)
        if problems:
            raise InvalidArgument(problems)
        domain = pipeline.ExpandRequest(
            tenant=tenant,
            pack_id=request.pack_id,
            seed_pack=self._own_pack(tenant, request.seed_pack, "seed_pack"),
            exclude_packs=[
                self._own_pack(tenant, n, f"exclude_packs[{i}]") for i, n in enumerate(request.exclude_packs)
            ],
            model_id=model_id,
            reach_fraction=fraction,
            reach_size=size,
            include_seed=request.include_seed,
            age_bands=tuple(request.profile.age_bands),
            genders=tuple(request.profile.genders),
            regions=tuple(request.profile.regions),
            interests=tuple(request.profile.interests),
            model_version=request.model_version,
            refresh_model=request.refresh_model,
            exclusion=exclusion,
            min_seed=request.min_seed_size,
            negative_packs=[
                self._own_pack(tenant, n, f"negative_seed_packs[{i}]")
                for i, n in enumerate(request.negative_seed_packs)
            ],
            seed_weighting=WEIGHTING_NAMES[request.seed_weighting],
            refresh_interval_seconds=interval,
            refresh_on_seed=not policy.ignore_seed_versions,
            refresh_manual=policy.manual,
        )

        def prepare() -> pipeline.PreparedExpansion:
            return pipeline.prepare_expansion(
                self.store,
                self.root,
                self.deps.packs,
                self.deps.dataset,
                domain,
                min_seed=self.settings.min_seed,
                bots=self._bots(),
            )

        name = pack_name(tenant, request.pack_id)
        quotas = self.deps.quotas if TenantQuotas.applies_to(self.deps.tenancy.caller(context)) else None
        if quotas is not None:  # refuse before reading the seed when no expansion is left today
            await asyncio.to_thread(quotas.require_room, tenant, quotas.limits.expansions_per_day)
        holder = await asyncio.to_thread(
            self.deps.claims.reserve_pack, tenant, request.pack_id, "lookalike expansion"
        )
        grant: Grant | None = None
        try:
            prepared = await asyncio.to_thread(prepare)
            metadata = audience_service_pb2.BuildPackMetadata(
                pack=name, version=prepared.version, stage="queued"
            )
            if quotas is not None:
                grant = await asyncio.to_thread(
                    quotas.charge, tenant, [(quotas.limits.expansions_per_day, 1)]
                )
            payload = expansion_payload(
                prepared, exclude_bots=self.settings.exclude_bots, min_seed=self.settings.min_seed
            )
            return await self.deps.operations.start(
                tenant,
                EXPAND_KIND,
                None,
                metadata,
                payload=payload,  # any replica or worker ranks and publishes it (jobs.py)
                exempt=quotas is None,
                reservation=(request.pack_id, holder),
            )
        except BaseException:
            await asyncio.to_thread(self.deps.claims.release_pack, tenant, request.pack_id, holder)
            if grant is not None:
                await asyncio.to_thread(grant.refund)
            raise

    async def ExportLookalikeScores(self, request, context):
        # Per-member ranks are member-level data: platform principals only (tenants see tier sizes).
        require_platform(context, MEMBERS_READ)
        tenant, pack_id = parse_pack_name(request.name, "name")
        self.deps.tenancy.authorize(context, tenant, resource_type=PACK_TYPE, name=request.name)
        problems: list[tuple[str, str]] = []
        if request.version < 0:
            problems.append(("version", "must not be negative (0 = the latest)"))
        if not 0 <= request.page_size <= MAX_SCORE_PAGE:
            problems.append(
                ("page_size", f"must be between 1 and {MAX_SCORE_PAGE:,} (0 = {DEFAULT_SCORE_PAGE:,})")
            )
        if request.HasField("max_tier") and request.max_tier < 0:
            problems.append(("max_tier", "must not be negative (unset = every tier)"))
        if problems:
            raise InvalidArgument(problems)
        pack = await asyncio.to_thread(self._pack_version, tenant, pack_id, request.version)
        if pack.source != pack_pb2.Pack.SOURCE_LOOKALIKE:
            raise InvalidArgument("name", f"{request.name} is not a lookalike pack", reason="NOT_A_LOOKALIKE")
        ranked = await asyncio.to_thread(read_scores, self.store, self.root, tenant, pack_id, pack.version)
        record = await asyncio.to_thread(
            pipeline.previous_expansion, self.store, self.root, tenant, pack_id, pack.version
        )
        if ranked is None:
            raise FailedPrecondition(
                "LOOKALIKE_SCORES_MISSING",
                f"{request.name} v{pack.version} was expanded before scores were stored; expand it again",
                [("LOOKALIKE_SCORES_MISSING", request.name, f"v{pack.version}")],
            )
        keep = len(ranked)
        if request.HasField("max_tier"):
            keep = int((ranked.tiers <= request.max_tier).sum())  # tiers ascend with the rank
        page = request.page_size or DEFAULT_SCORE_PAGE
        tiers = tiers_proto((record or {}).get("stats", {}).get("tiers", []))
        for start in range(0, max(keep, 1), page):
            end = min(start + page, keep)
            message = lookalike_pb2.ExportLookalikeScoresResponse(
                version=pack.version, exported=end, total=keep, tiers=tiers if start == 0 else []
            )
            message.members.extend(
                lookalike_pb2.ScoredMember(
                    user_id=int(ranked.user_ids[i]), rank=i, tier=int(ranked.tiers[i]),
                    score=float(ranked.scores[i]),
                )
                for i in range(start, end)
            )  # fmt: skip
            yield message

    def _pack_version(self, tenant: str, pack_id: str, version: int) -> pack_pb2.Pack:
        name = pack_name(tenant, pack_id)
        try:
            return self.deps.packs.get(tenant, pack_id, version)
        except NotFound:
            raise NotFound(PACK_TYPE, name, metadata={"field": "version" if version else "name"}) from None


def _profile_violations(profile: spec_pb2.ProfileFilter) -> list[tuple[str, str]]:
    from services.audience.spec_validation import violations

    found = violations(spec_pb2.PackSpec(profile=profile), field="x")
    out = []
    for path, description in found:
        path = path.replace("x.profile", "profile", 1)
        if "empty profile filter" in description:
            continue  # an empty filter here just means "no constraint"
        out.append((path, description))
    return out


def lookalike_service(deps: LookalikeDeps) -> ServiceDefinition:
    """What the audience server registers: the LookalikeService over its dependencies."""
    settings = load_settings(LookalikeSettings)
    servicer = LookalikeServicer(deps, settings)

    def register(server: grpc.aio.Server) -> None:
        lookalike_pb2_grpc.add_LookalikeServiceServicer_to_server(servicer, server)

    return ServiceDefinition(names=[LOOKALIKE_SERVICE], register=register)
