"""``flashcrowd db migrate|status``: the retarget ledger's schema, outside the service.

A ``services.cli`` command module (``NAME``, ``HELP``, ``add_arguments``, ``run``). The Kubernetes
``retarget-migrate`` Job runs ``flashcrowd db migrate`` before pods roll; the service also migrates
at start (both are idempotent and safe to run at once: PostgreSQL serialises them on an advisory
lock). The database comes from ``--database-url`` or ``FLASHCROWD_DATABASE_URL``.
"""

from __future__ import annotations

import argparse

NAME = "db"
HELP = "retarget ledger schema: apply migrations, show the version"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    for name, text in (
        ("migrate", "apply missing migrations (idempotent)"),
        ("status", "print the schema version"),
    ):
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument(
            "--database-url",
            default=None,
            help="postgresql://... or sqlite:///path (default: $FLASHCROWD_DATABASE_URL, else the service's)",
        )


def run(args: argparse.Namespace) -> int:
    from services.cli.common import CliError
    from services.retarget.config import RetargetSettings
    from services.retarget.db import Database
    from services.retarget.migrations import MIGRATIONS, migrate, schema_version
    from services.runtime import ConfigError, load_settings

    overrides = {"database_url": args.database_url} if args.database_url else {}
    try:
        settings = load_settings(RetargetSettings, **overrides)
    except ConfigError as error:
        raise CliError(str(error)) from None
    try:
        database = Database.open(settings.database_url, pool_min=1, pool_max=1)
    except Exception as error:
        raise CliError(f"cannot open {settings.database_url}: {error}") from None
    try:
        if args.db_command == "migrate":
            applied = migrate(database)
            print(f"applied {applied}" if applied else "nothing to apply", end="; ")
        version = schema_version(database)
        print(f"schema version {version} (latest {MIGRATIONS[-1].version})")
    finally:
        database.close()
    return 0
