"""Lookalike quality by seed holdout on MovieLens 100K, Taobao first users and a generated world.

Positives = users who did X (rated >= 2 films of a genre; bought in a category; belong to a latent
segment); X's events never enter the features; a random half of the positives is the seed, the
other half hidden; every non-seed user is ranked by random, activity (most events), logistic
regression seed-vs-rest, and flashcrowd (the product's model and expansion ranking). Printed per
target: AUC with a 95% stratified bootstrap interval, lift at 1/2/5/10% reach, flashcrowd's paired
bootstrap difference to each baseline, and its AUC across 5 fit seeds; then a summary per data set.
The protocol is services/audience/lookalike/evaluation/ (module docs there).

    nice -n 10 .venv/bin/python bench/lookalike_eval.py                 # everything (~minutes)
    .venv/bin/python bench/lookalike_eval.py --only movielens --resamples 200
    .venv/bin/python bench/lookalike_eval.py --gen-users 0               # real data only

Real data is read from ../shared/data (or $FLASHCROWD_SHARED_DATA) through services/events/adapters;
missing folders are skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.audience.lookalike.evaluation import targets as T  # noqa: E402
from services.audience.lookalike.evaluation.protocol import ProductRanker, evaluate_set  # noqa: E402
from services.audience.lookalike.evaluation.report import format_summary, format_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=None, help="movielens, taobao or generated")
    parser.add_argument("--gen-users", type=int, default=20_000, help="generated population (0 = skip)")
    parser.add_argument("--fit-seeds", type=int, default=5, help="fits per target for the stability column")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the seed/hidden split")
    parser.add_argument("--taobao-top", type=int, default=4, help="Taobao categories with most buyers")
    args = parser.parse_args(argv)

    ranker = ProductRanker()
    fit_seeds = tuple(range(args.fit_seeds))
    results, skipped = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fc-eval-") as tmp:
        work = Path(tmp)
        loaders = {
            "movielens": lambda: T.movielens_targets(),
            "taobao": lambda: T.taobao_targets(top=args.taobao_top),
            "generated": lambda: T.generated_targets(work, users=args.gen_users),
        }
        if args.gen_users <= 0:
            loaders.pop("generated")
        for name, load in loaders.items():
            if args.only and args.only not in name:
                continue
            try:
                target_set = load()
            except FileNotFoundError as error:
                skipped.append(str(error))
                continue
            t0 = time.perf_counter()
            found = evaluate_set(
                target_set, ranker, fit_seeds=fit_seeds, split_seed=args.split_seed,
                resamples=args.resamples, work=work,
            )  # fmt: skip
            results += found
            print(
                f"# {target_set.dataset}: {len(found)} targets in {time.perf_counter() - t0:.1f}s; "
                + "; ".join(target_set.notes),
                file=sys.stderr,
            )
    print(f"lookalike seed-holdout eval: split seed {args.split_seed}, fit seeds {list(fit_seeds)}, "
          f"{args.resamples} bootstrap resamples\n")  # fmt: skip
    print(format_table(results))
    print(format_summary(results))
    for note in skipped:
        print(f"skipped: {note}")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
