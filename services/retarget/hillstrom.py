"""The Hillstrom e-mail campaign (MineThatData, 2008) as a retarget campaign: the yardstick of the
report's statistics and of uplift targeting on a real randomised experiment.

64,000 customers were split at random into "Mens E-Mail", "Womens E-Mail" and "No E-Mail"
(../shared/data/hillstrom-email/README.md). ``import_hillstrom`` writes them into the ledger as a
completed campaign of one tenant: arms ``mens`` and ``womens`` and the holdout, one member per
customer (user id = row number), assigned at the launch time, with last year's spend (``history``)
as the pre-period covariate of CUPED. Each conversion becomes a paid order of the tenant (its own
conversion event) one day after the launch, attributed through services/retarget/attribution.py
like any order, so the report reads it the way it reads live traffic. Dollars become cents (cents
play the role of fen).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from services.retarget import attribution
from services.retarget import domain as d
from services.retarget import repository as repo
from services.retarget.attribution import OrderFact
from services.retarget.db import Tx

FILE = "hillstrom.csv"
ARMS = {"Mens E-Mail": "mens", "Womens E-Mail": "womens", "No E-Mail": d.HOLDOUT_ARM}
#: Uplift features: the file's pre-treatment columns (one-hot where categorical).
FEATURES = (
    "recency",
    "history",
    "mens",
    "womens",
    "newbie",
    "zip_urban",
    "zip_suburban",
    "channel_web",
    "channel_phone",
)
DAY_US = 86_400_000_000


def read_hillstrom(folder: Path) -> pl.DataFrame:
    """The file as a frame: ``user_id`` (1-based row), ``arm`` (ours), ``treated``, the features,
    ``visit``, ``conversion``, ``spend_cents`` and ``history_cents``."""
    path = folder / FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {FILE} in {folder}: see ../shared/data/hillstrom-email/README.md")
    raw = pl.read_csv(path, schema_overrides={"spend": pl.Float64, "history": pl.Float64})
    unknown = set(raw["segment"].unique()) - set(ARMS)
    if unknown:
        raise ValueError(f"{path}: unknown segment(s) {sorted(unknown)}; expected {sorted(ARMS)}")
    return raw.with_row_index("user_id", offset=1).select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("segment").replace_strict(ARMS).alias("arm"),
        (pl.col("segment") != "No E-Mail").cast(pl.Int8).alias("treated"),
        "recency",
        "history",
        "mens",
        "womens",
        "newbie",
        (pl.col("zip_code") == "Urban").cast(pl.Int8).alias("zip_urban"),
        (pl.col("zip_code") == "Surburban").cast(pl.Int8).alias("zip_suburban"),
        (pl.col("channel") == "Web").cast(pl.Int8).alias("channel_web"),
        (pl.col("channel") == "Phone").cast(pl.Int8).alias("channel_phone"),
        "visit",
        "conversion",
        (pl.col("spend") * 100).round().cast(pl.Int64).alias("spend_cents"),
        (pl.col("history") * 100).round().cast(pl.Int64).alias("history_cents"),
    )


def import_hillstrom(tx: Tx, tenant: str, data: pl.DataFrame, *, launch_us: int, now: int) -> int:
    """Write the experiment as a completed campaign of ``tenant``; returns its primary key."""
    template = repo.create_template(
        tx,
        repo.TemplateSpec(
            tenant=tenant,
            template_id="hillstrom-email",
            display_name="Hillstrom e-mail (no coupon: the e-mail is the treatment)",
            discount=d.Discount(amount_fen=1),
            min_spend_fen=0,
            valid_start_us=None,
            valid_end_us=None,
            valid_for_us=None,
            item_ids=(),
            total_stock=0,
            budget_cap_fen=0,
            per_user_limit=1,
            refund_policy="RELEASE",
            currency_code="USD",
        ),
        now,
    )
    spec = repo.CampaignSpec(
        tenant=tenant,
        campaign_id="hillstrom",
        display_name="Hillstrom e-mail campaign (MineThatData 2008)",
        audience_pack=f"tenants/{tenant}/packs/hillstrom",
        offer_item_ids=(),
        template_id=template["template_id"],
        arms=(
            repo.ArmInput("mens", 1, "", "campaign.arms[0]"),
            repo.ArmInput("womens", 1, "", "campaign.arms[1]"),
        ),
        holdout_bp=d.BASIS_POINTS // 3,
        start_us=None,
        end_us=None,
        loss_cap_fen=0,
        delivery_rate=0,
        rules_json="[]",
        attribution_window_us=14 * DAY_US,  # the experiment tracked two weeks
    )
    campaign = repo.create_campaign(tx, spec, now)
    pk = int(campaign["id"])
    tx.execute(
        "UPDATE campaigns SET state = ?, launch_us = ?, complete_us = ?, audience_size = ?, processed = ?,"
        " held_out = ?, covariate_window_us = ? WHERE id = ?",
        (
            d.COMPLETED,
            launch_us,
            launch_us,
            data.height,
            data.height,
            int((data["arm"] == d.HOLDOUT_ARM).sum()),
            365 * DAY_US,
            pk,
        ),
    )
    repo.insert_members(
        tx,
        [
            (
                pk,
                user,
                arm,
                int(arm == d.HOLDOUT_ARM),
                d.OUTCOME_HOLDOUT if arm == d.HOLDOUT_ARM else d.OUTCOME_ISSUED,
                None,
                launch_us,
                spend,
            )
            for user, arm, spend in data.select("user_id", "arm", "history_cents").rows()
        ],
        now,
    )
    orders = [
        OrderFact(f"hillstrom-{user}", int(user), int(spend), launch_us + DAY_US)
        for user, spend in data.filter(pl.col("conversion") == 1).select("user_id", "spend_cents").rows()
    ]
    attribution.record_orders(tx, tenant, orders, now)
    repo.audit(
        tx,
        tenant,
        d.campaign_name(tenant, "hillstrom"),
        "import",
        {"members": data.height, "orders": len(orders)},
        now,
    )
    return pk


__all__ = ["ARMS", "FEATURES", "FILE", "import_hillstrom", "read_hillstrom"]
