"""Train and expand end to end over an event dataset and a pack store: what the RPCs and the CLI share.

Object-store layout under ``root`` (default ``lookalike/``)::

    lookalike/features/{snapshot}/shard-000-of-004.parquet ... manifest.json   (features.py)
    lookalike/models/{model}/v{n}/centers.npy, manifest.json                  (model.py)
    lookalike/expansions/{tenant}/{pack}/v000003.json                         what made a pack version

Which features an expansion scores: the newest snapshot whose schema fingerprint equals the model's
and whose feature exclusion is the model's (the model's own snapshot, or a fresher one built with
``build_features(like_model=...)`` so that a model keeps expanding over current behaviour until it
is retrained). A model whose feature version differs from this code's, or whose schema no snapshot
has, fails with ``SchemaMismatch`` / ``SnapshotMissing`` (FAILED_PRECONDITION at the RPC), never
with a silently wrong ranking.

Which events an expansion keeps out of the features (``exclusion.py``): the model's exclusion, the
request's, and the behaviour the seed pack's spec is defined by (``FeatureExclusion.from_seed_spec``;
nothing for uploads). When that is more than the model's own exclusion, the expansion scores a
snapshot with the model's schema, at the base snapshot's ``as_of``, built without those events
(reused when it exists: its id carries the exclusion's key; built inside the operation otherwise).

Which model version: ``model_version`` when the request names one; on a refresh (re-expanding into
an existing lookalike pack) the version the previous expansion of that pack used, unless
``refresh_model`` asks for the newest; else the newest version. The expansion record and the
response name the version used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import numpy as np
from flashcrowd.audience.v1 import pack_pb2, spec_pb2
from pyroaring import BitMap

from services.audience.lookalike.exclusion import FeatureExclusion
from services.audience.lookalike.expand import (
    DEFAULT_MIN_SEED,
    ExpandError,
    ExpandResult,
    NotEnoughCandidates,
    RankingParams,
    expand,
    resolve_reach,
)
from services.audience.lookalike.features import (
    FEATURE_VERSION,
    FeatureSnapshot,
    build_snapshot,
)
from services.audience.lookalike.model import (
    DEFAULT_FITS,
    LookalikeModel,
    latest_model_id,
    load_model,
    train_model,
)
from services.audience.lookalike.scores import RankedMembers, write_scores
from services.audience.lookalike.seed_weights import spend_weights
from services.audience.packstore import PackStore
from services.audience.tenancy import PACK_TYPE
from services.events.dataset import EventDataset
from services.runtime import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ServiceError
from services.storage import ObjectNotFound, ObjectStore, read_manifest

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ROOT",
    "MODEL_NAME",
    "ExpandInputs",
    "ExpandRequest",
    "LookalikeError",
    "ModelNotFound",
    "ModelVersionGone",
    "NoModel",
    "PreparedExpansion",
    "SchemaMismatch",
    "SnapshotMissing",
    "as_service_error",
    "build_features",
    "count_eligible",
    "execute_expansion",
    "expansion_key",
    "expansion_record",
    "model_id_of",
    "population_ids",
    "prepare_expansion",
    "profile_members",
    "resolve_model",
    "run_expand",
    "seed_in_population",
    "snapshot_for",
    "train",
]

DEFAULT_ROOT = "lookalike/"
#: Meta refreshes lookalike audiences every 3 days; so does the refresh scheduler by default.
DEFAULT_REFRESH_SECONDS = 3 * 86_400
SEED_WEIGHTINGS = ("uniform", "spend")
MODEL_NAME = re.compile(r"lookalikeModels/([a-z][a-z0-9-]{0,62})")

Progress = Callable[[str, float], None]


class LookalikeError(Exception):
    """A lookalike request cannot be served in the current state; subclasses say why."""


class ModelNotFound(LookalikeError):
    def __init__(self, model_id: str, version: int | None = None) -> None:
        which = f" v{version}" if version else ""
        super().__init__(f"lookalike model lookalikeModels/{model_id}{which} not found")
        self.model_id = model_id
        self.version = version


class ModelVersionGone(LookalikeError):
    def __init__(self, model_id: str, version: int, pinned_by: str) -> None:
        super().__init__(
            f"lookalikeModels/{model_id} v{version} ({pinned_by}) no longer exists; "
            "set refresh_model (or model_version) to expand with another version"
        )
        self.model_id = model_id
        self.version = version


class NoModel(LookalikeError):
    def __init__(self) -> None:
        super().__init__("no lookalike model has been trained yet: train one (TrainLookalikeModel)")


class SchemaMismatch(LookalikeError):
    def __init__(self, model: LookalikeModel, detail: str) -> None:
        super().__init__(f"{model.name} was built from another feature schema: {detail}; retrain it")
        self.model = model
        self.detail = detail


class SnapshotMissing(LookalikeError):
    def __init__(self, model: LookalikeModel) -> None:
        super().__init__(
            f"no feature snapshot with the schema of {model.name} ({model.feature_schema}) exists "
            f"(its own snapshot {model.feature_snapshot!r} is gone); rebuild features or retrain"
        )
        self.model = model


def model_id_of(name: str) -> str:
    """``lookalikeModels/m1`` -> ``m1``; ``ValueError`` otherwise."""
    m = MODEL_NAME.fullmatch(name or "")
    if m is None:
        raise ValueError(
            f"expected lookalikeModels/{{model}} with the id 1-63 chars of [a-z0-9-], got {name!r}"
        )
    return m.group(1)


def _dataset_info(dataset: EventDataset) -> dict[str, Any]:
    return {
        "prefix": dataset.prefix,
        "version": dataset.version,
        "published_at": dataset.manifest.get("published_at"),
    }


def build_features(
    store: ObjectStore,
    dataset: EventDataset,
    *,
    root: str = DEFAULT_ROOT,
    as_of: datetime | None = None,
    like_model: LookalikeModel | None = None,
    top_categories: int = 32,
    shards: int | None = None,
    exclusion: FeatureExclusion | None = None,
    progress: Progress | None = None,
) -> FeatureSnapshot:
    """A feature snapshot of the dataset at ``as_of`` (default: the end of the data).

    With ``like_model`` the snapshot uses that model's schema (so the model can score it) and, unless
    ``exclusion`` is given, its exclusion.
    """
    as_of = as_of or dataset.end
    if exclusion is None and like_model is not None:
        exclusion = like_model.exclusion
    return build_snapshot(
        dataset.store if store is None else store,
        dataset,
        root=root,
        as_of=as_of,
        schema=like_model.schema if like_model is not None else None,
        top_categories=top_categories,
        shards=shards,
        population_estimate=dataset.population_size(),
        dataset=_dataset_info(dataset),
        exclusion=exclusion,
        progress=(lambda pct, stage: progress("features", pct / 100.0)) if progress else None,
    )


def train(
    store: ObjectStore,
    dataset: EventDataset,
    *,
    model_id: str,
    root: str = DEFAULT_ROOT,
    clusters: int | None = None,
    as_of: datetime | None = None,
    seed: int = 0,
    shards: int | None = None,
    fits: int = DEFAULT_FITS,
    exclusion: FeatureExclusion | None = None,
    progress: Progress | None = None,
) -> tuple[LookalikeModel, FeatureSnapshot]:
    """Features (reused when this dataset version/as_of/schema/exclusion was already built) + a new
    model version. ``clusters=None``: the population rule (``model.default_cluster_count``)."""
    snapshot = build_features(
        store, dataset, root=root, as_of=as_of, shards=shards, exclusion=exclusion, progress=progress
    )
    model = train_model(
        store,
        snapshot,
        model_id=model_id,
        root=root,
        clusters=clusters,
        seed=seed,
        fits=fits,
        progress=(lambda pct, stage: progress(stage, pct / 100.0)) if progress else None,
    )
    return model, snapshot


def resolve_model(
    store: ObjectStore, root: str, model_id: str | None, version: int | None = None
) -> LookalikeModel:
    """The named model's latest (or given) version, or the newest model when ``model_id`` is empty."""
    if not model_id:
        model_id = latest_model_id(store, root)
        if model_id is None:
            raise NoModel()
    try:
        return load_model(store, root, model_id, version or None)
    except ObjectNotFound:
        raise ModelNotFound(model_id, version) from None


def _snapshot_manifests(store: ObjectStore, root: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for info in store.list(f"{root}features/", recursive=True):
        if info.key.endswith("/manifest.json"):
            try:
                out.append((info.key, read_manifest(store, info.key)))
            except (ObjectNotFound, ValueError):
                continue
    return out


def snapshot_for(
    store: ObjectStore, root: str, model: LookalikeModel, exclusion: FeatureExclusion | None = None
) -> FeatureSnapshot:
    """The newest snapshot the model can score with ``exclusion`` (default: the model's own);
    ``SchemaMismatch`` / ``SnapshotMissing`` otherwise."""
    wanted = model.exclusion if exclusion is None else exclusion
    if model.feature_version != FEATURE_VERSION:
        raise SchemaMismatch(
            model, f"feature version {model.feature_version}, this server computes version {FEATURE_VERSION}"
        )
    if model.schema.fingerprint != model.feature_schema:
        raise SchemaMismatch(model, "its stored column list does not match its schema fingerprint")
    if model.centers.shape[1] != len(model.schema.columns):
        raise SchemaMismatch(
            model, f"{model.centers.shape[1]} centre dimensions for {len(model.schema.columns)} columns"
        )
    own: dict[str, Any] | None = None
    candidates = []
    for key, manifest in _snapshot_manifests(store, root):
        if manifest.get("snapshot_id") == model.feature_snapshot:
            own = manifest
        same_exclusion = FeatureExclusion.from_json(manifest.get("exclusion")) == wanted
        if manifest.get("schema_fingerprint") == model.feature_schema and same_exclusion:
            candidates.append(
                (str(manifest.get("as_of", "")), str(manifest.get("published_at", "")), key, manifest)
            )
    if own is not None and own.get("schema_fingerprint") != model.feature_schema:
        raise SchemaMismatch(
            model,
            f"its snapshot {model.feature_snapshot!r} has schema {own.get('schema_fingerprint')}, "
            f"the model {model.feature_schema}",
        )
    if not candidates:
        raise SnapshotMissing(model)
    _as_of, _published, key, manifest = max(candidates)
    return FeatureSnapshot(store, key, manifest)


def profile_members(
    dataset: EventDataset,
    *,
    age_bands: Sequence[int] = (),
    genders: Sequence[int] = (),
    regions: Sequence[str] = (),
    interests: Sequence[str] = (),
) -> np.ndarray | None:
    """Sorted user ids whose profile matches (AND across attributes, OR inside one); None = no filter."""
    if not (age_bands or genders or regions or interests):
        return None
    from services.audience.compiler import ProfileLeaf, profile_query

    leaf = ProfileLeaf(
        age_bands=tuple(int(a) for a in age_bands),
        genders=tuple(int(g) for g in genders),
        regions=tuple(regions),
        interests=tuple(interests),
    )
    ids = profile_query(dataset, leaf).collect(engine="streaming").get_column("user_id")
    return np.unique(ids.to_numpy().astype(np.uint32))


@dataclass
class ExpandInputs:
    """Everything an expansion reads, resolved (and checked) before anything is written."""

    model: LookalikeModel
    snapshot: FeatureSnapshot
    seed: np.ndarray  # sorted uint32
    exclude: np.ndarray | None = None
    allowed: np.ndarray | None = None
    population_ids: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: events kept out of the features: the model's, the request's and the seed spec's
    exclusion: FeatureExclusion = field(default_factory=FeatureExclusion)
    #: where the exclusion came from (``model``, ``request``, ``seed_spec``) -> its rules
    exclusion_sources: dict[str, list[dict[str, list[int]]]] = field(default_factory=dict)
    #: why this model version ("requested", "pinned by v3 of the pack", "newest")
    version_reason: str = ""
    #: users to move away from (negative seed packs), sorted uint32
    negative: np.ndarray | None = None
    #: the seed pack's version expanded
    seed_version: int = 0


def run_expand(
    inputs: ExpandInputs,
    *,
    reach_fraction: float | None = None,
    reach_size: int | None = None,
    include_seed: bool = False,
    min_seed: int = DEFAULT_MIN_SEED,
    params: RankingParams | None = None,
    progress: Progress | None = None,
    seed_weights: np.ndarray | None = None,
) -> ExpandResult:
    return expand(
        inputs.model,
        inputs.snapshot,
        inputs.seed,
        reach_fraction=reach_fraction,
        reach_size=reach_size,
        include_seed=include_seed,
        exclude=inputs.exclude,
        allowed=inputs.allowed,
        min_seed=min_seed,
        params=params,
        progress=progress,
        seed_weights=seed_weights,
        negative=inputs.negative,
    )


def expansion_key(root: str, tenant: str, pack_id: str, version: int) -> str:
    return f"{root}expansions/{tenant}/{pack_id}/v{version:06d}.json"


def expansion_record(
    store: ObjectStore,
    root: str,
    *,
    tenant: str,
    pack_id: str,
    version: int,
    request: dict[str, Any],
    result: ExpandResult,
    model: LookalikeModel,
    snapshot: FeatureSnapshot,
    version_reason: str = "",
    exclusion_sources: dict[str, Any] | None = None,
    inputs: Sequence[spec_pb2.PackReference] = (),
    extra: dict[str, Any] | None = None,
) -> None:
    """What made this pack version (request, model version, snapshot, exclusion, stats): for
    refreshes (the model version is pinned from it) and audits."""
    document = {
        "pack": f"tenants/{tenant}/packs/{pack_id}",
        "version": version,
        "request": request,
        "model": model.name,
        "model_version": model.version,
        "model_version_reason": version_reason,
        "feature_snapshot": snapshot.snapshot_id,
        "feature_schema": snapshot.fingerprint,
        "feature_exclusion": snapshot.exclusion.to_json(),
        "feature_exclusion_sources": exclusion_sources or {},
        "stats": result.stats(),
        "created": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        # the pack versions read (seed first, then excluded and negative packs): the refresh
        # scheduler compares the seed's with its current version
        "inputs": [{"pack": ref.pack, "version": ref.version} for ref in inputs],
        **(extra or {}),
    }
    store.put_bytes(
        expansion_key(root, tenant, pack_id, version),
        json.dumps(document, sort_keys=True, indent=1).encode(),
        "application/json",
    )


def population_ids(snapshot: FeatureSnapshot) -> np.ndarray:
    return np.sort(snapshot.user_ids())


def seed_in_population(seed: np.ndarray, population: np.ndarray) -> int:
    if len(seed) == 0 or len(population) == 0:
        return 0
    pos = np.minimum(np.searchsorted(population, seed), len(population) - 1)
    return int((population[pos] == seed).sum())


# --------------------------------------------------------------------------------------------------
# Expansion requests: resolve and check everything (nothing written), then run and publish.
# Shared by the RPC and the batch CLI; errors are the runtime's domain errors (field named).

MODEL_TYPE = "flashcrowd.dev/LookalikeModel"


def as_service_error(error: LookalikeError, field: str = "model") -> ServiceError:
    """The status a lookalike error maps to (NOT_FOUND / FAILED_PRECONDITION with the subject)."""
    if isinstance(error, ModelNotFound):
        description = f"version {error.version} does not exist" if error.version else ""
        return NotFound(
            MODEL_TYPE,
            f"lookalikeModels/{error.model_id}",
            description=description,
            metadata={"field": field},
        )
    if isinstance(error, NoModel):
        return FailedPrecondition(
            "NO_LOOKALIKE_MODEL", str(error), [("NO_LOOKALIKE_MODEL", field, "train a model first")]
        )
    if isinstance(error, SchemaMismatch):
        return FailedPrecondition(
            "FEATURE_SCHEMA_MISMATCH",
            str(error),
            [("FEATURE_SCHEMA_MISMATCH", error.model.name, error.detail)],
            metadata={
                "field": field,
                "model": error.model.name,
                "feature_schema": error.model.feature_schema,
            },
        )
    if isinstance(error, SnapshotMissing):
        return FailedPrecondition(
            "FEATURE_SNAPSHOT_MISSING",
            str(error),
            [("FEATURE_SNAPSHOT_MISSING", error.model.name, error.model.feature_snapshot)],
            metadata={"field": field},
        )
    if isinstance(error, ModelVersionGone):
        subject = f"lookalikeModels/{error.model_id}"
        return FailedPrecondition(
            "MODEL_VERSION_GONE",
            str(error),
            [("MODEL_VERSION_GONE", subject, f"v{error.version}")],
            metadata={"field": field, "model": subject, "version": str(error.version)},
        )
    return FailedPrecondition("LOOKALIKE_UNAVAILABLE", str(error))


@dataclass
class ExpandRequest:
    """An ExpandLookalike request in domain terms (ids already parsed and owned by ``tenant``)."""

    tenant: str
    pack_id: str
    seed_pack: str
    exclude_packs: list[str] = field(default_factory=list)
    model_id: str = ""
    reach_fraction: float | None = None
    reach_size: int | None = None
    include_seed: bool = False
    age_bands: tuple[int, ...] = ()
    genders: tuple[int, ...] = ()
    regions: tuple[str, ...] = ()
    interests: tuple[str, ...] = ()
    #: a model version to use (0: pinned by the pack's previous expansion, else the newest)
    model_version: int = 0
    #: on a refresh, use the newest model version instead of the pinned one
    refresh_model: bool = False
    #: events to keep out of the features (on top of the model's and the seed spec's)
    exclusion: FeatureExclusion = field(default_factory=FeatureExclusion)
    #: smallest seed for this request (0: the server's minimum); the RPC checks the platform floor
    min_seed: int = 0
    #: packs of the tenant whose members are moved away from and never selected
    negative_packs: list[str] = field(default_factory=list)
    #: ``uniform`` or ``spend`` (seed_weights.py)
    seed_weighting: str = "uniform"
    #: the refresh scheduler's policy (refresh.py): every interval, and on a new seed version
    refresh_interval_seconds: int = DEFAULT_REFRESH_SECONDS
    refresh_on_seed: bool = True
    refresh_manual: bool = False

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ExpandRequest:
        """The inverse of ``describe`` (unknown keys ignored; missing ones take their defaults)."""
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in doc.items() if k in known}
        fields["exclusion"] = FeatureExclusion.from_json(fields.get("exclusion"))
        for name in ("age_bands", "genders", "regions", "interests"):
            fields[name] = tuple(fields.get(name) or ())
        return cls(**fields)

    @property
    def has_profile(self) -> bool:
        return bool(self.age_bands or self.genders or self.regions or self.interests)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if isinstance(v, FeatureExclusion):
                out[k] = v.to_json()
            else:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass
class PreparedExpansion:
    request: ExpandRequest
    inputs: ExpandInputs
    refs: list[spec_pb2.PackReference]
    population: int
    requested: int
    version: int  # the pack version this expansion will publish
    #: builds the excluded snapshot inside the operation when ``inputs.snapshot`` lacks the exclusion
    dataset: Callable[[], EventDataset] | None = None
    #: the minimum seed applied (the request's, else the server's)
    min_seed: int = DEFAULT_MIN_SEED
    #: the event dataset (spend weights are read from it inside the operation)
    events: Callable[[], EventDataset] | None = None


def previous_expansion(
    store: ObjectStore, root: str, tenant: str, pack_id: str, version: int
) -> dict[str, Any] | None:
    """The record of a lookalike pack version (None when there is none or it cannot be read)."""
    try:
        return json.loads(store.get_bytes(expansion_key(root, tenant, pack_id, version)))
    except (ObjectNotFound, ValueError):
        return None


def _pick_model(
    store: ObjectStore, root: str, request: ExpandRequest, previous: dict[str, Any] | None, pack_version: int
) -> tuple[LookalikeModel, str]:
    """The model version an expansion uses, and why (see the module doc)."""
    if request.model_version:
        return resolve_model(store, root, request.model_id or None, request.model_version), "requested"
    if previous is not None and not request.refresh_model:
        pinned = str(previous.get("model", ""))
        pinned_version = int(previous.get("model_version") or 0)
        m = MODEL_NAME.fullmatch(pinned)
        if m and pinned_version and (not request.model_id or request.model_id == m.group(1)):
            reason = f"pinned by v{pack_version} of the pack"
            try:
                return load_model(store, root, m.group(1), pinned_version), reason
            except ObjectNotFound:
                raise ModelVersionGone(m.group(1), pinned_version, reason) from None
    return resolve_model(store, root, request.model_id or None), "newest"


def _exclusion_snapshot(
    store: ObjectStore, root: str, model: LookalikeModel, base: FeatureSnapshot, exclusion: FeatureExclusion
) -> FeatureSnapshot | None:
    """The published snapshot with the model's schema, ``base``'s as_of and ``exclusion``, if any."""
    if exclusion == base.exclusion:
        return base
    try:
        found = snapshot_for(store, root, model, exclusion)
    except LookalikeError:
        return None
    return found if found.as_of == base.as_of else None


def _pack_bitmap(
    packs: PackStore, tenant: str, pack_id: str, field_name: str
) -> tuple[BitMap, pack_pb2.Pack]:
    try:
        return packs.load_bitmap(tenant, pack_id)
    except NotFound:
        raise NotFound(
            PACK_TYPE,
            f"tenants/{tenant}/packs/{pack_id}",
            description=f"named by {field_name}",
            metadata={"field": field_name},
        ) from None


def prepare_expansion(
    store: ObjectStore,
    root: str,
    packs: PackStore,
    dataset: Callable[[], EventDataset],
    request: ExpandRequest,
    *,
    min_seed: int = DEFAULT_MIN_SEED,
    bots: BitMap | None = None,
) -> PreparedExpansion:
    """Resolve the model, snapshot and packs, and check every limit; raise before anything is written."""
    existing = None
    with contextlib.suppress(NotFound):
        existing = packs.get(request.tenant, request.pack_id)
    if existing is not None and existing.source != pack_pb2.Pack.SOURCE_LOOKALIKE:
        raise AlreadyExists(
            PACK_TYPE,
            f"tenants/{request.tenant}/packs/{request.pack_id}",
            description="exists and is not a lookalike pack",
            metadata={"field": "pack_id"},
        )
    previous = None
    if existing is not None:
        previous = previous_expansion(store, root, request.tenant, request.pack_id, existing.version)
    try:
        model, version_reason = _pick_model(
            store, root, request, previous, existing.version if existing is not None else 0
        )
        base = snapshot_for(store, root, model)
    except LookalikeError as error:
        raise as_service_error(error, "model_version" if request.model_version else "model") from None
    seed_bitmap, seed = _pack_bitmap(packs, request.tenant, request.seed_pack, "seed_pack")
    refs = [spec_pb2.PackReference(pack=seed.name, version=seed.version)]
    seed_as_of = seed.build_stats.as_of.ToDatetime(UTC) if seed.build_stats.HasField("as_of") else None
    from_spec = FeatureExclusion.from_seed_spec(
        seed.spec if seed.HasField("spec") else None, as_of=seed_as_of
    )
    exclusion = model.exclusion.union(request.exclusion, from_spec)
    sources = {
        name: part.to_json()
        for name, part in (
            ("model", model.exclusion),
            ("request", request.exclusion),
            ("seed_spec", from_spec),
        )
        if part
    }
    snapshot = _exclusion_snapshot(store, root, model, base, exclusion)
    exclude = BitMap()
    for i, pid in enumerate(request.exclude_packs):
        bitmap, pack = _pack_bitmap(packs, request.tenant, pid, f"exclude_packs[{i}]")
        exclude |= bitmap
        refs.append(spec_pb2.PackReference(pack=pack.name, version=pack.version))
    negative = BitMap()
    for i, pid in enumerate(request.negative_packs):
        bitmap, pack = _pack_bitmap(packs, request.tenant, pid, f"negative_seed_packs[{i}]")
        negative |= bitmap
        refs.append(spec_pb2.PackReference(pack=pack.name, version=pack.version))
    min_seed = request.min_seed or min_seed
    bots = bots or BitMap()
    seed_clean = seed_bitmap - bots if bots else seed_bitmap
    exclude |= bots
    seed_ids = np.asarray(seed_clean.to_array(), dtype=np.uint32)
    if len(seed_ids) < min_seed:
        raise InvalidArgument(
            "seed_pack",
            f"{seed.name} has {len(seed_bitmap):,} members "
            f"({len(seed_bitmap) - len(seed_ids):,} of them bots); "
            f"a lookalike needs a seed of at least {min_seed:,}",
            reason="SEED_TOO_SMALL",
            metadata={"size": len(seed_ids), "minimum": min_seed},
        )
    population = population_ids(base)
    matched = seed_in_population(seed_ids, population)
    if matched < min_seed:
        raise InvalidArgument(
            "seed_pack",
            f"{seed.name} has {len(seed_ids):,} members, {matched:,} of them in the population of "
            f"{model.name} "
            f"({len(population):,} users); a lookalike needs a seed of at least {min_seed:,}",
            reason="SEED_TOO_SMALL",
            metadata={"size": len(seed_ids), "matched": matched, "minimum": min_seed},
        )
    try:
        requested = resolve_reach(len(population), fraction=request.reach_fraction, size=request.reach_size)
    except ExpandError as error:
        raise InvalidArgument(error.field, error.description) from None
    allowed = None
    if request.has_profile:
        allowed = profile_members(
            dataset(),
            age_bands=request.age_bands,
            genders=request.genders,
            regions=request.regions,
            interests=request.interests,
        )
    never = exclude | negative
    exclude_ids = np.asarray(never.to_array(), dtype=np.uint32) if never else None
    eligible = count_eligible(population, seed_ids, exclude_ids, allowed, request.include_seed)
    if eligible < requested:
        raise FailedPrecondition(
            "NOT_ENOUGH_CANDIDATES",
            f"reach asks for {requested:,} users but only {eligible:,} of the {len(population):,} "
            "are eligible "
            "after excluding the seed, the excluded and negative packs, bots and the profile constraints",
            [("NOT_ENOUGH_CANDIDATES", "reach", f"{requested} requested, {eligible} eligible")],
            metadata={"requested": requested, "eligible": eligible},
        )
    inputs = ExpandInputs(
        model=model,
        snapshot=snapshot if snapshot is not None else base,
        seed=seed_ids,
        exclude=exclude_ids,
        allowed=allowed,
        exclusion=exclusion,
        exclusion_sources=sources,
        version_reason=version_reason,
        negative=np.asarray(negative.to_array(), dtype=np.uint32) if request.negative_packs else None,
        seed_version=seed.version,
    )
    version = (existing.version if existing is not None else 0) + 1
    return PreparedExpansion(
        request, inputs, refs, len(population), requested, version, dataset if snapshot is None else None,
        min_seed=min_seed, events=dataset,
    )  # fmt: skip


def count_eligible(
    population: np.ndarray,
    seed: np.ndarray,
    exclude: np.ndarray | None,
    allowed: np.ndarray | None,
    include_seed: bool,
) -> int:
    keep = np.ones(len(population), bool)
    if not include_seed:
        keep &= ~_isin(population, seed)
    if exclude is not None:
        keep &= ~_isin(population, exclude)
    if allowed is not None:
        keep &= _isin(population, allowed)
    return int(keep.sum())


def _isin(ids: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    if len(sorted_values) == 0:
        return np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_values, ids), len(sorted_values) - 1)
    return sorted_values[pos] == ids


def display_name(request: ExpandRequest, model: LookalikeModel) -> str:
    reach = (
        f"{request.reach_fraction:.0%}"
        if request.reach_fraction is not None
        else f"{request.reach_size:,} users"
    )
    seed = f"tenants/{request.tenant}/packs/{request.seed_pack}"
    return f"lookalike {reach} of {seed} ({model.name} v{model.version})"


def execute_expansion(
    store: ObjectStore,
    root: str,
    packs: PackStore,
    prepared: PreparedExpansion,
    *,
    min_seed: int = DEFAULT_MIN_SEED,
    params: RankingParams | None = None,
    progress: Progress | None = None,
    before_publish: Callable[[], None] | None = None,
    operation: str = "",
    published: pack_pb2.Pack | None = None,
) -> tuple[pack_pb2.Pack, ExpandResult]:
    """Build the excluded snapshot if needed, rank, select exactly the reach, publish the pack
    version (source LOOKALIKE) and its record.

    ``before_publish`` runs last before anything is written (the operation's cancellation check);
    the excluded snapshot is written before it (a cache: reused by the next expansion).
    ``operation`` is recorded in the version's manifest; ``published``: that operation's version
    already exists (a re-run after its first owner died): rank again (deterministic) for the
    response, write nothing.
    """
    from services.audience.compiler import ids_to_bitmap

    started = time.monotonic()
    request, inputs = prepared.request, prepared.inputs
    if inputs.snapshot.exclusion != inputs.exclusion:
        if prepared.dataset is None:
            raise FailedPrecondition(
                "LOOKALIKE_UNAVAILABLE", "no dataset to build the excluded features from"
            )
        dataset = prepared.dataset()
        inputs.snapshot = build_snapshot(
            store, dataset, root=root, as_of=inputs.snapshot.as_of, schema=inputs.model.schema,
            dataset=_dataset_info(dataset), exclusion=inputs.exclusion,
            progress=(lambda pct, stage: progress("features", 0.15 * pct / 100.0)) if progress else None,
        )  # fmt: skip
    min_seed = prepared.min_seed
    weights, weighting_note = None, ""
    if request.seed_weighting == "spend":
        if prepared.events is None:
            raise FailedPrecondition("LOOKALIKE_UNAVAILABLE", "no dataset to read the seed's spend from")
        weighed = spend_weights(prepared.events(), request.tenant, inputs.seed, inputs.snapshot.as_of)
        weights, weighting_note = weighed.weights, weighed.note
    try:
        result = run_expand(
            inputs,
            reach_fraction=request.reach_fraction,
            reach_size=request.reach_size,
            include_seed=request.include_seed,
            min_seed=min_seed,
            params=params,
            progress=progress,
            seed_weights=weights,
        )
    except ExpandError as error:
        raise InvalidArgument(error.field, error.description) from None
    except NotEnoughCandidates as error:
        raise FailedPrecondition(
            "NOT_ENOUGH_CANDIDATES",
            str(error),
            [("NOT_ENOUGH_CANDIDATES", "reach", f"{error.requested} requested, {error.eligible} eligible")],
        ) from None
    if before_publish is not None:
        before_publish()
    pack = pack_pb2.Pack(
        display_name=display_name(request, inputs.model),
        source=pack_pb2.Pack.SOURCE_LOOKALIKE,
        inputs=prepared.refs,
    )
    if request.has_profile:
        pack.spec.profile.age_bands.extend(cast(tuple[spec_pb2.AgeBand, ...], request.age_bands))
        pack.spec.profile.genders.extend(cast(tuple[spec_pb2.Gender, ...], request.genders))
        pack.spec.profile.regions.extend(request.regions)
        pack.spec.profile.interests.extend(request.interests)
    stats = pack_pb2.BuildStats(
        dataset_version=int(inputs.snapshot.manifest.get("dataset", {}).get("version") or 0), shard="0/1"
    )
    stats.as_of.FromDatetime(inputs.snapshot.as_of)
    stats.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))
    if published is not None:
        return published, result
    ranked = _ranked_members(result)
    # The ranking first: a visible lookalike version always has its scored export (scores.py).
    write_scores(store, root, request.tenant, request.pack_id, prepared.version, ranked)
    stored = packs.publish_version(
        request.tenant, request.pack_id, ids_to_bitmap(result.members), pack, stats, operation=operation
    )
    if stored.version != prepared.version:  # another writer published in between (CLI, no claims)
        write_scores(store, root, request.tenant, request.pack_id, stored.version, ranked)
    extra = {
        "min_seed": min_seed,
        "seed_weighting": request.seed_weighting,
        "seed_weighting_note": weighting_note,
        "seed_pack_version": inputs.seed_version,
        "refresh": refresh_policy_json(request),
        "next_refresh": next_refresh(request, stored),
    }
    try:
        expansion_record(
            store, root, tenant=request.tenant, pack_id=request.pack_id, version=stored.version,
            request=request.describe(), result=result, model=inputs.model, snapshot=inputs.snapshot,
            version_reason=inputs.version_reason, exclusion_sources=inputs.exclusion_sources,
            inputs=prepared.refs, extra=extra,
        )  # fmt: skip
    except Exception:  # the pack is published; the record only serves audits and refreshes
        log.warning("could not record the expansion of %s v%d", stored.name, stored.version, exc_info=True)
    return stored, result


def _ranked_members(result: ExpandResult) -> RankedMembers:
    assert result.ranked is not None and result.ranked_tiers is not None and result.ranked_scores is not None
    return RankedMembers(result.ranked, result.ranked_tiers, result.ranked_scores)


def refresh_policy_json(request: ExpandRequest) -> dict[str, Any]:
    return {
        "interval_seconds": request.refresh_interval_seconds,
        "on_seed_version": request.refresh_on_seed and not request.refresh_manual,
        "manual": request.refresh_manual,
    }


def next_refresh(request: ExpandRequest, stored: pack_pb2.Pack) -> str | None:
    """When the scheduler re-expands this version (ISO, UTC); None for a manual policy."""
    if request.refresh_manual:
        return None
    stamp = stored.update_time if stored.HasField("update_time") else stored.create_time
    created = stamp.ToDatetime(UTC) if stamp.seconds else datetime.now(UTC)
    due = created + timedelta(seconds=request.refresh_interval_seconds)
    return due.isoformat().replace("+00:00", "Z")
