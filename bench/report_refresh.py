"""Campaign report refresh for a 1M-member campaign with 100k orders: incremental versus full.

A campaign of ``--members`` members (two arms and a 10% holdout, pre-period spend per member) and
``--orders`` paid orders (10% later refunded) is written into a ledger; orders go through the
attribution path (services/retarget/attribution.py) in batches, as the order feed applies them.
Then, in the same run:

* incremental: GetCampaignReport's work (``campaign_facts`` + ``campaign_report``), which reads
  the per-arm sums kept as orders arrive;
* full (the raw baseline): the same figures recomputed from members and orders with one SQL
  aggregate over their join (what a report without kept sums must do per call).

Also the attribution rate (orders/s) while the orders were applied.

    .venv/bin/python bench/report_refresh.py                              # SQLite, 1M / 100k
    .venv/bin/python bench/report_refresh.py --database-url postgresql://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flashcrowd.retarget.v1 import campaign_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.retarget import attribution  # noqa: E402
from services.retarget import domain as d  # noqa: E402
from services.retarget import repository as repo  # noqa: E402
from services.retarget.attribution import OrderFact  # noqa: E402
from services.retarget.db import Database, Tx  # noqa: E402
from services.retarget.migrations import migrate  # noqa: E402
from services.retarget.report import campaign_report  # noqa: E402

TENANT = "tbench"
LAUNCH = 1_800_000_000_000_000

FULL = (
    "SELECT m.arm_id, COUNT(DISTINCT m.user_id) AS members, COUNT(o.order_id) AS orders,"
    " COUNT(DISTINCT o.user_id) AS buyers, COALESCE(SUM(o.amount_fen), 0) AS revenue,"
    " SUM(CAST(m.pre_spend_fen AS DOUBLE PRECISION) * m.pre_spend_fen) AS sum_x2"
    " FROM campaign_members m LEFT JOIN orders o ON o.tenant = ? AND o.user_id = m.user_id"
    " AND o.order_us >= m.process_us AND o.order_us < m.process_us + ? AND o.refund_us IS NULL"
    " WHERE m.campaign_pk = ? GROUP BY m.arm_id"
)


def _campaign(tx: Tx, members: int, seed: int) -> int:
    template = repo.create_template(
        tx,
        repo.TemplateSpec(
            TENANT,
            "bench",
            "",
            d.Discount(amount_fen=500),
            0,
            None,
            None,
            None,
            (),
            0,
            0,
            1,
            "RELEASE",
            "CNY",
        ),
        LAUNCH,
    )
    spec = repo.CampaignSpec(
        TENANT, "bench", "", f"tenants/{TENANT}/packs/p", (), template["template_id"],
        (repo.ArmInput("a", 1, "", "arms[0]"), repo.ArmInput("b", 1, "", "arms[1]")),
        1000, None, None, 0, 0, "[]",
    )  # fmt: skip
    pk = int(repo.create_campaign(tx, spec, LAUNCH)["id"])
    rng = np.random.default_rng(seed)
    arms = np.where(rng.random(members) < 0.1, d.HOLDOUT_ARM, np.where(rng.random(members) < 0.5, "a", "b"))
    spend = rng.gamma(1.0, 3000.0, members).astype(np.int64)
    rows = [
        (pk, u + 1, str(arms[u]), int(arms[u] == d.HOLDOUT_ARM), "ISSUED", None, LAUNCH, int(spend[u]))
        for u in range(members)
    ]
    repo.insert_members(tx, rows, LAUNCH)
    return pk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    workdir = tempfile.TemporaryDirectory()
    url = args.database_url or f"sqlite:///{Path(workdir.name) / 'ledger.db'}"
    database = Database.open(url)
    try:
        migrate(database)
        started = time.perf_counter()
        pk = database.call(_campaign, args.members, 1)
        written = time.perf_counter() - started
        print(f"ledger {url.split('@')[-1]}: {args.members:,} members written in {written:.1f} s")
        rng = np.random.default_rng(2)
        users = rng.integers(1, args.members + 1, args.orders)
        amounts = rng.integers(1000, 50_000, args.orders)
        orders = [
            OrderFact(f"o{i}", int(users[i]), int(amounts[i]), LAUNCH + 1 + i) for i in range(args.orders)
        ]
        started = time.perf_counter()
        for lo in range(0, len(orders), 1000):
            database.call(attribution.record_orders, TENANT, orders[lo : lo + 1000], LAUNCH)
        refunded = orders[::10]
        for lo in range(0, len(refunded), 1000):
            for order in refunded[lo : lo + 1000]:
                database.call(attribution.record_refund, TENANT, order, order.order_us + 1, LAUNCH)
        elapsed = time.perf_counter() - started
        events = args.orders + len(refunded)
        print(
            f"attribution: {args.orders:,} orders + {len(refunded):,} refunds in {elapsed:.1f} s"
            f" = {events / elapsed:,.0f} events/s"
        )

        if database.is_postgres:  # fresh statistics, so the baseline gets the planner's best join
            database.call(lambda tx: tx.execute("ANALYZE"))

        def incremental(tx: Tx) -> campaign_pb2.CampaignReport:
            campaign = repo.campaign_by_pk(tx, pk)
            assert campaign is not None
            return campaign_report(
                repo.campaign_facts(tx, campaign, LAUNCH), d.campaign_name(TENANT, "bench")
            )

        def full(tx: Tx) -> list[dict[str, Any]]:
            return tx.all(FULL, (TENANT, 7 * 86_400_000_000, pk))

        figures: dict[str, float] = {}
        for label, fn in (("incremental (kept sums)", incremental), ("full recompute (baseline)", full)):
            times = []
            for _ in range(args.repeat):
                tick = time.perf_counter()
                database.call(fn, write=False)
                times.append(time.perf_counter() - tick)
            figures[label] = statistics.median(times)
            print(f"report {label:27}: median {figures[label] * 1000:9.1f} ms over {args.repeat}")
        ratio = figures["full recompute (baseline)"] / figures["incremental (kept sums)"]
        print(f"incremental is {ratio:,.0f}x faster than recomputing")
        # The kept sums equal the recomputation (a check, not a timing).
        kept = {a.arm_id: a for a in database.call(incremental, write=False).arms}
        for row in database.call(full, write=False):
            assert (
                kept[row["arm_id"]].orders == row["orders"]
                and kept[row["arm_id"]].revenue_fen == row["revenue"]
            ), row
        print("kept sums match the recomputation for every arm")
    finally:
        database.close()
        workdir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
