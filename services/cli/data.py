"""``flashcrowd data import taobao|movielens PATH``: public data sets -> a normal event dataset.

    flashcrowd data import taobao ../shared/data/taobao-userbehavior-first-users [--prefix data/]
    flashcrowd data import movielens ../shared/data/movielens-100k --store s3://... --overwrite

    flashcrowd data maintain --store s3://... [--retention-days 400] [--min-small-files 16]
    flashcrowd data migrate --store s3://... [--prefix data/]

The adapters (``services/events/adapters``) map the source schema to ours and write through the
same dataset sink as the generator (``services.events.parts``); the files are read in place, never
copied. ``maintain`` runs ``services.events.lake.maintenance`` on an event lake.
"""

from __future__ import annotations

import argparse
import json
import sys

from services.cli.common import (
    CliError,
    add_store_argument,
    add_table_format_argument,
    open_store_arg,
    table_format_arg,
)
from services.storage.base import ObjectStore

NAME = "data"
HELP = "import public data sets (Taobao UserBehavior, MovieLens 100K) as event datasets; maintain a lake"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    imp = sub.add_parser("import", help="read a public data set and publish it as an event dataset")
    imp.add_argument("source", choices=["taobao", "movielens"], help="which adapter")
    imp.add_argument("path", help="the data set's file or folder (e.g. ../shared/data/movielens-100k)")
    add_store_argument(imp)
    imp.add_argument("--prefix", default="data/", help="key prefix of the dataset (default data/)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing dataset under --prefix")
    imp.add_argument(
        "--keep-outside-window",
        action="store_true",
        help="taobao: keep events outside the official 9 days (dropped by default)",
    )
    imp.add_argument("--json", action="store_true", help="print the import report as JSON")
    add_table_format_argument(imp)

    keep = sub.add_parser(
        "maintain",
        help="retention, small-file compaction, checkpoint and vacuum of an event lake (run by a CronJob)",
    )
    add_store_argument(keep)
    keep.add_argument("--prefix", default="data/", help="key prefix of the lake (default data/)")
    keep.add_argument("--retention-days", type=int, default=400, help="drop event days older than this (400)")
    keep.add_argument("--keep-all", action="store_true", help="no retention: keep every day")
    keep.add_argument("--target-size-mb", type=int, default=128, help="compacted file size (default 128 MiB)")
    keep.add_argument(
        "--min-small-files",
        type=int,
        default=16,
        help="compact a table once it has this many small files (16)",
    )
    keep.add_argument(
        "--vacuum-hours",
        type=int,
        default=168,
        help="delete unreferenced files older than this (168 = 7 days)",
    )
    keep.add_argument("--no-compact", action="store_true", help="skip compaction")
    keep.add_argument("--no-vacuum", action="store_true", help="skip vacuum")
    keep.add_argument("--json", action="store_true", help="print the per-table report as JSON")

    move = sub.add_parser(
        "migrate", help="convert a manifest dataset into an event lake in place (verified, then switched)"
    )
    add_store_argument(move)
    move.add_argument("--prefix", default="data/", help="key prefix of the dataset (default data/)")
    move.add_argument("--json", action="store_true", help="print the migration report as JSON")

    erase = sub.add_parser("erase", help="delete users' events, profile and identity rows from an event lake")
    add_store_argument(erase)
    erase.add_argument("--prefix", default="data/", help="key prefix of the lake (default data/)")
    erase.add_argument("--user", type=int, action="append", required=True, help="user id (repeatable)")
    erase.add_argument(
        "--vacuum-hours",
        type=int,
        default=None,
        help="also vacuum files unreferenced for this long (0: purge the old files now)",
    )
    erase.add_argument("--json", action="store_true", help="print the erasure report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "maintain":
        return run_maintain(args)
    if args.data_command == "migrate":
        return run_migrate(args)
    if args.data_command == "erase":
        return run_erase(args)
    return run_import(args)


def run_maintain(args: argparse.Namespace) -> int:
    from services.events.lake.maintenance import MaintenanceOptions, maintain

    checks = {
        "--retention-days": (args.retention_days, 1),
        "--target-size-mb": (args.target_size_mb, 1),
        "--min-small-files": (args.min_small_files, 2),
        "--vacuum-hours": (args.vacuum_hours, 0),
    }
    for flag, (value, least) in checks.items():
        if value < least:
            raise CliError(f"{flag} must be >= {least}, got {value}")
    store, prefix = _existing_lake(args, "nothing to maintain")
    options = MaintenanceOptions(
        retention_days=None if args.keep_all else args.retention_days,
        compact=not args.no_compact,
        target_size=args.target_size_mb * 1024 * 1024,
        min_small_files=args.min_small_files,
        vacuum=not args.no_vacuum,
        vacuum_hours=args.vacuum_hours,
    )
    reports = maintain(store, prefix, options)
    if args.json:
        json.dump([r.as_dict() for r in reports], sys.stdout, indent=1)
        print()
        return 0
    for r in reports:
        changes = (
            f"retention -{r.retention_files_removed}, compaction -{r.compacted_files_removed} "
            f"+{r.compacted_files_added}, vacuumed {r.vacuumed_files}"
        )
        skipped = f"; {'; '.join(r.skipped)}" if r.skipped else ""
        print(f"{r.table:<15} v{r.version_before} -> v{r.version_after}: files {r.files_before} -> "
              f"{r.files_after} ({changes}){skipped}")  # fmt: skip
    return 0


def _store_and_prefix(args: argparse.Namespace) -> tuple[ObjectStore, str]:
    """``--store`` (which must exist) and ``--prefix`` of a lake command."""
    from services.events.dataset import normalise_prefix

    try:
        prefix = normalise_prefix(args.prefix)
    except ValueError as exc:
        raise CliError(f"--prefix: {exc}") from None
    return open_store_arg(args.store, existing=True), prefix


def _existing_lake(args: argparse.Namespace, purpose: str) -> tuple[ObjectStore, str]:
    """As ``_store_and_prefix``, and a lake must be there (its lake.json readable)."""
    from services.events.lake import read_descriptor

    store, prefix = _store_and_prefix(args)
    try:
        found = read_descriptor(store, prefix)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if found is None:
        raise CliError(f"no event lake under {store.url} prefix {prefix!r} (no lake.json); {purpose}")
    return store, prefix


def run_migrate(args: argparse.Namespace) -> int:
    from services.events.lake.migrate import MigrationError, migrate

    store, prefix = _store_and_prefix(args)
    try:
        report = migrate(store, prefix)
    except MigrationError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=1)
        print()
        return 0
    rows = ", ".join(f"{t} {n:,}" for t, n in report.rows.items())
    source = f"manifest v{report.manifest_version}"
    print(f"migrated  {store.url} prefix {prefix!r} ({source}) in {report.commits} commits")
    print(f"verified  rows {rows}; event ids sha256 {report.events_digest[:16]}")
    print(
        f"pack      clicked minus paid: {report.pack_size:,} users, sha256 {report.pack_digest[:16]} on both"
    )
    return 0


def run_erase(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from services.events.lake.erasure import erase_users

    if args.vacuum_hours is not None and args.vacuum_hours < 0:
        raise CliError(f"--vacuum-hours must be >= 0, got {args.vacuum_hours}")
    bad = [u for u in args.user if not 0 <= u <= 0xFFFFFFFF]
    if bad:
        raise CliError(f"--user must be in 0..4294967295, got {bad[0]}")
    store, prefix = _existing_lake(args, "erasure needs a lake")
    report = erase_users(store, prefix, args.user, vacuum_hours=args.vacuum_hours)
    if args.json:
        json.dump(asdict(report), sys.stdout, indent=1)
        print()
        return 0
    rows = ", ".join(f"{t} {n:,}" for t, n in report.rows.items())
    print(f"erased    users {', '.join(map(str, report.users))}: rows {rows}")
    print(f"vacuum    {report.vacuumed_files} old files deleted" if args.vacuum_hours is not None else
          "vacuum    not run: old files go at the next `flashcrowd data maintain`")  # fmt: skip
    print("packs     not changed: stored and live packs still list these users until rebuilt")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from services.events.adapters import import_dataset
    from services.events.parts import DatasetExistsError

    store = open_store_arg(args.store)
    options: dict[str, object] = {}
    if args.source == "taobao":
        options["keep_outside_window"] = args.keep_outside_window
    elif args.keep_outside_window:
        raise CliError("--keep-outside-window only applies to taobao")
    try:
        result = import_dataset(
            store,
            args.source,
            args.path,
            prefix=args.prefix,
            overwrite=args.overwrite,
            table_format=table_format_arg(args.table_format),
            **options,
        )
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    except DatasetExistsError as exc:
        raise CliError(str(exc)) from None
    manifest = result.manifest
    if args.json:
        json.dump({"report": result.report, "files": result.files, "manifest_version": manifest["version"]},
                  sys.stdout, indent=1, default=str)  # fmt: skip
        print()
        return 0
    stats = manifest["stats"]
    print(f"dataset   {store.url} prefix {args.prefix!r} ({result.files} files)")
    print(f"source    {args.source}: {args.path}")
    print(f"users     {stats['users']:,} ({stats['active_users']:,} with events)")
    print(f"events    {stats['events']:,} from {manifest['start']} to {manifest['end']}")
    by_type = ", ".join(f"{k} {v:,}" for k, v in stats["events_by_type"].items())
    print(f"by type   {by_type}")
    skipped = {k: v for k, v in result.report.items() if k.startswith("rows_") and v}
    if skipped:
        print("dropped   " + ", ".join(f"{k.removeprefix('rows_')} {v:,}" for k, v in skipped.items()))
    return 0
