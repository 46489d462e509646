"""``flashcrowd data import taobao|movielens PATH``: public data sets -> a normal event dataset.

    flashcrowd data import taobao ../shared/data/taobao-userbehavior-first-users [--prefix data/]
    flashcrowd data import movielens ../shared/data/movielens-100k --store s3://... --overwrite

The adapters (``services/events/adapters``) map the source schema to ours and write through the
generator's writer (same layout, manifest last); the files are read in place, never copied.
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

NAME = "data"
HELP = "import public data sets (Taobao UserBehavior, MovieLens 100K) as event datasets"


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


def run(args: argparse.Namespace) -> int:
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
