"""Rebuild the scheduled packs: for each entry, build every user-id shard, then merge.

Run by the pack-refresh CronJob (mounted from a ConfigMap into the flashcrowd image, so it uses
only the standard library and PyYAML, which the image has):

    python refresh_packs.py --schedule /etc/flashcrowd/scheduled/scheduled-packs.yaml

For each pack it runs, with one run id shared by the shards and the merge (also exported as
FLASHCROWD_RUN_ID), the dataset prefix from FLASHCROWD_DATASET_PREFIX when set:

    flashcrowd pack build SPEC --tenant T --pack-id P --shard i/n --run-id R [--prefix D] --no-progress
    flashcrowd pack merge --tenant T --pack-id P --shards n --run-id R

A failing pack is reported and the others still refresh; the exit status is 1 if any failed,
2 if the schedule itself is invalid (nothing is run then).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ScheduleError(Exception):
    """The schedule file is not a valid list of packs; the message says where."""


@dataclass(frozen=True)
class ScheduledPack:
    tenant: str
    pack_id: str
    spec: Path
    shards: int = 1


def load_schedule(path: Path) -> list[ScheduledPack]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ScheduleError(f"{path}: cannot read schedule: {error}") from None
    if document is None:
        return []
    if not isinstance(document, dict) or not isinstance(document.get("packs", []), list):
        raise ScheduleError(f"{path}: expected a mapping with a list under 'packs'")
    packs: list[ScheduledPack] = []
    seen: set[tuple[str, str]] = set()
    for index, entry in enumerate(document.get("packs") or []):
        where = f"{path}: packs[{index}]"
        if not isinstance(entry, dict):
            raise ScheduleError(f"{where}: expected a mapping, got {type(entry).__name__}")
        unknown = set(entry) - {"tenant", "pack_id", "spec", "shards"}
        if unknown:
            raise ScheduleError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        for field in ("tenant", "pack_id", "spec"):
            if not isinstance(entry.get(field), str) or not entry[field]:
                raise ScheduleError(f"{where}: '{field}' is required (a non-empty string)")
        for field in ("tenant", "pack_id"):
            if not _ID.match(entry[field]):
                raise ScheduleError(f"{where}: {field} {entry[field]!r} must be lower-case a-z, 0-9, '-'")
        shards = entry.get("shards", 1)
        if not isinstance(shards, int) or isinstance(shards, bool) or not 1 <= shards <= 4096:
            raise ScheduleError(f"{where}: shards must be an integer in 1..4096, got {shards!r}")
        spec = (path.parent / entry["spec"]).resolve()
        if not spec.is_file():
            raise ScheduleError(f"{where}: spec file {entry['spec']!r} not found next to the schedule")
        key = (entry["tenant"], entry["pack_id"])
        if key in seen:
            raise ScheduleError(f"{where}: pack {key[0]}/{key[1]} is listed twice")
        seen.add(key)
        packs.append(ScheduledPack(entry["tenant"], entry["pack_id"], spec, shards))
    return packs


def commands(
    pack: ScheduledPack, run_id: str, cli: str = "flashcrowd", prefix: str | None = None
) -> list[list[str]]:
    """The CLI invocations that refresh ``pack``: every shard's build, then the merge."""
    common = ["--tenant", pack.tenant, "--pack-id", pack.pack_id]
    dataset = ["--prefix", prefix] if prefix else []
    builds = [
        [
            cli,
            "pack",
            "build",
            str(pack.spec),
            *common,
            "--shard",
            f"{i}/{pack.shards}",
            "--run-id",
            run_id,
            *dataset,
            "--no-progress",
        ]
        for i in range(pack.shards)
    ]
    merge = [cli, "pack", "merge", *common, "--shards", str(pack.shards), "--run-id", run_id]
    return [*builds, merge]


Runner = Callable[..., subprocess.CompletedProcess]


def refresh(
    pack: ScheduledPack, run_id: str, *, cli: str = "flashcrowd", run: Runner = subprocess.run
) -> bool:
    env = {**os.environ, "FLASHCROWD_RUN_ID": run_id}
    for argv in commands(pack, run_id, cli, os.environ.get("FLASHCROWD_DATASET_PREFIX")):
        print(f"refresh {pack.tenant}/{pack.pack_id}: {' '.join(argv)}", flush=True)
        result = run(argv, env=env, check=False)
        if result.returncode != 0:
            print(
                f"refresh {pack.tenant}/{pack.pack_id}: FAILED (exit {result.returncode}) "
                f"at: {' '.join(argv)}",
                file=sys.stderr,
                flush=True,
            )
            return False
    return True


def main(argv: Sequence[str] | None = None, *, run: Runner = subprocess.run) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", type=Path, required=True, help="scheduled-packs.yaml")
    parser.add_argument("--cli", default="flashcrowd", help="the flashcrowd CLI executable")
    parser.add_argument("--run-id", help="default: refresh-<UTC timestamp>")
    args = parser.parse_args(argv)
    try:
        packs = load_schedule(args.schedule)
    except ScheduleError as error:
        print(f"refresh: {error}", file=sys.stderr)
        return 2
    run_id = args.run_id or "refresh-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    if not packs:
        print("refresh: no scheduled packs", flush=True)
        return 0
    failed = []
    for pack in packs:
        started = time.monotonic()
        ok = refresh(pack, run_id, cli=args.cli, run=run)
        print(
            f"refresh {pack.tenant}/{pack.pack_id}: {'ok' if ok else 'failed'} "
            f"in {time.monotonic() - started:.1f}s"
        )
        if not ok:
            failed.append(f"{pack.tenant}/{pack.pack_id}")
    print(f"refresh {run_id}: {len(packs) - len(failed)} of {len(packs)} packs refreshed", flush=True)
    if failed:
        print(f"refresh {run_id}: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
