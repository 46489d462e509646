"""Scheduled refresh of lookalike packs: re-expand when the interval elapsed or the seed moved on.

Every lookalike pack version has an expansion record (``pipeline.expansion_record``) naming the
model version it used, the versions of the packs it read (seed first) and its refresh policy
(``ExpandLookalikeRequest.refresh_policy``; default every 3 days, as Meta, and on a new seed
version). ``due_refreshes`` reads the record of each lookalike pack's *current* version and says
which are due and why:

* ``interval``: the record is at least ``interval_seconds`` old;
* ``seed``: the seed pack's latest version is newer than the one expanded (a nightly rebuild of
  "last sale's buyers", a new upload version, a new live-pack snapshot into the same pack).

A refresh re-expands the recorded request into the same pack (its next version) with the *same*
model version: the pack's previous expansion pins it (``pipeline._pick_model``), so a retrain does
not silently change audiences; a pinned version that is gone fails loudly (``MODEL_VERSION_GONE``),
like every other refresh failure, per pack, without stopping the others. Manual policies, deleted
or expired packs, packs without a record and seeds that no longer exist are skipped with the
reason. The batch path (``flashcrowd lookalike refresh``, the ``lookalike-refresh`` CronJob) runs
it; one run at a time (``concurrencyPolicy: Forbid``), and a re-run finds nothing due.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from flashcrowd.audience.v1 import pack_pb2
from pyroaring import BitMap

from services.audience.lookalike import pipeline
from services.audience.packstore import PackStore
from services.events.dataset import EventDataset
from services.runtime import NotFound, ServiceError
from services.storage import ObjectStore

__all__ = ["DueRefresh", "RefreshOutcome", "due_refreshes", "lookalike_packs", "run_refreshes"]


@dataclass(frozen=True)
class DueRefresh:
    tenant: str
    pack_id: str
    version: int  # the pack's current version (the refresh publishes the next)
    reasons: tuple[str, ...]
    request: pipeline.ExpandRequest

    @property
    def name(self) -> str:
        return f"tenants/{self.tenant}/packs/{self.pack_id}"


@dataclass(frozen=True)
class RefreshOutcome:
    name: str
    status: str  # "refreshed", "skipped", "failed"
    detail: str
    version: int = 0


def lookalike_packs(store: ObjectStore, root: str) -> Iterator[tuple[str, str]]:
    """``(tenant, pack id)`` of every pack with an expansion record, each once."""
    seen: set[tuple[str, str]] = set()
    prefix = f"{root}expansions/"
    for info in store.list(prefix, recursive=True):
        parts = info.key[len(prefix) :].split("/")
        if len(parts) == 3 and parts[2].endswith(".json"):
            key = (parts[0], parts[1])
            if key not in seen:
                seen.add(key)
                yield key


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _policy(record: dict[str, Any]) -> dict[str, Any]:
    policy = dict(record.get("refresh") or {})  # records from before policies: the defaults
    policy.setdefault("interval_seconds", pipeline.DEFAULT_REFRESH_SECONDS)
    policy.setdefault("on_seed_version", True)
    policy.setdefault("manual", False)
    return policy


def _recorded_seed(record: dict[str, Any], current: pack_pb2.Pack) -> tuple[str, int]:
    inputs = record.get("inputs") or [{"pack": ref.pack, "version": ref.version} for ref in current.inputs]
    first = inputs[0] if inputs else {}
    return str(first.get("pack", "")), int(first.get("version") or 0)


def due_refreshes(
    store: ObjectStore, root: str, packs: PackStore, now: datetime
) -> tuple[list[DueRefresh], list[RefreshOutcome]]:
    """The lookalike packs due for a refresh at ``now``, and those skipped with the reason."""
    due: list[DueRefresh] = []
    skipped: list[RefreshOutcome] = []
    for tenant, pack_id in lookalike_packs(store, root):
        name = f"tenants/{tenant}/packs/{pack_id}"
        try:
            current = packs.get(tenant, pack_id)
        except NotFound:
            skipped.append(RefreshOutcome(name, "skipped", "pack deleted or expired"))
            continue
        if current.source != pack_pb2.Pack.SOURCE_LOOKALIKE:
            continue
        record = pipeline.previous_expansion(store, root, tenant, pack_id, current.version)
        if record is None:
            skipped.append(RefreshOutcome(name, "skipped", f"v{current.version} has no expansion record"))
            continue
        policy = _policy(record)
        if policy["manual"]:
            skipped.append(RefreshOutcome(name, "skipped", "manual refresh policy"))
            continue
        reasons = []
        created = _when(str(record.get("created")))
        interval = timedelta(seconds=int(policy["interval_seconds"]))
        if now >= created + interval:
            reasons.append(f"interval: expanded {created:%Y-%m-%dT%H:%MZ}, every {interval}")
        seed_name, seed_version = _recorded_seed(record, current)
        seed_id = seed_name.rsplit("/", 1)[-1]
        latest = packs.latest_version(tenant, seed_id) if seed_id else 0
        if latest == 0:
            skipped.append(RefreshOutcome(name, "skipped", f"seed pack {seed_name or '?'} no longer exists"))
            continue
        if policy["on_seed_version"] and latest > seed_version:
            reasons.append(f"seed: {seed_name} v{seed_version} -> v{latest}")
        if reasons:
            request = pipeline.ExpandRequest.from_json(record.get("request") or {})
            # The same model version as the pack's previous expansion (pinned by its record).
            request = replace(request, model_version=0, refresh_model=False)
            due.append(DueRefresh(tenant, pack_id, current.version, tuple(reasons), request))
    return due, skipped


def run_refreshes(
    store: ObjectStore,
    root: str,
    packs: PackStore,
    dataset: Callable[[], EventDataset],
    due: list[DueRefresh],
    *,
    min_seed: int,
    bots: BitMap | None = None,
) -> list[RefreshOutcome]:
    """Re-expand each due pack (its next version); a failure is reported and the others go on."""
    out = []
    for item in due:
        try:
            prepared = pipeline.prepare_expansion(
                store, root, packs, dataset, item.request, min_seed=min_seed, bots=bots
            )
            stored, _result = pipeline.execute_expansion(store, root, packs, prepared)
        except ServiceError as error:
            out.append(RefreshOutcome(item.name, "failed", f"{'; '.join(item.reasons)}: {error.message}"))
            continue
        with contextlib.suppress(Exception):
            stored = packs.get(item.tenant, item.pack_id, stored.version)
        out.append(RefreshOutcome(item.name, "refreshed", "; ".join(item.reasons), stored.version))
    return out
