"""Build a pack: validate, compile, resolve references, scan, combine, drop bots. Writes nothing.

``build_pack`` is what both the gRPC servicer (inside a long-running operation) and the batch CLI
run; persisting the result is the caller's job (``PackStore.publish_version`` / ``stage_shard``), so a
build that fails at any point leaves no pack behind.

Pack references go through callbacks so that the builder needs no pack store and cannot see other
tenants' packs:

* ``resolve_pack(name, version) -> (members, version used)`` raises ``NotFound`` for missing or
  foreign packs (the builder also refuses foreign names itself, before calling it).
* ``resolve_spec(name, version) -> (spec or None, version)`` (optional) lets the builder follow the
  specs of referenced packs to find reference cycles (``FailedPrecondition`` naming the cycle) before
  any data is read. Uploads and lookalikes have no spec and end the walk.

Events are read for ``tenant``: the platform's behaviour events and the tenant's own conversion
events, never another tenant's (``compiler.evaluate_leaves(..., tenant=...)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flashcrowd.audience.v1 import pack_pb2, spec_pb2
from google.protobuf import duration_pb2
from pyroaring import BitMap

from services.audience.bots import bot_bitmap
from services.audience.compiler import (
    LeafStats,
    Plan,
    bitmap_to_numpy,
    combine,
    compile_spec,
    evaluate_leaves,
    ids_to_bitmap,
    query_count,
)
from services.audience.names import PACK_TYPE, parse_pack_name
from services.audience.spec_validation import validate_spec
from services.events.dataset import EventDataset
from services.events.sharding import Shard
from services.runtime.errors import FailedPrecondition, NotFound

__all__ = [
    "BuildResult",
    "Progress",
    "ResolvePack",
    "ResolveSpec",
    "build_pack",
    "default_as_of",
    "find_reference_cycle",
    "spec_references",
]

ResolvePack = Callable[[str, int], tuple[BitMap, int]]
ResolveSpec = Callable[[str, int], tuple[spec_pb2.PackSpec | None, int]]
#: ``progress(stage, fraction)``: stage text ("compile", "bots", "scan leaf 1/2", "combine", "done"),
#: fraction of the whole build done, 0..1.
Progress = Callable[[str, float], None]

# Share of the progress bar each stage ends at.
_COMPILED, _RESOLVED, _BOTS, _SCANNED = 0.05, 0.10, 0.20, 0.90


@dataclass
class BuildResult:
    """Members, statistics, and the pack versions the build read."""

    bitmap: BitMap
    stats: pack_pb2.BuildStats
    inputs: list[spec_pb2.PackReference] = field(default_factory=list)
    #: The spec with relative windows made absolute (what was actually built).
    resolved_spec: spec_pb2.PackSpec = field(default_factory=spec_pb2.PackSpec)
    #: Keys of the event files the build read (shard merges count distinct files with them).
    files_read: list[str] = field(default_factory=list)
    plan: Plan | None = field(default=None, repr=False)


def default_as_of(dataset: EventDataset) -> datetime:
    """The end of the event data: anchor of relative windows when the options give none."""
    return dataset.end


def build_pack(
    dataset: EventDataset,
    spec: spec_pb2.PackSpec,
    options: spec_pb2.BuildOptions | None,
    *,
    resolve_pack: ResolvePack,
    tenant: str,
    shard: Shard | None = None,
    progress: Progress | None = None,
    resolve_spec: ResolveSpec | None = None,
    pack_name: str | None = None,
    bots: BitMap | None = None,
    field: str = "pack.spec",
) -> BuildResult:
    """Build ``spec`` over ``dataset`` for ``tenant`` (optionally one user shard).

    ``pack_name`` is the pack being built (its own name in the spec, or reached through other packs'
    specs, is a cycle). ``bots`` overrides the dataset's cached bot set (tests, or a caller that
    keeps it in memory). Raises ``InvalidArgument`` (spec), ``NotFound`` (references) or
    ``FailedPrecondition`` (cycles) before reading any event.
    """
    started = time.monotonic()
    options = options or spec_pb2.BuildOptions()
    shard = shard or Shard.whole()
    report = progress or (lambda stage, fraction: None)

    report("compile", 0.0)
    validate_spec(spec, options, field=field)
    as_of = options.as_of.ToDatetime(UTC) if options.HasField("as_of") else default_as_of(dataset)
    plan = compile_spec(spec, as_of=as_of, field=field)
    report("compile", _COMPILED)

    references = _check_tenant(plan, tenant)
    cycle = find_reference_cycle(spec, start=pack_name, resolve_spec=resolve_spec)
    if cycle:
        shown = " -> ".join(cycle)
        raise FailedPrecondition(
            "PACK_REFERENCE_CYCLE",
            f"pack references form a cycle: {shown}",
            [("PACK_REFERENCE_CYCLE", cycle[0], f"references itself through {shown}")],
        )
    bitmaps: dict[Any, BitMap] = {}  # leaves of every kind, and pack references
    inputs: list[spec_pb2.PackReference] = []
    for leaf in references:
        members, used = resolve_pack(leaf.name, leaf.version)
        bitmaps[leaf] = _restrict(members, shard)
        inputs.append(spec_pb2.PackReference(pack=leaf.name, version=used))
    report("resolve", _RESOLVED)

    if not options.include_bots and bots is None:
        report("bots", _RESOLVED)
        bots = bot_bitmap(dataset)
    report("bots", _BOTS)

    leaf_stats = LeafStats()
    data_leaves = plan.data_leaves

    def on_leaf(done: int, total: int) -> None:
        report(f"scan leaf {done}/{total}", _BOTS + (_SCANNED - _BOTS) * done / max(total, 1))

    if data_leaves:
        report(f"scan leaf 0/{query_count(data_leaves)}", _BOTS)
    bitmaps.update(
        evaluate_leaves(dataset, data_leaves, shard, on_leaf=on_leaf, stats=leaf_stats, tenant=tenant)
    )

    report("combine", _SCANNED)
    members = combine(plan.root, bitmaps)
    if members is bitmaps.get(plan.root):
        members = members.copy()  # the root is a leaf: never hand out (and mutate) a shared bitmap
    bots_excluded = 0
    if not options.include_bots and bots:
        bots_excluded = members.intersection_cardinality(bots)
        members -= bots

    event_days = sorted(set(plan.days()) & set(dataset.days()))
    files_read = [p["key"] for p in dataset.parts("events", days=event_days, shard=shard) if p["rows"] > 0]
    stats = pack_pb2.BuildStats(
        files_total=len(dataset.parts("events")),
        files_read=len(files_read),
        events_matched=leaf_stats.events_matched,
        bots_excluded=bots_excluded,
        dataset_version=dataset.version,
        shard=str(shard),
    )
    stats.duration.CopyFrom(_duration(time.monotonic() - started))
    stats.as_of.FromDatetime(as_of)
    report("done", 1.0)
    return BuildResult(members, stats, inputs, plan.resolved_spec, files_read, plan)


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


def _restrict(members: BitMap, shard: Shard) -> BitMap:
    if shard.is_whole:
        return members
    ids = bitmap_to_numpy(members)
    return ids_to_bitmap(ids[shard.mask_np(ids)])


def _check_tenant(plan: Plan, tenant: str) -> list:
    """The plan's references; a name of another tenant is NotFound, exactly like a missing pack."""
    for leaf in plan.references:
        try:
            ref_tenant, _ = parse_pack_name(leaf.name)
        except ValueError:
            raise NotFound(PACK_TYPE, leaf.name) from None
        if ref_tenant != tenant:
            raise NotFound(PACK_TYPE, leaf.name)
    return plan.references


def spec_references(spec: spec_pb2.PackSpec) -> Iterator[spec_pb2.PackReference]:
    """Every pack reference in the tree, depth first."""
    kind = spec.WhichOneof("node")
    if kind == "pack":
        yield spec.pack
    elif kind in ("union", "intersect"):
        for operand in getattr(spec, kind).operands:
            yield from spec_references(operand)
    elif kind == "exclude":
        yield from spec_references(spec.exclude.base)
        for sub in spec.exclude.subtract:
            yield from spec_references(sub)


def find_reference_cycle(
    spec: spec_pb2.PackSpec, *, start: str | None, resolve_spec: ResolveSpec | None
) -> list[str] | None:
    """``[a, b, a]`` if following references from ``spec`` (the spec of ``start``) comes back.

    Without ``resolve_spec`` only direct self-references are found. Packs that cannot be resolved
    while walking (deleted since they were used) end the walk: they cannot close a cycle now.
    """
    stack = [start] if start else []
    done: set[str] = set()

    def visit(current: spec_pb2.PackSpec) -> list[str] | None:
        for ref in spec_references(current):
            name = ref.pack
            if name in stack:
                return [*stack[stack.index(name) :], name]
            if name in done or resolve_spec is None:
                continue
            try:
                sub, _ = resolve_spec(name, ref.version)
            except NotFound:
                continue
            if sub is not None:
                stack.append(name)
                found = visit(sub)
                stack.pop()
                if found:
                    return found
            done.add(name)
        return None

    return visit(spec)
