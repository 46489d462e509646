"""``flashcrowd demo``: the flash-sale story end to end on embedded defaults (no servers needed)."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "run the flash-sale story end to end (local store, SQLite, in-process services)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="./var/demo", help="where the demo writes (wiped first)")
    parser.add_argument("--users", type=int, default=50_000, help="population size (default 50000)")
    parser.add_argument("--days", type=int, default=8, help="days of events (default 8)")
    parser.add_argument("--seed", type=int, default=7, help="generator seed (default 7)")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    from pathlib import Path

    from services.demo.story import DemoOptions, run_demo

    logging.basicConfig(level=logging.WARNING)
    options = DemoOptions(
        workdir=Path(args.workdir).resolve(), users=args.users, days=args.days, seed=args.seed
    )
    asyncio.run(run_demo(options))
    return 0
