"""``erase_users``: a user's rows out of the lake's events, profiles and identity map (Delta DELETE).

Each table gets one ``DELETE WHERE bucket16 = g AND user_id IN (...)`` per bucket group: the
partition predicate limits the rewrite to the files of the users' groups. The deleted rows leave
the current snapshot at once; the files that held them stay referenced by older snapshots until
``vacuum`` (``flashcrowd data maintain``, or ``vacuum_hours=0`` here for an immediate purge)
deletes them from the store. The truth table (evaluation only) is erased too.

Not covered here: packs (stored pack versions and live packs still list the user until they are
rebuilt), and the Delta log: older commit files keep per-file min/max statistics that may equal the
user's id until log cleanup (``delta.logRetentionDuration``, 1 day) removes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from deltalake.exceptions import CommitFailedError

from services.events.lake.physical import BUCKET_GROUP, BUCKET_GROUP_SHIFT, LAKE_TABLES
from services.events.lake.writer import CommitConflict, TableWriter
from services.events.sharding import bucket_of
from services.storage.base import ObjectStore

__all__ = ["ErasureReport", "erase_users"]


@dataclass
class ErasureReport:
    users: list[int]
    rows: dict[str, int] = field(default_factory=dict)
    files_rewritten: dict[str, int] = field(default_factory=dict)
    vacuumed_files: int = 0


def erase_users(
    store: ObjectStore, prefix: str, user_ids: Iterable[int], *, vacuum_hours: int | None = None
) -> ErasureReport:
    """Delete every row of ``user_ids``; with ``vacuum_hours`` also vacuum the tables afterwards."""
    users = sorted({int(u) for u in user_ids})
    if not users:
        raise ValueError("no user ids to erase")
    bad = [u for u in users if not 0 <= u <= 0xFFFFFFFF]
    if bad:
        raise ValueError(f"user ids must be in 0..4294967295, got {bad[:5]}")
    groups: dict[int, list[int]] = {}
    for u in users:
        groups.setdefault(bucket_of(u) >> BUCKET_GROUP_SHIFT, []).append(u)
    writer = TableWriter(store, prefix)
    report = ErasureReport(users)
    for name in LAKE_TABLES:
        table = writer.open(name)
        if table is None:
            continue
        deleted = rewritten = 0
        for group, members in sorted(groups.items()):
            predicate = f"{BUCKET_GROUP} = {group} AND user_id IN ({', '.join(map(str, members))})"
            try:
                metrics = table.delete(predicate)
            except CommitFailedError as error:
                raise CommitConflict(
                    f"{name}: erasure lost to a concurrent commit ({error}); retry"
                ) from error
            deleted += int(metrics.get("num_deleted_rows", 0))
            rewritten += int(metrics.get("num_removed_files", 0))
        report.rows[name] = deleted
        report.files_rewritten[name] = rewritten
        if vacuum_hours is not None:
            report.vacuumed_files += len(
                table.vacuum(
                    retention_hours=vacuum_hours, dry_run=False, enforce_retention_duration=False, full=True
                )
            )
    return report
