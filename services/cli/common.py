"""Helpers shared by subcommands: user-facing errors and the ``--store`` option."""

from __future__ import annotations

import argparse
import os

from services.storage.base import ObjectStore

STORE_ENV = "FLASHCROWD_STORE_URL"
DEFAULT_STORE = "./var/store"


class CliError(Exception):
    """An error the user can fix; the message says how. Printed without a traceback, exit status 2."""


def default_store_url() -> str:
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help=f"object store: a directory, file:///path or s3://[ACCESS:SECRET@]host[:port]/bucket "
        f"(default: ${STORE_ENV} or {DEFAULT_STORE})",
    )


def add_table_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        dest="table_format",
        choices=["delta", "manifest"],
        default=None,
        help="dataset format: a Delta Lake event lake or the JSON-manifest dataset "
        "(default: $FLASHCROWD_TABLE_FORMAT, else manifest)",
    )


def table_format_arg(value: str | None) -> str:
    """``--format``, else ``$FLASHCROWD_TABLE_FORMAT`` (a bad value is a ``CliError`` naming it)."""
    from services.events.parts import default_table_format

    if value:
        return value
    try:
        return default_table_format()
    except ValueError as exc:
        raise CliError(str(exc)) from None


def open_store_arg(url: str | None, *, existing: bool = False) -> ObjectStore:
    """The store ``--store`` names; ``existing``: a read-only command, so a local directory that does
    not exist is an error (a typo must not create an empty store and answer "nothing here")."""
    from services.storage.factory import local_path, open_store

    url = url or default_store_url()
    if existing and (path := local_path(url)) is not None and not path.is_dir():
        raise CliError(f"no object store at {path} (no such directory): check --store or ${STORE_ENV}")
    try:
        return open_store(url)
    except ValueError as exc:
        raise CliError(f"cannot open object store: {exc}") from None
