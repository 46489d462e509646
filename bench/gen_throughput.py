"""Generator throughput: ``flashcrowd gen`` into a temporary local store; prints events/s and peak RSS.

    .venv/bin/python bench/gen_throughput.py [--users 500000] [--days 8] [--seed 1] [--chunk-users 100000]

Peak RSS is this process's ``ru_maxrss`` (the generator streams by user chunk, so it grows with
``--chunk-users``, not with ``--users``). The store is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.events.generator import GenConfig, generate
from services.storage import LocalObjectStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--days", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chunk-users", type=int, default=100_000)
    parser.add_argument("--progress", action="store_true", help="show the progress bar on stderr")
    parser.add_argument("--keep", action="store_true", help="keep the generated store and print its path")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="flashcrowd-bench-gen-"))
    try:
        config = GenConfig(users=args.users, days=args.days, seed=args.seed, chunk_users=args.chunk_users)
        t0 = time.perf_counter()
        result = generate(LocalObjectStore(root), config, progress=args.progress)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        story = result.story
        print(f"users            {args.users:,} x {args.days} days (chunk {args.chunk_users:,} users)")
        print(f"events           {result.events:,} ({result.events / args.users:.1f} per user)")
        print(f"files            {result.files} ({result.bytes / 1e6:,.1f} MB, "
              f"{result.bytes / max(1, result.events):.1f} B/event)")  # fmt: skip
        print(f"wall time        {seconds:,.1f} s")
        print(f"throughput       {result.events / seconds:,.0f} events/s")
        print(f"peak RSS         {peak / 2**20:,.0f} MiB")
        sold = story["hook_pays_at_sale_price"]
        print(f"hook item        {story['hook_attempts']:,} attempts, {sold} paid, "
              f"sold out after {story['hook_sold_out_after_s']} s")  # fmt: skip
        if args.keep:
            print(f"store            {root}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
