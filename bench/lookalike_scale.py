"""Lookalike at scale: feature build, fit and one expansion for 1M and 5M users (time, users/s, peak RSS).

Each stage runs in its own process (so "peak RSS" is that stage's, not the generator's) over a
dataset generated once by ``flashcrowd gen`` (8 days, ~20 events per user) and kept under
``--work`` for re-runs. The expansion's seed is every purchaser (users with a ``pay`` event), the
reach 5% of the population, through the same ``expand`` the service runs.

    .venv/bin/python bench/lookalike_scale.py                      # 1M and 5M users
    .venv/bin/python bench/lookalike_scale.py --users 100000       # a quick run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage(name: str, store_dir: Path, clusters: int) -> dict:
    from services.audience.lookalike import pipeline
    from services.audience.lookalike.expand import expand
    from services.events.dataset import EventDataset
    from services.storage import LocalObjectStore

    store = LocalObjectStore(store_dir)
    dataset = EventDataset(store)
    started = time.perf_counter()
    out: dict = {"stage": name}
    if name == "features":
        snap = pipeline.build_features(store, dataset)
        out.update(users=snap.population, shards=len(snap.shard_keys()), columns=len(snap.schema.columns))
    elif name == "fit":
        snap = pipeline.build_features(store, dataset)  # reused: same inputs, same snapshot id
        t0 = time.perf_counter()
        model = pipeline.train_model(store, snap, model_id="bench", clusters=clusters or None)
        started = t0
        fit = model.manifest["fit_seconds"]
        out.update(users=model.population, clusters=model.cluster_count, fits=model.fits, fit_seconds=fit)
    elif name == "expand":
        import polars as pl

        model = pipeline.resolve_model(store, "lookalike/", "bench")
        snap = pipeline.snapshot_for(store, "lookalike/", model)
        seed = (
            dataset.scan_events(columns=["user_id", "event_type"])
            .filter(pl.col("event_type") == 8)
            .select(pl.col("user_id").unique())
            .collect(engine="streaming")["user_id"]
            .to_numpy()
        )
        t0 = time.perf_counter()
        result = expand(model, snap, seed, reach_fraction=0.05)
        started = t0
        out.update(
            users=result.population,
            seed=result.seed_matched,
            selected=len(result.members),
            expected_lift_5=next(s.lift for s in result.lift_curve if s.requested),
            heldout_auc=round(result.heldout_auc, 4),
            blend=result.blend,
            timings={k: round(v, 2) for k, v in result.timings.items()},
        )
    out["seconds"] = round(time.perf_counter() - started, 2)
    out["peak_rss_mib"] = round(peak_rss_mib())
    return out


def run_stage(name: str, store_dir: Path, clusters: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--stage", name, "--store", str(store_dir), "--clusters", str(clusters)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--days", type=int, default=8)
    parser.add_argument("--clusters", type=int, default=0, help="0 = the population rule (64 here)")
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "bench" / "lookalike")
    parser.add_argument("--stage", choices=["features", "fit", "expand"], help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(stage(args.stage, args.store, args.clusters)))
        return 0

    rows = []
    for users in args.users:
        store_dir = args.work / f"gen-{users}-{args.days}d"
        if not (store_dir / "data" / "manifest.json").exists():
            t0 = time.perf_counter()
            subprocess.run(
                [str(ROOT / ".venv" / "bin" / "flashcrowd"), "gen", "--users", str(users),
                 "--days", str(args.days), "--store", str(store_dir), "--no-progress", "--overwrite"],
                check=True, capture_output=True,
            )  # fmt: skip
            print(f"generated {users:,} users in {time.perf_counter() - t0:.0f}s -> {store_dir}", flush=True)
        manifest = json.loads((store_dir / "data" / "manifest.json").read_text())
        events = manifest["stats"]["events"]
        # A clean lookalike area so that features are really built (not reused) in this run.
        import shutil

        shutil.rmtree(store_dir / "lookalike", ignore_errors=True)
        for name in ("features", "fit", "expand"):
            result = run_stage(name, store_dir, args.clusters)
            result.update(population=users, events=events)
            rows.append(result)
            print(json.dumps(result), flush=True)

    print()
    print(f"{'users':>10} {'events':>12} {'stage':<9} {'seconds':>8} {'users/s':>11} {'peak RSS':>9}  notes")
    for r in rows:
        rate = r["population"] / r["seconds"] if r["seconds"] else float("inf")
        notes = ""
        if r["stage"] == "features":
            notes = f"{r['shards']} shards x {r['columns']} columns"
        elif r["stage"] == "fit":
            notes = (
                f"k={r['clusters']} x {r['fits']} fits, fit {r['fit_seconds']}s on <= 500k sampled users, "
                "rest = assign all"
            )
        elif r["stage"] == "expand":
            notes = (
                f"seed {r['seed']:,}, 5% = {r['selected']:,}, expected lift {r['expected_lift_5']:.2f}x, "
                f"held-out AUC {r['heldout_auc']}"
            )
        print(
            f"{r['population']:>10,} {r['events']:>12,} {r['stage']:<9} {r['seconds']:>8.1f} {rate:>11,.0f}"
            f" {r['peak_rss_mib']:>6,} MiB  {notes}"
        )
    print()
    # The goal: an expansion within 2x of the fit time (the fit stage: fits + assignment).
    for users in args.users:
        by_stage = {r["stage"]: r for r in rows if r["population"] == users}
        if "fit" in by_stage and "expand" in by_stage:
            ratio = by_stage["expand"]["seconds"] / max(by_stage["fit"]["seconds"], 1e-9)
            print(
                f"{users:>10,} users: expand {by_stage['expand']['seconds']:.1f}s / fit "
                f"{by_stage['fit']['seconds']:.1f}s = {ratio:.2f}x (goal <= 2x)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
