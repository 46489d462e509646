"""Events kept out of lookalike features, so that a seed (or an evaluation target) is never found by
the very behaviour that defines it.

A ``FeatureExclusion`` is a set of ``ExclusionRule``. An event is dropped from the features when it
matches **any** rule; it matches a rule when it matches **every** field the rule sets: its type is
one of ``event_types``, its category one of ``category_ids``, its item one of ``item_ids`` (an unset
field matches every event; a rule that sets nothing is refused: it would drop everything).

Examples: ``{event_types: [pay, refund]}`` (a purchasers seed), ``{category_ids: [19]}`` (every
event of the Western films), ``{event_types: [pay], category_ids: [7]}`` (payments in category 7).

Invariants:

* Rules and their fields are normalised (sorted, de-duplicated, rules covered by another rule
  dropped), so equal exclusions have equal ``to_json()`` and ``key``; the key names feature
  snapshots (``features.build_snapshot``), so a snapshot is reused exactly when its exclusion is
  the same.
* ``union`` excludes every event either side excludes (an expansion: the model's exclusion, the
  request's and the seed spec's together); only rules covered by another rule disappear.
* ``from_seed_spec`` derives the rules from the seed pack's behaviour leaves (every leaf, including
  subtracted ones: "clicked and did not pay" is defined by clicks *and* payments), the way the
  seed-holdout evaluation removes a target: a leaf filtered to categories or items drops **every**
  event of those categories/items (a genre's films, a category's products: views, carts and orders
  of the items bought would otherwise find the buyers); a leaf without such filters drops its event
  types, a payment together with its order (one purchase: the Taobao adapter writes one "buy" as
  both). Filters a rule cannot express (campaign, video, amount) are widened, never ignored: the
  rule drops every event of the leaf's types. Pack references and uploads contribute nothing (their
  behaviour is not known here).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl

from services.events.schema import EventType

__all__ = ["ExclusionRule", "FeatureExclusion"]


def _norm(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted({int(v) for v in values}))


@dataclass(frozen=True)
class ExclusionRule:
    """Events whose type, category and item match every set field (see the module doc)."""

    event_types: tuple[int, ...] = ()
    category_ids: tuple[int, ...] = ()
    item_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "event_types", _norm(self.event_types))
        object.__setattr__(self, "category_ids", _norm(self.category_ids))
        object.__setattr__(self, "item_ids", _norm(self.item_ids))
        if not (self.event_types or self.category_ids or self.item_ids):
            raise ValueError("an exclusion rule needs event types, categories or items")
        bad = [t for t in self.event_types if t not in {int(e) for e in EventType}]
        if bad:
            raise ValueError(f"unknown event types {bad}")

    def covers(self, other: ExclusionRule) -> bool:
        """Every event ``other`` matches, this rule matches too."""
        for mine, theirs in (
            (self.event_types, other.event_types),
            (self.category_ids, other.category_ids),
            (self.item_ids, other.item_ids),
        ):
            if mine and not (theirs and set(theirs) <= set(mine)):
                return False
        return True

    def expr(self) -> pl.Expr:
        terms = []
        if self.event_types:
            terms.append(pl.col("event_type").is_in(list(self.event_types)))
        if self.category_ids:
            terms.append(pl.col("category_id").is_in(list(self.category_ids)))
        if self.item_ids:
            terms.append(pl.col("item_id").is_in(list(self.item_ids)))
        out = terms[0]
        for term in terms[1:]:
            out = out & term
        return out.fill_null(False)  # an event without a category/item does not match a category/item

    def to_json(self) -> dict[str, list[int]]:
        doc: dict[str, list[int]] = {}
        if self.event_types:
            doc["event_types"] = list(self.event_types)
        if self.category_ids:
            doc["category_ids"] = list(self.category_ids)
        if self.item_ids:
            doc["item_ids"] = list(self.item_ids)
        return doc

    def describe(self) -> str:
        parts = []
        if self.event_types:
            parts.append("/".join(EventType(t).label for t in self.event_types))
        if self.category_ids:
            parts.append("categories " + ",".join(map(str, self.category_ids)))
        if self.item_ids:
            shown = ",".join(map(str, self.item_ids[:5])) + ("..." if len(self.item_ids) > 5 else "")
            parts.append("items " + shown)
        return " in ".join(parts) if len(parts) > 1 and self.event_types else " ".join(parts)


@dataclass(frozen=True)
class FeatureExclusion:
    """A normalised set of rules; empty = nothing excluded."""

    rules: tuple[ExclusionRule, ...] = ()

    def __post_init__(self) -> None:
        unique = set(self.rules)
        kept = [r for r in unique if not any(o != r and o.covers(r) for o in unique)]  # drop subsumed rules
        object.__setattr__(
            self, "rules", tuple(sorted(kept, key=lambda r: json.dumps(r.to_json(), sort_keys=True)))
        )

    def __bool__(self) -> bool:
        return bool(self.rules)

    def union(self, *others: FeatureExclusion) -> FeatureExclusion:
        rules = list(self.rules)
        for other in others:
            rules += other.rules
        return FeatureExclusion(tuple(rules))

    def drop_expr(self) -> pl.Expr | None:
        """True for events to drop (None when nothing is excluded)."""
        if not self.rules:
            return None
        out = self.rules[0].expr()
        for rule in self.rules[1:]:
            out = out | rule.expr()
        return out

    def apply(self, events: pl.LazyFrame) -> pl.LazyFrame:
        drop = self.drop_expr()
        return events if drop is None else events.filter(~drop)

    def to_json(self) -> list[dict[str, list[int]]]:
        return [r.to_json() for r in self.rules]

    @classmethod
    def from_json(cls, doc: Sequence[dict[str, Any]] | None) -> FeatureExclusion:
        return cls(
            tuple(
                ExclusionRule(
                    tuple(d.get("event_types", ())),
                    tuple(d.get("category_ids", ())),
                    tuple(d.get("item_ids", ())),
                )
                for d in doc or ()
            )
        )

    @property
    def key(self) -> str:
        """Short stable id ('' when empty): part of feature snapshot ids."""
        if not self.rules:
            return ""
        payload = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return "x" + hashlib.sha256(payload).hexdigest()[:10]

    def describe(self) -> str:
        return "; ".join(r.describe() for r in self.rules) if self.rules else "nothing"

    @classmethod
    def from_seed_spec(cls, spec: Any, *, as_of: datetime | None = None) -> FeatureExclusion:
        """The behaviour a seed pack's spec is defined by (a ``spec_pb2.PackSpec``; see the module doc)."""
        from services.audience.compiler import EventLeaf, RefundedPayersLeaf, compile_spec

        if spec is None or spec.ByteSize() == 0:
            return cls()
        try:
            plan = compile_spec(spec, as_of=as_of or datetime.now(UTC))
        except Exception:  # a stored spec this code cannot compile: nothing known, nothing excluded
            return cls()
        rules = []
        for leaf in plan.leaves:
            if isinstance(leaf, EventLeaf | RefundedPayersLeaf):
                c = leaf.conditions
                if c.category_ids or c.item_ids:
                    rules.append(ExclusionRule((), tuple(c.category_ids), tuple(c.item_ids)))
                    continue
                types = set(c.event_types)
                if isinstance(leaf, RefundedPayersLeaf):
                    types |= {int(EventType.PAY), int(EventType.REFUND)}
                if int(EventType.PAY) in types:
                    types.add(int(EventType.ORDER))
                if types:
                    rules.append(ExclusionRule(tuple(types)))
        return cls(tuple(rules))
