"""Delta Lake (deltalake) against the hand-written JSON-manifest dataset: the measurements behind the lake.

    .venv/bin/python bench/lake_choice.py                 # 300 appends of 2,000 events, 2 x 10 racing commits
    .venv/bin/python bench/lake_choice.py --appends 1000 --batch 500
    .venv/bin/python bench/lake_choice.py --no-race --appends 1000 --batch 500 \
        --maintain-every 100 --expire-now

1. Commit safety on an S3-protocol store: two writers (threads, their own clients) append at once to
   one table on moto's S3 server over loopback; every commit must land once (table version = commits,
   rows = written, no duplicate ids). Delta commits by conditional put (``If-None-Match: *``); the
   manifest path's read-then-put version check is raced the same way as the baseline.
2. Write speed and metadata growth: ``--appends`` micro-batches of ``--batch`` events through the
   lake's ``TableWriter`` and through ``services.events.append.append_events`` (the raw baseline,
   same run, local store): events/s, commit time and one-day scan-planning time (open the dataset and
   list one day's files) after 10 appends and at the end, and metadata bytes (``_delta_log`` vs
   ``manifest.json``).
3. polars integration: ``pl.scan_delta`` over the lake table counts the same rows.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from services.events.schema import EVENTS_SCHEMA, PLATFORM_OWNER  # noqa: E402
from services.events.sharding import buckets_np  # noqa: E402


def batch(n: int, first_id: int, day: int) -> pl.DataFrame:
    ids = pl.Series([first_id + i for i in range(n)], dtype=pl.UInt64)
    users = pl.Series([1 + ((first_id + i) * 7919) % 2_000_000 for i in range(n)], dtype=pl.UInt32)
    base = datetime(2025, 6, 12, tzinfo=UTC) + timedelta(days=day)
    frame = pl.DataFrame(
        {
            "event_id": ids,
            "user_id": users,
            "bucket": pl.Series(buckets_np(users.to_numpy()), dtype=pl.UInt8),
            "ts": [base + timedelta(milliseconds=i) for i in range(n)],
            "event_type": pl.Series([5] * n, dtype=pl.UInt8),
            "owner": [PLATFORM_OWNER] * n,
        }
    )
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in EVENTS_SCHEMA.items() if c not in frame.columns]
    return frame.with_columns(missing).select(list(EVENTS_SCHEMA))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def race(per_writer: int, size: int) -> None:
    from moto.server import ThreadedMotoServer

    from services.events.append import ConcurrentAppend, append_events
    from services.events.lake import TableWriter
    from services.storage import MinioObjectStore

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:

        def store(bucket: str) -> MinioObjectStore:
            return MinioObjectStore(f"{host}:{port}", "bench", "bench-secret", bucket, secure=False)

        for kind in ("delta", "manifest"):
            s = store(f"race-{kind}")
            errors: list[str] = []
            if kind == "delta":
                TableWriter(s, "data/").append("events", batch(1, 10**12, 0))
            else:
                append_events(s, "data/", batch(1, 10**12, 0), part_tag="seed", consumer="w", checkpoint={})

            def writer(k: int, s: MinioObjectStore = s, kind: str = kind, errors: list[str] = errors) -> None:
                for i in range(per_writer):
                    frame = batch(size, 1 + (k * per_writer + i) * size, 0)
                    try:
                        if kind == "delta":
                            TableWriter(s, "data/").append("events", frame, app_id=f"w{k}", app_version=i)
                        else:
                            append_events(
                                s,
                                "data/",
                                frame,
                                part_tag=f"w{k}-{i}",
                                consumer=f"w{k}",
                                checkpoint={"seq": i},
                            )
                    except ConcurrentAppend:
                        errors.append("conflict")
                    except Exception as error:  # moto itself fails some racing puts of one key
                        errors.append(type(error).__name__)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.perf_counter() - t0
            if kind == "delta":
                table = TableWriter(s, "data/").open("events")
                assert table is not None
                ids = pl.DataFrame(table.to_pyarrow_table(columns=["event_id"]))["event_id"]
                landed = table.version()
                note = "losers of the conditional put re-read the log and retried"
            else:
                from services.events.dataset import EventDataset

                ds = EventDataset(s)
                ids = ds.scan_events(columns=["event_id"]).collect()["event_id"]
                landed = ds.version - 1
                refused = errors.count("conflict")
                note = (
                    f"{refused} appends refused by the version check, {len(errors) - refused} failed, "
                    f"{2 * per_writer - landed - len(errors)} lost silently"
                )
            print(
                f"race      {kind:<8} 2 writers x {per_writer} commits: {landed} landed, "
                f"{ids.len() - 1:,} rows of {2 * per_writer * size:,} written, "
                f"{ids.len() - ids.n_unique()} duplicate ids; {note}; {took:.1f} s"
            )
    finally:
        server.stop()


def speed(appends: int, size: int, maintain_every: int) -> None:
    from services.events.append import append_events
    from services.events.dataset import EventDataset
    from services.events.lake import TableWriter
    from services.events.lake.descriptor import write_descriptor
    from services.events.lake.maintenance import MaintenanceOptions, maintain
    from services.storage import LocalObjectStore

    for kind in ("manifest", "delta"):
        root = Path(tempfile.mkdtemp(prefix=f"flashcrowd-bench-{kind}-"))
        store = LocalObjectStore(root)
        lake = TableWriter(store, "data/")  # one long-lived writer, as in the compactor
        if kind == "delta":
            write_descriptor(store, "data/", {})
        commit_ms: list[float] = []
        marks: dict[int, tuple[float, float]] = {}
        t_all = time.perf_counter()
        for i in range(appends):
            if kind == "delta" and maintain_every and i and i % maintain_every == 0:
                maintain(
                    store, "data/", MaintenanceOptions(retention_days=None, min_small_files=2, vacuum_hours=0)
                )
            frame = batch(size, 1 + i * size, i % 8)
            t0 = time.perf_counter()
            if kind == "delta":
                lake.append("events", frame, app_id="bench", app_version=i)
            else:
                append_events(
                    store, "data/", frame, part_tag=f"{i:06d}", consumer="bench", checkpoint={"seq": i}
                )
            commit_ms.append((time.perf_counter() - t0) * 1e3)
            if i + 1 in (10, appends):
                t0 = time.perf_counter()
                ds = EventDataset(store)
                ds.parts("events", days=[ds.days()[0]])
                plan_ms = (time.perf_counter() - t0) * 1e3
                marks[i + 1] = (statistics.median(commit_ms[-10:]), plan_ms)
        took = time.perf_counter() - t_all
        meta = dir_bytes(root / "data" / "tables" / "events" / "_delta_log") if kind == "delta" else (
            root / "data" / "manifest.json").stat().st_size  # fmt: skip
        first, last = marks[10], marks[appends]
        label = f"{kind}+m{maintain_every}" if kind == "delta" and maintain_every else kind
        print(
            f"append    {label:<8} {appends} x {size:,} events: {appends * size / took:,.0f} ev/s; commit "
            f"{first[0]:.1f} ms after 10, {last[0]:.1f} ms after {appends} ({last[0] / first[0]:.2f}x); "
            f"plan a day {first[1]:.1f} -> {last[1]:.1f} ms ({last[1] / first[1]:.2f}x); "
            f"metadata {meta / 1024:,.0f} KiB"
        )
        if kind == "delta":
            where = TableWriter(store, "data/").location("events")
            t0 = time.perf_counter()
            rows = pl.scan_delta(where.uri).select(pl.len()).collect().item()
            took_ms = (time.perf_counter() - t0) * 1e3
            print(f"polars    scan_delta counts {rows:,} rows of {appends * size:,} in {took_ms:.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--race-commits", type=int, default=10, help="commits per writer in the race")
    parser.add_argument("--no-race", action="store_true", help="skip the two-writer race")
    parser.add_argument(
        "--expire-now",
        action="store_true",
        help="lake: log and tombstone retention 0 (as if the tables' 1 day / 1 hour had passed)",
    )
    parser.add_argument(
        "--maintain-every",
        type=int,
        default=0,
        help="lake: run maintain (compact, checkpoint, vacuum) every N appends",
    )
    args = parser.parse_args()
    if args.appends < 10 or args.batch < 1 or args.race_commits < 1:
        parser.error("--appends must be >= 10, --batch and --race-commits >= 1")
    if args.expire_now:
        from services.events.lake import writer

        writer.TABLE_CONFIGURATION.update(
            {
                "delta.logRetentionDuration": "interval 0 seconds",
                "delta.deletedFileRetentionDuration": "interval 0 seconds",
            }
        )
    if not args.no_race:
        race(args.race_commits, 200)
    speed(args.appends, args.batch, args.maintain_every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
