"""Uplift targeting on the Hillstrom e-mail experiment: train on one half, Qini on the other.

For each e-mail arm against "No E-Mail" and each outcome (visit, conversion), over several random
halvings: the Qini coefficient (area between the Qini curve and random targeting, x1000, per
member) and the uplift inside the top 10/20/30% for the two-model and class-transformation uplift
models (services/retarget/uplift.py), a response model (who responds when e-mailed) and random
scores (the raw baseline). Mean and standard deviation over the halvings.

    nice -n 10 .venv/bin/python bench/uplift_hillstrom.py            # 3 halvings (~2-3 min)
    .venv/bin/python bench/uplift_hillstrom.py --splits 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.events.adapters.common import shared_data_dir  # noqa: E402
from services.retarget import uplift  # noqa: E402
from services.retarget.hillstrom import FEATURES, read_hillstrom  # noqa: E402

SHARES = (0.1, 0.2, 0.3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--splits", type=int, default=3)
    args = parser.parse_args(argv)
    folder = shared_data_dir() / "hillstrom-email"
    if not (folder / "hillstrom.csv").is_file():
        print(f"no Hillstrom data under {folder}: nothing to measure (set FLASHCROWD_SHARED_DATA)")
        return 0
    data = read_hillstrom(folder)
    print(f"Hillstrom: {data.height:,} customers; {args.splits} random halvings; Qini x1000 per member")
    header = f"{'arm':7} {'outcome':10} {'scorer':21} {'Qini':>14} " + " ".join(
        f"{'up@' + str(int(s * 100)) + '%':>15}" for s in SHARES
    )
    print(header)
    for arm in ("mens", "womens"):
        frame = data.filter(pl.col("arm").is_in([arm, "holdout"]))
        features = frame.select(FEATURES).to_numpy().astype(float)
        treated = frame["treated"].to_numpy()
        for outcome in ("visit", "conversion"):
            y = frame[outcome].to_numpy()
            results: dict[str, list[tuple[float, ...]]] = {}
            started = time.perf_counter()
            for split in range(args.splits):
                rng = np.random.default_rng(split)
                train = rng.random(frame.height) < 0.5
                held_t, held_y = treated[~train], y[~train]
                scores = {
                    "two-model": uplift.fit_uplift(
                        features[train], treated[train], y[train], seed=split
                    ).predict(features[~train]),
                    "class-transformation": uplift.fit_uplift(
                        features[train], treated[train], y[train], method="class-transformation", seed=split
                    ).predict(features[~train]),
                    "response model": uplift.fit_response(
                        features[train], treated[train], y[train], seed=split
                    ).predict_proba(features[~train])[:, 1],
                    "random (baseline)": rng.random(int((~train).sum())),
                }
                for name, score in scores.items():
                    row = (
                        uplift.qini(score, held_t, held_y).coefficient * 1000,
                        *(uplift.uplift_at(score, held_t, held_y, s) for s in SHARES),
                    )
                    results.setdefault(name, []).append(row)
            for name, rows in results.items():
                values = np.array(rows)
                mean, sd = values.mean(axis=0), values.std(axis=0)
                cells = " ".join(f"{m:+7.4f}±{s:.4f}" for m, s in zip(mean[1:], sd[1:], strict=True))
                print(f"{arm:7} {outcome:10} {name:21} {mean[0]:+7.3f}±{sd[0]:.3f} {cells}")
            print(f"{'':7} {'':10} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
