"""Versioned schema migrations of the ledger, applied at start.

Each migration is a list of statements with ``{autoid}`` standing for the dialect's auto-increment
primary key. ``migrate`` applies the missing ones in one transaction under a lock (PostgreSQL:
``pg_advisory_xact_lock``; SQLite: ``BEGIN IMMEDIATE``), so any number of processes may start at
once: the first applies, the others wait and find nothing left to do. DDL is transactional on both
databases, so a crash mid-migration leaves the previous version intact. Never edit a migration
that shipped: add the next one.

Conventions: money is BIGINT fen with the template's currency code; times are BIGINT microseconds
since the Unix epoch, UTC; JSON is TEXT; booleans are SMALLINT 0/1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.retarget.db import Database, Tx

#: pg_advisory_xact_lock key serialising migrations ("retarget" as an int64).
MIGRATION_LOCK_KEY = 0x7265746172676574


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


V1 = Migration(
    1,
    "ledger",
    (
        """
        CREATE TABLE coupon_templates (
            id {autoid},
            tenant TEXT NOT NULL,
            template_id TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            discount_kind TEXT NOT NULL CHECK (discount_kind IN ('FIXED', 'PERCENT')),
            amount_fen BIGINT NOT NULL DEFAULT 0,
            basis_points INTEGER NOT NULL DEFAULT 0,
            cap_fen BIGINT NOT NULL DEFAULT 0,
            face_value_fen BIGINT NOT NULL CHECK (face_value_fen > 0),
            min_spend_fen BIGINT NOT NULL DEFAULT 0 CHECK (min_spend_fen >= 0),
            valid_start_us BIGINT,
            valid_end_us BIGINT,
            valid_for_us BIGINT,
            item_ids TEXT NOT NULL DEFAULT '[]',
            total_stock BIGINT NOT NULL DEFAULT 0 CHECK (total_stock >= 0),
            budget_cap_fen BIGINT NOT NULL DEFAULT 0 CHECK (budget_cap_fen >= 0),
            per_user_limit INTEGER NOT NULL DEFAULT 1 CHECK (per_user_limit >= 1),
            refund_policy TEXT NOT NULL CHECK (refund_policy IN ('RELEASE', 'VOID')),
            currency_code TEXT NOT NULL,
            issued_count BIGINT NOT NULL DEFAULT 0,
            issued_value_fen BIGINT NOT NULL DEFAULT 0,
            create_us BIGINT NOT NULL,
            UNIQUE (tenant, template_id),
            -- the last line of defence against overselling: the database itself refuses it
            CHECK (total_stock = 0 OR issued_count <= total_stock),
            CHECK (budget_cap_fen = 0 OR issued_value_fen <= budget_cap_fen)
        )
        """,
        """
        CREATE TABLE campaigns (
            id {autoid},
            tenant TEXT NOT NULL,
            campaign_id TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            audience_pack TEXT NOT NULL,
            offer_item_ids TEXT NOT NULL DEFAULT '[]',
            template_pk BIGINT NOT NULL REFERENCES coupon_templates (id),
            template_id TEXT NOT NULL,
            arms TEXT NOT NULL,
            holdout_bp INTEGER NOT NULL DEFAULT 0 CHECK (holdout_bp BETWEEN 0 AND 5000),
            start_us BIGINT,
            end_us BIGINT,
            loss_cap_fen BIGINT NOT NULL DEFAULT 0,
            delivery_rate INTEGER NOT NULL DEFAULT 0,
            rules TEXT NOT NULL DEFAULT '[]',
            hash_seed BIGINT NOT NULL,
            state TEXT NOT NULL,
            pack_version BIGINT,
            audience_size BIGINT NOT NULL DEFAULT 0,
            processed BIGINT NOT NULL DEFAULT 0,
            issued BIGINT NOT NULL DEFAULT 0,
            held_out BIGINT NOT NULL DEFAULT 0,
            skipped BIGINT NOT NULL DEFAULT 0,
            issued_value_fen BIGINT NOT NULL DEFAULT 0,
            stop_reason TEXT NOT NULL DEFAULT '',
            launch_error TEXT NOT NULL DEFAULT '',
            launch_page_token TEXT NOT NULL DEFAULT '',
            launch_page_offset BIGINT NOT NULL DEFAULT 0,
            launch_exhausted SMALLINT NOT NULL DEFAULT 0,
            launch_owner TEXT NOT NULL DEFAULT '',
            launch_lease_until_us BIGINT NOT NULL DEFAULT 0,
            launch_us BIGINT,
            complete_us BIGINT,
            create_us BIGINT NOT NULL,
            update_us BIGINT NOT NULL,
            version BIGINT NOT NULL DEFAULT 1,
            UNIQUE (tenant, campaign_id)
        )
        """,
        "CREATE INDEX campaigns_list ON campaigns (tenant, create_us, id)",
        "CREATE INDEX campaigns_state ON campaigns (state)",
        # One row per audience member and campaign: the idempotency anchor of a launch.
        """
        CREATE TABLE campaign_members (
            campaign_pk BIGINT NOT NULL,
            user_id BIGINT NOT NULL,
            arm_id TEXT NOT NULL,
            holdout SMALLINT NOT NULL DEFAULT 0,
            outcome TEXT NOT NULL,
            coupon_id TEXT,
            process_us BIGINT NOT NULL,
            PRIMARY KEY (campaign_pk, user_id)
        )
        """,
        """
        CREATE TABLE coupons (
            coupon_id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            template_pk BIGINT NOT NULL,
            campaign_pk BIGINT,
            arm_id TEXT NOT NULL DEFAULT '',
            user_id BIGINT NOT NULL,
            seq INTEGER NOT NULL CHECK (seq >= 1),
            source TEXT NOT NULL CHECK (source IN ('LAUNCH', 'CLAIM')),
            state TEXT NOT NULL CHECK (state IN ('ISSUED', 'REDEEMED', 'VOID')),
            face_value_fen BIGINT NOT NULL,
            issue_us BIGINT NOT NULL,
            expire_us BIGINT,
            claim_us BIGINT,
            claim_request_id TEXT,
            order_id TEXT,
            discount_fen BIGINT NOT NULL DEFAULT 0,
            update_us BIGINT NOT NULL,
            -- a user's n-th coupon of a template exists at most once: with seq <= per_user_limit
            -- checked under the template's row lock, the limit cannot be exceeded
            UNIQUE (template_pk, user_id, seq)
        )
        """,
        # Indexes are few on purpose: each one costs every launched coupon an insertion.
        # A launch issues at most one coupon per campaign and user, whatever happens; the same
        # index serves campaign reads of launched coupons (queries say source = 'LAUNCH').
        "CREATE UNIQUE INDEX coupons_launch_once ON coupons (campaign_pk, user_id) WHERE source = 'LAUNCH'",
        "CREATE INDEX coupons_campaign_claims ON coupons (campaign_pk) WHERE source = 'CLAIM'",
        "CREATE UNIQUE INDEX coupons_claim_request ON coupons (tenant, claim_request_id)"
        " WHERE claim_request_id IS NOT NULL",
        """
        CREATE TABLE redemptions (
            id {autoid},
            tenant TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            coupon_id TEXT NOT NULL,
            campaign_pk BIGINT,
            arm_id TEXT NOT NULL DEFAULT '',
            user_id BIGINT NOT NULL,
            order_id TEXT NOT NULL,
            order_amount_fen BIGINT NOT NULL,
            discount_fen BIGINT NOT NULL CHECK (discount_fen >= 0 AND discount_fen <= order_amount_fen),
            payable_fen BIGINT NOT NULL,
            order_us BIGINT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('REDEEMED', 'REFUNDED')),
            result TEXT NOT NULL,
            create_us BIGINT NOT NULL,
            refund_us BIGINT,
            UNIQUE (tenant, idempotency_key)
        )
        """,
        # A coupon is on at most one live (unrefunded) redemption.
        "CREATE UNIQUE INDEX redemptions_live ON redemptions (coupon_id) WHERE state = 'REDEEMED'",
        "CREATE INDEX redemptions_campaign ON redemptions (campaign_pk, arm_id, state)",
        """
        CREATE TABLE refunds (
            id {autoid},
            tenant TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            redemption_id BIGINT NOT NULL REFERENCES redemptions (id),
            coupon_id TEXT NOT NULL,
            result TEXT NOT NULL,
            create_us BIGINT NOT NULL,
            UNIQUE (tenant, idempotency_key),
            UNIQUE (redemption_id)
        )
        """,
        # Order facts: every redemption's order, plus orders fed in by ingestion (record_orders),
        # so that conversions of the holdout (who hold no coupon) can be counted.
        """
        CREATE TABLE orders (
            tenant TEXT NOT NULL,
            order_id TEXT NOT NULL,
            user_id BIGINT NOT NULL,
            amount_fen BIGINT NOT NULL CHECK (amount_fen >= 0),
            order_us BIGINT NOT NULL,
            item_ids TEXT NOT NULL DEFAULT '[]',
            coupon_id TEXT,
            refund_us BIGINT,
            PRIMARY KEY (tenant, order_id)
        )
        """,
        "CREATE INDEX orders_user ON orders (tenant, user_id, order_us)",
        # Delivered offers; the id is the StreamOffers cursor. Writers serialise on an advisory
        # lock so that ids become visible in increasing order (no reader skips a late commit).
        """
        CREATE TABLE outbox (
            id {autoid},
            tenant TEXT NOT NULL,
            campaign_pk BIGINT NOT NULL,
            arm_id TEXT NOT NULL,
            user_id BIGINT NOT NULL,
            coupon_id TEXT NOT NULL,
            create_us BIGINT NOT NULL
        )
        """,
        "CREATE INDEX outbox_tenant ON outbox (tenant, id)",
        "CREATE INDEX outbox_campaign ON outbox (campaign_pk, id)",
        """
        CREATE TABLE audit_log (
            id {autoid},
            tenant TEXT NOT NULL,
            subject TEXT NOT NULL,
            action TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{{}}',
            create_us BIGINT NOT NULL
        )
        """,
        "CREATE INDEX audit_log_subject ON audit_log (tenant, subject, id)",
    ),
)

# Attribution of orders from the event stream, with per-arm sums kept up to date as orders arrive
# (services/retarget/attribution.py), so a report never rescans members or orders.
V2 = Migration(
    2,
    "attribution",
    (
        "ALTER TABLE campaigns ADD COLUMN attribution_window_us BIGINT NOT NULL DEFAULT 604800000000",
        "ALTER TABLE campaigns ADD COLUMN covariate_window_us BIGINT NOT NULL DEFAULT 1209600000000",
        # [{"item_id", "unit_cost_fen", "hook"}]: the activity's economics in the report
        "ALTER TABLE campaigns ADD COLUMN item_costs TEXT NOT NULL DEFAULT '[]'",
        # the power readout: expected conversion rate and the pack's size at creation
        "ALTER TABLE campaigns ADD COLUMN expected_rate DOUBLE PRECISION NOT NULL DEFAULT 0",
        "ALTER TABLE campaigns ADD COLUMN planned_size BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE campaign_members ADD COLUMN pre_spend_fen BIGINT NOT NULL DEFAULT 0",
        # An order's touches: the user's memberships, newest first.
        "CREATE INDEX campaign_members_user ON campaign_members (user_id, process_us)",
        # One campaign per tenant and order (last touch), so two paths (a redemption and the
        # order's pay event) never count one order twice.
        """
        CREATE TABLE order_attributions (
            tenant TEXT NOT NULL,
            order_id TEXT NOT NULL,
            campaign_pk BIGINT NOT NULL,
            arm_id TEXT NOT NULL,
            user_id BIGINT NOT NULL,
            amount_fen BIGINT NOT NULL,
            item_id BIGINT,
            order_us BIGINT NOT NULL,
            refund_us BIGINT,
            attribute_us BIGINT NOT NULL,
            PRIMARY KEY (tenant, order_id)
        )
        """,
        "CREATE INDEX order_attributions_order ON order_attributions (order_id)",
        "CREATE INDEX order_attributions_campaign ON order_attributions (campaign_pk, arm_id)",
        # A converting member's attributed orders and revenue (for the sums of squares).
        """
        CREATE TABLE arm_converters (
            campaign_pk BIGINT NOT NULL,
            user_id BIGINT NOT NULL,
            arm_id TEXT NOT NULL,
            orders BIGINT NOT NULL,
            revenue_fen BIGINT NOT NULL,
            PRIMARY KEY (campaign_pk, user_id)
        )
        """,
        # Sufficient statistics per arm (services/retarget/stats.py ArmSums); squares are floats
        # because sums of squared fen overflow 64 bits.
        """
        CREATE TABLE arm_stats (
            campaign_pk BIGINT NOT NULL,
            arm_id TEXT NOT NULL,
            members BIGINT NOT NULL DEFAULT 0,
            converted BIGINT NOT NULL DEFAULT 0,
            orders BIGINT NOT NULL DEFAULT 0,
            refunds BIGINT NOT NULL DEFAULT 0,
            revenue_fen BIGINT NOT NULL DEFAULT 0,
            sum_y2 DOUBLE PRECISION NOT NULL DEFAULT 0,
            sum_x DOUBLE PRECISION NOT NULL DEFAULT 0,
            sum_x2 DOUBLE PRECISION NOT NULL DEFAULT 0,
            sum_xy DOUBLE PRECISION NOT NULL DEFAULT 0,
            sum_xb DOUBLE PRECISION NOT NULL DEFAULT 0,
            viewed BIGINT NOT NULL DEFAULT 0,
            clicked BIGINT NOT NULL DEFAULT 0,
            carted BIGINT NOT NULL DEFAULT 0,
            ordered BIGINT NOT NULL DEFAULT 0,
            update_us BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (campaign_pk, arm_id)
        )
        """,
        # Funnel stages a member reached (each counted once per member and stage).
        """
        CREATE TABLE funnel_members (
            campaign_pk BIGINT NOT NULL,
            user_id BIGINT NOT NULL,
            stage TEXT NOT NULL CHECK (stage IN ('viewed', 'clicked', 'carted', 'ordered')),
            PRIMARY KEY (campaign_pk, user_id, stage)
        )
        """,
        # Units and GMV per item of attributed, unrefunded orders.
        """
        CREATE TABLE item_stats (
            campaign_pk BIGINT NOT NULL,
            item_id BIGINT NOT NULL,
            units BIGINT NOT NULL DEFAULT 0,
            gmv_fen BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (campaign_pk, item_id)
        )
        """,
        "INSERT INTO arm_stats (campaign_pk, arm_id, members)"
        " SELECT campaign_pk, arm_id, COUNT(*) FROM campaign_members GROUP BY campaign_pk, arm_id",
        # Where a stream consumer stands, committed with what it applied (exactly once).
        """
        CREATE TABLE feed_checkpoints (
            name TEXT PRIMARY KEY,
            seq BIGINT NOT NULL,
            event_us BIGINT NOT NULL DEFAULT 0,
            update_us BIGINT NOT NULL
        )
        """,
    ),
)

MIGRATIONS: tuple[Migration, ...] = (V1, V2)


def _apply(tx: Tx, migrations: tuple[Migration, ...]) -> list[int]:
    tx.advisory_lock(MIGRATION_LOCK_KEY)
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_us BIGINT NOT NULL)"
    )
    applied = {row["version"] for row in tx.all("SELECT version FROM schema_migrations")}
    done: list[int] = []
    for migration in sorted(migrations, key=lambda m: m.version):
        if migration.version in applied:
            continue
        for statement in migration.statements:
            tx.execute(statement.format(autoid=tx.dialect.autoid))
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_us) VALUES (?, ?, ?)",
            (migration.version, migration.name, time.time_ns() // 1000),
        )
        done.append(migration.version)
    return done


def migrate(database: Database, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply missing migrations; return the versions applied by this call (usually none)."""
    return database.call(_apply, migrations, conflict_retries=5)


def schema_version(database: Database) -> int:
    def read(tx: Tx) -> int:
        return int(tx.scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") or 0)

    return database.call(read, write=False)


__all__ = ["MIGRATIONS", "MIGRATION_LOCK_KEY", "Migration", "migrate", "schema_version"]
