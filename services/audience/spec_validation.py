"""Static validation of pack specs: every violation at once, each naming its full field path.

Only what can be decided from the spec alone is checked here (INVALID_ARGUMENT). References to
missing or other tenants' packs (NOT_FOUND) and reference cycles (FAILED_PRECONDITION) need the
pack store and are detected while the builder resolves references.

Field paths use proto field names, as in ``pack.spec.exclude.subtract[0].behavior.window.absolute.end_time``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flashcrowd.audience.v1 import events_pb2, spec_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from services.audience.names import parse_pack_name
from services.events.schema import INTEREST_TAGS, REGIONS
from services.runtime.errors import InvalidArgument

__all__ = ["MAX_DEPTH", "MAX_NODES", "MONEY_EVENT_TYPES", "validate_spec", "violations"]

#: Deepest allowed nesting (the root is depth 1).
MAX_DEPTH = 32
#: Most nodes in one spec; keeps compile time and error lists bounded.
MAX_NODES = 1000

EventType = events_pb2.EventType
#: Event types that carry ``amount_fen``; an amount filter on other types can never match.
MONEY_EVENT_TYPES = frozenset(
    {EventType.EVENT_TYPE_ORDER, EventType.EVENT_TYPE_PAY, EventType.EVENT_TYPE_REFUND,
     EventType.EVENT_TYPE_COUPON_REDEEM}
)  # fmt: skip
_EVENT_TYPES = frozenset(v for v in EventType.values() if v != EventType.EVENT_TYPE_UNSPECIFIED)
_AGE_BANDS = frozenset(v for v in spec_pb2.AgeBand.values() if v != spec_pb2.AGE_BAND_UNSPECIFIED)
_GENDERS = frozenset(v for v in spec_pb2.Gender.values() if v != spec_pb2.GENDER_UNSPECIFIED)
_KINDS = frozenset(v for v in spec_pb2.Shortcut.Kind.values() if v != spec_pb2.Shortcut.KIND_UNSPECIFIED)
_INTERESTS = frozenset(INTEREST_TAGS)
_REGIONS = frozenset(REGIONS)
_REGION_FORMAT = re.compile(r"[A-Z]{2}-[A-Z0-9]{1,3}")
# Timestamp.ToDatetime's range (0001-01-01 .. 9999-12-31).
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799
_NODE_KINDS = "behavior, profile, pack, union, intersect, exclude, shortcut"

Violation = tuple[str, str]


def validate_spec(
    spec: spec_pb2.PackSpec,
    options: spec_pb2.BuildOptions | None = None,
    *,
    field: str = "pack.spec",
    options_field: str | None = None,
) -> None:
    """Raise ``InvalidArgument`` listing every violation of ``spec`` (and ``options``), if any.

    ``options_field`` defaults to the sibling of ``field`` (``pack.spec`` -> ``pack.options``).
    """
    found = violations(spec, options, field=field, options_field=options_field)
    if found:
        raise InvalidArgument(found, reason="INVALID_PACK_SPEC")


def violations(
    spec: spec_pb2.PackSpec,
    options: spec_pb2.BuildOptions | None = None,
    *,
    field: str = "pack.spec",
    options_field: str | None = None,
) -> list[Violation]:
    """The ``(field, description)`` violations ``validate_spec`` would raise; empty when valid."""
    checker = _Checker()
    if spec is None:
        checker.add(field, "required")
    else:
        checker.node(spec, field, 1)
    if options is not None and options.HasField("as_of"):
        base = options_field or (f"{field.rsplit('.', 1)[0]}.options" if "." in field else "options")
        checker.timestamp(options.as_of, f"{base}.as_of")
    return checker.found


class _Checker:
    def __init__(self) -> None:
        self.found: list[Violation] = []
        self.nodes = 0
        self.too_deep = False

    def add(self, path: str, description: str) -> None:
        self.found.append((path, description))

    # --- tree -------------------------------------------------------------------------------

    def node(self, spec: spec_pb2.PackSpec, path: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes == MAX_NODES + 1:  # report once, keep checking what we already walk
            self.add(path, f"spec has more than {MAX_NODES} nodes")
        if depth > MAX_DEPTH:
            if not self.too_deep:  # once: every deeper branch would repeat it
                self.too_deep = True
                self.add(path, f"spec nests deeper than {MAX_DEPTH} levels")
            return
        kind = spec.WhichOneof("node")
        if kind is None:
            self.add(path, f"empty spec: set exactly one of {_NODE_KINDS}")
        elif kind == "behavior":
            self.behavior(spec.behavior, f"{path}.behavior")
        elif kind == "profile":
            self.profile(spec.profile, f"{path}.profile")
        elif kind == "pack":
            self.reference(spec.pack, f"{path}.pack")
        elif kind in ("union", "intersect"):
            self.set_operands(getattr(spec, kind), kind, f"{path}.{kind}", depth)
        elif kind == "exclude":
            self.exclude(spec.exclude, f"{path}.exclude", depth)
        elif kind == "shortcut":
            self.shortcut(spec.shortcut, f"{path}.shortcut")

    def set_operands(self, operands: spec_pb2.SetOperands, kind: str, path: str, depth: int) -> None:
        items = operands.operands
        if len(items) < 2:
            self.add(f"{path}.operands", f"{kind} needs at least 2 operands, got {len(items)}")
        for i, operand in enumerate(items):
            self.node(operand, f"{path}.operands[{i}]", depth + 1)
        if kind == "intersect" and len(items) >= 2:
            self.intersect_contradictions(items, path)

    def exclude(self, exclude: spec_pb2.ExcludeOperands, path: str, depth: int) -> None:
        if not exclude.HasField("base"):
            self.add(f"{path}.base", "required: the set to remove users from")
        else:
            self.node(exclude.base, f"{path}.base", depth + 1)
        if not exclude.subtract:
            self.add(f"{path}.subtract", "at least one spec to subtract is required")
        for i, sub in enumerate(exclude.subtract):
            sub_path = f"{path}.subtract[{i}]"
            self.node(sub, sub_path, depth + 1)
            if exclude.HasField("base") and sub.WhichOneof("node") and sub == exclude.base:
                self.add(sub_path, "is the same spec as exclude.base: the result is always empty")

    # --- leaves -----------------------------------------------------------------------------

    def behavior(self, cond: spec_pb2.BehaviorCondition, path: str) -> None:
        if not cond.event_types:
            self.add(f"{path}.event_types", "at least one event type is required")
        self.event_types(cond.event_types, f"{path}.event_types")
        self.window(cond, path)
        if cond.min_count < 0:
            self.add(f"{path}.min_count", f"must be >= 0 (0 means 1), got {cond.min_count}")
        if cond.HasField("filter"):
            self.filter(cond.filter, f"{path}.filter")
            has_money = any(t in MONEY_EVENT_TYPES for t in cond.event_types)
            if _has_amount(cond.filter) and cond.event_types and not has_money:
                self.add(
                    f"{path}.filter.amount",
                    "contradictory: none of event_types carries an amount "
                    "(only order, pay, refund and coupon_redeem do)",
                )

    def shortcut(self, shortcut: spec_pb2.Shortcut, path: str) -> None:
        if shortcut.kind not in _KINDS:
            known = ", ".join(spec_pb2.Shortcut.Kind.Name(k) for k in sorted(_KINDS))
            self.add(f"{path}.kind", f"unknown or unspecified shortcut kind {shortcut.kind}; known: {known}")
        self.window(shortcut, path)
        if shortcut.HasField("filter"):
            self.filter(shortcut.filter, f"{path}.filter")
            money_kinds = (spec_pb2.Shortcut.KIND_PURCHASERS, spec_pb2.Shortcut.KIND_UNSPECIFIED)
            if _has_amount(shortcut.filter) and shortcut.kind in _KINDS and shortcut.kind not in money_kinds:
                self.add(
                    f"{path}.filter.amount",
                    "contradictory: only the purchasers shortcut looks at events with an amount",
                )

    def profile(self, profile: spec_pb2.ProfileFilter, path: str) -> None:
        if not (profile.age_bands or profile.genders or profile.regions or profile.interests):
            self.add(path, "empty profile filter: set at least one of age_bands, genders, regions, interests")
        for i, band in enumerate(profile.age_bands):
            if band not in _AGE_BANDS:
                self.add(f"{path}.age_bands[{i}]", f"unknown or unspecified age band {band}")
        for i, gender in enumerate(profile.genders):
            if gender not in _GENDERS:
                self.add(f"{path}.genders[{i}]", f"unknown or unspecified gender {gender}")
        for i, region in enumerate(profile.regions):
            if not _REGION_FORMAT.fullmatch(region):
                self.add(
                    f"{path}.regions[{i}]",
                    f"malformed region code {region!r}: expected ISO 3166-2 like CN-GD",
                )
            elif region not in _REGIONS:
                self.add(f"{path}.regions[{i}]", f"unknown region {region!r}; known: {', '.join(REGIONS)}")
        for i, tag in enumerate(profile.interests):
            if tag not in _INTERESTS:
                self.add(
                    f"{path}.interests[{i}]",
                    f"unknown interest tag {tag!r}; known: {', '.join(INTEREST_TAGS)}",
                )

    def reference(self, ref: spec_pb2.PackReference, path: str) -> None:
        try:
            parse_pack_name(ref.pack)
        except ValueError as exc:
            self.add(f"{path}.pack", f"malformed pack name: {exc}")
        if ref.version < 0:
            self.add(f"{path}.version", f"must be >= 0 (0 = latest), got {ref.version}")

    # --- parts ------------------------------------------------------------------------------

    def event_types(self, types: Iterable[int], path: str) -> None:
        for i, value in enumerate(types):
            if value not in _EVENT_TYPES:
                self.add(f"{path}[{i}]", f"unknown or unspecified event type {value}")

    def window(self, owner: spec_pb2.BehaviorCondition | spec_pb2.Shortcut, path: str) -> None:
        path = f"{path}.window"
        if not owner.HasField("window"):
            self.add(path, "required: set absolute or last")
            return
        window = owner.window
        form = window.WhichOneof("window")
        if form is None:
            self.add(path, "required: set absolute or last")
        elif form == "last":
            self.duration(window.last, f"{path}.last")
        else:
            absolute = window.absolute
            ok = True
            for name in ("start_time", "end_time"):
                if not absolute.HasField(name):
                    self.add(f"{path}.absolute.{name}", "required")
                    ok = False
                else:
                    ok = self.timestamp(getattr(absolute, name), f"{path}.absolute.{name}") and ok
            if ok and _ts_key(absolute.end_time) <= _ts_key(absolute.start_time):
                self.add(
                    f"{path}.absolute.end_time",
                    f"must be after start_time ({absolute.start_time.ToJsonString()}), "
                    f"got {absolute.end_time.ToJsonString()}",
                )

    def duration(self, value: duration_pb2.Duration, path: str) -> None:
        mixed_signs = (value.seconds > 0 > value.nanos) or (value.seconds < 0 < value.nanos)
        if mixed_signs or abs(value.nanos) > 999_999_999:
            self.add(path, "malformed duration")
        elif value.seconds < 0 or (value.seconds == 0 and value.nanos <= 0):
            self.add(path, f"must be positive, got {value.seconds}s")

    def timestamp(self, value: timestamp_pb2.Timestamp, path: str) -> bool:
        if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos <= 999_999_999):
            self.add(path, "timestamp out of range (years 1-9999)")
            return False
        return True

    def filter(self, flt: spec_pb2.EventFilter, path: str) -> None:
        for name in ("item_ids", "category_ids", "campaign_ids", "video_ids"):
            for i, value in enumerate(getattr(flt, name)):
                if value == 0:
                    self.add(f"{path}.{name}[{i}]", "0 is not an id (ids that do not apply are absent)")
        if flt.HasField("amount"):
            amount = flt.amount
            for name in ("min_fen", "max_fen"):
                if getattr(amount, name) < 0:
                    self.add(f"{path}.amount.{name}", f"must be >= 0 fen, got {getattr(amount, name)}")
            if amount.max_fen > 0 and amount.min_fen > amount.max_fen:
                self.add(
                    f"{path}.amount",
                    f"min_fen ({amount.min_fen}) is greater than max_fen ({amount.max_fen})",
                )

    # --- contradictions -----------------------------------------------------------------------

    def intersect_contradictions(self, operands: Iterable[spec_pb2.PackSpec], path: str) -> None:
        flat = list(_flatten_intersect(operands, f"{path}.operands"))
        # Single-valued attributes: a user has one age band, gender and region, so the value sets
        # of every profile operand must overlap.
        for attr in ("age_bands", "genders", "regions"):
            allowed: set[object] | None = None
            seen: list[str] = []
            for spec, sub_path in flat:
                if spec.WhichOneof("node") != "profile":
                    continue
                values = set(getattr(spec.profile, attr))
                if not values:
                    continue
                seen.append(sub_path)
                allowed = values if allowed is None else allowed & values
                if not allowed:
                    self.add(
                        f"{path}.operands",
                        f"contradictory: {' and '.join(seen)} require disjoint {attr}, "
                        "so the intersection is always empty",
                    )
                    break
        # intersect(X, exclude(B, ..., X, ...)) is empty.
        for spec, sub_path in flat:
            if spec.WhichOneof("node") != "exclude":
                continue
            for other, other_path in flat:
                if other is not spec and any(other == s for s in spec.exclude.subtract):
                    self.add(
                        f"{path}.operands",
                        f"contradictory: {sub_path} subtracts {other_path}: the intersection is always empty",
                    )


def _flatten_intersect(
    operands: Iterable[spec_pb2.PackSpec], path: str
) -> Iterable[tuple[spec_pb2.PackSpec, str]]:
    for i, operand in enumerate(operands):
        sub_path = f"{path}[{i}]"
        if operand.WhichOneof("node") == "intersect":
            yield from _flatten_intersect(operand.intersect.operands, f"{sub_path}.intersect.operands")
        else:
            yield operand, sub_path


def _has_amount(flt: spec_pb2.EventFilter) -> bool:
    return flt.HasField("amount") and (flt.amount.min_fen != 0 or flt.amount.max_fen != 0)


def _ts_key(value: timestamp_pb2.Timestamp) -> tuple[int, int]:
    return value.seconds, value.nanos
