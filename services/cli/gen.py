"""``flashcrowd gen``: generate the deterministic flash-sale dataset into an object store."""

from __future__ import annotations

import argparse
import sys
from datetime import date

from services.cli.common import (
    CliError,
    add_store_argument,
    add_table_format_argument,
    open_store_arg,
    table_format_arg,
)

NAME = "gen"
HELP = "generate the synthetic flash-sale event dataset (deterministic in --seed)"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=_positive, default=100_000, help="population size (default 100000)")
    parser.add_argument("--days", type=_positive, default=8, help="number of days (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same args, same bytes")
    add_store_argument(parser)
    parser.add_argument("--prefix", default="data/", help="key prefix of the dataset (default data/)")
    parser.add_argument(
        "--chunk-users",
        type=_positive,
        default=100_000,
        help="users per chunk (default 100000): bounds memory and sets the file split; "
        "the events do not change",
    )
    parser.add_argument(
        "--sale-day",
        type=int,
        default=None,
        metavar="K",
        help="day index of the flash sale, 0-based, negative from the end (default: second-to-last day)",
    )
    parser.add_argument("--start-date", type=_day, default=None, help="first day, UTC (default 2025-06-12)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset under --prefix")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_table_format_argument(parser)


def run(args: argparse.Namespace) -> int:
    from services.events.generator import DatasetExistsError, GenConfig, generate
    from services.events.pepper import load_pepper
    from services.events.world import DEFAULT_START_DATE
    from services.runtime import ConfigError

    if args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    try:
        config = GenConfig(
            users=args.users,
            days=args.days,
            seed=args.seed,
            start_date=args.start_date or DEFAULT_START_DATE,
            sale_day=args.sale_day,
            chunk_users=args.chunk_users,
            prefix=args.prefix,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        pepper = load_pepper()  # FLASHCROWD_IDENTITY_PEPPER, else ./var/identity-pepper (created once)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    table_format = table_format_arg(args.table_format)
    store = open_store_arg(args.store)
    try:
        result = generate(
            store,
            config,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            pepper=pepper,
            table_format=table_format,
        )
    except DatasetExistsError as exc:
        raise CliError(str(exc)) from None
    story = result.story
    sold_out = story.get("hook_sold_out_at")
    lines = [
        f"dataset   {store.url} prefix {config.prefix!r} "
        + (
            f"(Delta tables under {config.prefix}tables/, {config.prefix}lake.json)"
            if table_format == "delta"
            else f"(manifest {config.prefix}manifest.json)"
        ),
        f"users     {result.users:,} ({result.manifest['stats']['active_users']:,} active, "
        f"{result.manifest['stats']['bots']:,} bots)",
        f"events    {result.events:,} over {config.days} days in {result.files} files, "
        f"{result.bytes / 1e6:,.1f} MB",
        f"sale      {config.start_date.isoformat()} + {config.sale_day_index} days, hook item: "
        f"{story['hook_attempts']:,} attempts, {story['hook_pays_at_sale_price']} paid at sale price, "
        + (f"sold out at {sold_out} (+{story['hook_sold_out_after_s']} s)" if sold_out else "not sold out"),
        f"identity  keyed hashes only (HMAC-SHA-256), pepper id {pepper.id} from {pepper.source}",
        f"took      {result.seconds:,.1f} s, {result.events_per_second:,.0f} events/s, "
        f"peak RSS {result.peak_rss_bytes / 2**20:,.0f} MiB",
    ]
    print("\n".join(lines), file=sys.stdout)
    return 0
