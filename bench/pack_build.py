"""Pack build vs a hand-written polars query, and raw Roaring set operations.

    .venv/bin/python bench/pack_build.py                      # 2M users x 3 days (~18M events)
    .venv/bin/python bench/pack_build.py --users 200000 --days 2 --repeat 3 --setop-members 1000000
    .venv/bin/python bench/pack_build.py --format delta --appends 10000 --no-setops

1. "Clicked in the window minus paid in the window" over the whole generated dataset: our build
   (``build_pack``: validate, compile, fused scan, bitmaps, set algebra; bots kept so both sides answer
   the same question) against a hand-written lazy polars query on the same files (scan, filter,
   unique, anti-join, ids to numpy). Each side runs in its own fresh process (so peak RSS is its
   own), warm-up first, then ``--repeat`` timed runs; the median and best are printed, with the
   ratio ours / raw (goal: <= 1.0x) and a check that both found the same set.
   ``--format delta`` runs it on an event lake ("the same files" = the snapshot's live files, listed
   from the Delta log inside the raw side's timed run); with ``--appends N`` also after N small
   appends through the lake writer and again after ``maintain`` compacted them.
2. Union / intersect / exclude of two random ``--setop-members`` packs with raw pyroaring.

The dataset is generated once into ``--cache-dir`` (default ``var/bench``, git-ignored) with the
generator's progress bar, and reused afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _window(store_dir: Path) -> tuple[datetime, datetime]:
    from services.events.dataset import EventDataset
    from services.storage import LocalObjectStore

    dataset = EventDataset(LocalObjectStore(store_dir))
    return dataset.start, dataset.end


def _event_files(store_dir: Path) -> list[str]:
    """The Parquet files of the dataset's current version (for a lake: the snapshot's live files)."""
    if (store_dir / "data" / "lake.json").exists():
        from deltalake import DeltaTable

        return sorted(DeltaTable(str(store_dir / "data" / "tables" / "events")).file_uris())
    return sorted(str(p) for p in (store_dir / "data" / "events").glob("dt=*/part-*.parquet"))


def _digest(ids) -> str:
    import numpy as np

    return hashlib.sha256(np.sort(np.asarray(ids, dtype=np.uint32)).tobytes()).hexdigest()[:16]


# --- the two contenders (each runs in a child process) ------------------------------------------------


def child_ours(store_dir: Path, repeat: int) -> dict:
    from flashcrowd.audience.v1 import spec_pb2

    from services.audience.builder import build_pack
    from services.audience.compiler import bitmap_to_numpy
    from services.audience.spec_io import spec_from_data
    from services.events.dataset import EventDataset
    from services.runtime.errors import NotFound
    from services.storage import LocalObjectStore

    start, end = _window(store_dir)
    window = {"absolute": {"startTime": start.isoformat(), "endTime": end.isoformat()}}
    spec = spec_from_data(
        {
            "exclude": {
                "base": {"shortcut": {"kind": "clickers", "window": window}},
                "subtract": [{"behavior": {"eventTypes": ["pay"], "window": window}}],
            }
        }
    )

    def no_packs(name: str, version: int):
        raise NotFound("flashcrowd.dev/Pack", name)

    options = spec_pb2.BuildOptions(include_bots=True)
    times, result = [], None
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        dataset = EventDataset(LocalObjectStore(store_dir))  # reads the manifest: part of a build
        result = build_pack(dataset, spec, options, resolve_pack=no_packs, tenant="bench")
        if i:  # the first run warms the page cache and imports
            times.append(time.perf_counter() - t0)
    assert result is not None
    return {
        "times": times,
        "size": len(result.bitmap),
        "digest": _digest(bitmap_to_numpy(result.bitmap)),
        "events_matched": result.stats.events_matched,
        "files_read": result.stats.files_read,
        "peak_rss_mib": _peak_rss_mib(),
    }


def child_raw(store_dir: Path, repeat: int) -> dict:
    import polars as pl

    start, end = _window(store_dir)
    times, ids = [], None
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        files = _event_files(store_dir)  # listing the current files is part of the query
        events = pl.scan_parquet(files)
        in_window = (pl.col("ts") >= start) & (pl.col("ts") < end)
        clicked = events.filter(in_window & (pl.col("event_type") == 5)).select("user_id").unique()
        paid = events.filter(in_window & (pl.col("event_type") == 8)).select("user_id").unique()
        ids = clicked.join(paid, on="user_id", how="anti").collect().get_column("user_id").to_numpy()
        if i:
            times.append(time.perf_counter() - t0)
    assert ids is not None
    return {
        "times": times,
        "size": len(ids),
        "digest": _digest(ids),
        "files": len(files),
        "peak_rss_mib": _peak_rss_mib(),
    }


# --- orchestration ------------------------------------------------------------------------------------


def ensure_dataset(cache_dir: Path, users: int, days: int, seed: int, table_format: str = "manifest") -> Path:
    suffix = "-delta" if table_format == "delta" else ""
    store_dir = cache_dir / f"u{users}-d{days}-s{seed}{suffix}"
    marker = "lake.json" if table_format == "delta" else "manifest.json"
    if (store_dir / "data" / marker).exists():
        print(f"dataset   {store_dir} (cached)")
        return store_dir
    print(f"dataset   generating {users:,} users x {days} days into {store_dir} (once) ...", flush=True)
    command = [sys.executable, "-m", "services.cli.main", "gen", "--users", str(users), "--days", str(days),
               "--seed", str(seed), "--store", str(store_dir), "--overwrite",
               "--format", table_format]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT)
    return store_dir


def small_appends(source: Path, appends: int, size: int, users: int) -> Path:
    """A copy of the lake ``source`` after ``appends`` commits of ``size`` clicks/payments each
    (inside the dataset's window, through the compactor's writer), made once and cached."""
    import shutil

    import numpy as np
    import polars as pl

    from services.events.lake import TableWriter
    from services.events.schema import EVENTS_SCHEMA, PLATFORM_OWNER
    from services.events.sharding import buckets_np
    from services.storage import LocalObjectStore

    target = source.with_name(f"{source.name}-appends{appends}x{size}")
    done = target / "appends.done"  # written last: a run killed half way is not taken for a cache
    if done.exists():
        print(f"appends   {target} (cached)")
        return target
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    start, end = _window(target)
    writer = TableWriter(LocalObjectStore(target), "data/")
    rng = np.random.default_rng(7)
    span_us = int((end - start).total_seconds() * 1e6) - 1
    t0 = time.perf_counter()
    for i in range(appends):
        uids = rng.integers(1, users + 1, size, dtype=np.uint32)
        frame = pl.DataFrame(
            {
                "event_id": pl.Series(
                    (np.uint64(1) << np.uint64(60)) + np.arange(i * size, (i + 1) * size, dtype=np.uint64)
                ),
                "user_id": pl.Series(uids),
                "bucket": pl.Series(buckets_np(uids)),
                "ts": pl.Series(rng.integers(0, span_us, size)).cast(pl.Duration("us")) + start,
                "event_type": pl.Series(rng.choice(np.array([5, 8], dtype=np.uint8), size)),
                "owner": [PLATFORM_OWNER] * size,
            }
        )
        missing = [pl.lit(None, dtype=t).alias(c) for c, t in EVENTS_SCHEMA.items() if c not in frame.columns]
        writer.append(
            "events", frame.with_columns(missing).select(list(EVENTS_SCHEMA)), app_id="bench", app_version=i
        )
        if (i + 1) % max(1, appends // 10) == 0:
            print(f"appends   {i + 1:,} / {appends:,} ({time.perf_counter() - t0:,.0f} s)", flush=True)
    done.write_text(f"{appends} x {size}\n")
    return target


def compacted(source: Path) -> Path:
    """A copy of ``source`` after ``flashcrowd data maintain`` (compaction, checkpoint, vacuum)."""
    import shutil

    from services.events.lake.maintenance import MaintenanceOptions, maintain
    from services.storage import LocalObjectStore

    target = source.with_name(f"{source.name}-compacted")
    done = target / "compacted.done"
    if not done.exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        t0 = time.perf_counter()
        options = MaintenanceOptions(retention_days=None, min_small_files=2, vacuum_hours=0)
        for report in maintain(LocalObjectStore(target), "data/", options):
            print(f"maintain  {report.table}: files {report.files_before} -> {report.files_after}")
        print(f"maintain  took {time.perf_counter() - t0:,.1f} s")
        done.write_text("compacted\n")
    return target


def run_child(kind: str, store_dir: Path, repeat: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--store-dir",
        str(store_dir),
        "--repeat",
        str(repeat),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def setops(members: int, universe: int, repeat: int) -> None:
    import numpy as np
    from pyroaring import BitMap

    from services.audience.compiler import ids_to_bitmap

    rng = np.random.default_rng(0)
    a = ids_to_bitmap(rng.choice(universe, members, replace=False))
    b = ids_to_bitmap(rng.choice(universe, members, replace=False))
    print(f"setops    two packs of {len(a):,} / {len(b):,} members over ids < {universe:,} (raw pyroaring)")
    for name, op in (
        ("union", lambda: a | b),
        ("intersect", lambda: a & b),
        ("exclude", lambda: a - b),
        ("union_cardinality", lambda: a.union_cardinality(b)),
    ):
        times = []
        result = None
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = op()
            times.append(time.perf_counter() - t0)
        size = result if isinstance(result, int) else len(result)  # type: ignore[arg-type]
        print(f"          {name:<18} median {statistics.median(times) * 1e3:8.2f} ms  "
              f"best {min(times) * 1e3:8.2f} ms  -> {size:,}")  # fmt: skip
    blob = a.serialize()
    t0 = time.perf_counter()
    BitMap.deserialize(blob)
    took = (time.perf_counter() - t0) * 1e3
    print(f"          serialized {len(blob) / 2**20:.1f} MiB, deserialize {took:.2f} ms")


def compare(label: str, store_dir: Path, repeat: int) -> bool:
    import polars as pl

    from services.events.dataset import EventDataset
    from services.storage import LocalObjectStore

    dataset = EventDataset(LocalObjectStore(store_dir))
    kind = "Delta lake" if dataset.lake is not None else "manifest dataset"
    rows = dataset.scan_events().select(pl.len()).collect().item()
    print(f"stage     {label}: {kind}, {len(dataset.parts('events')):,} event files, {rows:,} events")
    window = f"[{dataset.start.isoformat()}, {dataset.end.isoformat()})"
    print(f"query     clicked in {window} minus paid in the same window")
    raw = run_child("raw", store_dir, repeat)
    ours = run_child("ours", store_dir, repeat)
    same = raw["digest"] == ours["digest"] and raw["size"] == ours["size"]
    r_med, o_med = statistics.median(raw["times"]), statistics.median(ours["times"])
    for name, side in (("raw", raw), ("ours", ours)):
        extra = (
            f" ({side['events_matched']:,} events matched, {side['files_read']} files)"
            if name == "ours"
            else ""
        )
        print(
            f"{name:<9} median {statistics.median(side['times']):.3f} s  best {min(side['times']):.3f} s  "
            f"peak RSS {side['peak_rss_mib']:,.0f} MiB  -> {side['size']:,} users{extra}"
        )
    best_ratio = min(ours["times"]) / min(raw["times"])
    print(
        f"ratio     ours / raw = {o_med / r_med:.2f}x (median), {best_ratio:.2f}x (best); goal <= 1.0x; "
        f"same set: {'yes' if same else 'NO'}"
    )
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per side (after one warm-up)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--setop-members", type=int, default=10_000_000)
    parser.add_argument(
        "--setop-universe", type=int, default=100_000_000, help="ids are drawn below this (density matters)"
    )
    parser.add_argument("--no-setops", action="store_true")
    parser.add_argument("--format", choices=["manifest", "delta"], default="manifest", help="dataset format")
    parser.add_argument(
        "--appends", type=int, default=0, help="delta: also measure after N small appends + compaction"
    )
    parser.add_argument("--append-size", type=int, default=200, help="events per small append (default 200)")
    parser.add_argument("--child", choices=["ours", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--store-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = (child_ours if args.child == "ours" else child_raw)(args.store_dir, args.repeat)
        print(json.dumps(result))
        return 0

    store_dir = ensure_dataset(args.cache_dir, args.users, args.days, args.seed, args.format)
    stages = [("as generated", store_dir)]
    if args.format == "delta" and args.appends:
        appended = small_appends(store_dir, args.appends, args.append_size, args.users)
        stages += [
            (f"after {args.appends:,} small appends", appended),
            ("after compaction", compacted(appended)),
        ]
    same = True
    for label, where in stages:
        same = compare(label, where, args.repeat) and same
    if not args.no_setops:
        setops(args.setop_members, max(args.setop_universe, args.setop_members), max(3, args.repeat))
    print(f"when      {datetime.now(UTC).isoformat(timespec='seconds')}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
