"""Adapters from public data sets to flashcrowd's event, profile and identity schemas.

``read_taobao`` / ``read_movielens`` return frames (``AdaptedData``); ``write_dataset`` publishes
them as a normal dataset (same layout as ``flashcrowd gen``). ``import_dataset`` does both; the CLI
is ``flashcrowd data import taobao|movielens PATH``.
"""

from __future__ import annotations

from pathlib import Path

from services.events.adapters.common import (
    AdaptedData,
    ImportResult,
    shared_data_dir,
    unknown_profiles,
    write_dataset,
)
from services.storage import ObjectStore

__all__ = [
    "SOURCES",
    "AdaptedData",
    "ImportResult",
    "import_dataset",
    "read_source",
    "shared_data_dir",
    "unknown_profiles",
    "write_dataset",
]

SOURCES = ("taobao", "movielens")


def read_source(source: str, path: str | Path, **options: object) -> AdaptedData:
    if source == "taobao":
        from services.events.adapters.taobao import read_taobao

        return read_taobao(path, **options)  # type: ignore[arg-type]
    if source == "movielens":
        from services.events.adapters.movielens import read_movielens

        return read_movielens(path)
    raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")


def import_dataset(
    store: ObjectStore,
    source: str,
    path: str | Path,
    *,
    prefix: str = "data/",
    overwrite: bool = False,
    table_format: str | None = None,
    **options: object,
) -> ImportResult:
    """Read ``path`` with the ``source`` adapter and publish it under ``prefix``."""
    return write_dataset(
        store,
        read_source(source, path, **options),
        prefix=prefix,
        overwrite=overwrite,
        table_format=table_format,
    )
