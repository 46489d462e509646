"""``flashcrowd`` entry point: ``flashcrowd <command> [options]``.

Each subcommand is a module in ``COMMANDS`` exposing ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``. To add one, write the module and append its import path below. Modules are
imported when the parser is built, so keep their top-level imports light (import heavy libraries
inside ``run``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from services.cli.common import CliError

COMMANDS: list[str] = [
    "services.cli.gen",
    "services.cli.pack",
    "services.cli.demo",
    "services.cli.data",
    "services.cli.lookalike",
    "services.gateway.cli",
    "services.retarget.cli",
    "services.cli.dev",
    "services.cli.tenant",
    "services.cli.key",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashcrowd",
        description="flashcrowd: crowd packs, lookalikes and retargeting for live commerce",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for path in COMMANDS:
        module = importlib.import_module(path)
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    """``flashcrowd pack list``: the command and, by the ``<command>_command`` convention, its
    subcommand, so that an error names exactly what was run."""
    sub = getattr(args, f"{str(args.command).replace('-', '_')}_command", None)
    return " ".join(part for part in ("flashcrowd", args.command, sub) if part)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    name = _command_name(args)
    try:
        return int(run(args) or 0)
    except CliError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `flashcrowd gen ... | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
