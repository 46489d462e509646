"""Ledger units: migrations (idempotent, concurrent starters), dialect, money math, arm
assignment and the significance test."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from services.retarget import domain as d
from services.retarget import repository as repo
from services.retarget.db import Database, UniqueConflict
from services.retarget.migrations import MIGRATIONS, migrate, schema_version
from services.retarget.stats import two_proportion_p_value
from tests.fixtures.postgres import create_pg_database, drop_pg_database, pg_reachable


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    reason = pg_reachable()
    if reason is not None:
        pytest.skip(f"skipping PostgreSQL variant: {reason}")
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


def test_migrations_are_idempotent_and_concurrent_starters_are_safe(database_url: str) -> None:
    """Eight processes' worth of starters migrate the same empty database at once."""
    results: list[object] = []

    def start() -> None:
        database = Database.open(database_url, pool_min=1, pool_max=2)
        try:
            results.append(migrate(database))
        except Exception as error:  # collected and asserted below
            results.append(error)
        finally:
            database.close()

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    applied = str([m.version for m in MIGRATIONS])
    assert sorted(map(str, results)) == sorted([applied] + ["[]"] * 7), results
    database = Database.open(database_url)
    try:
        assert migrate(database) == []
        assert schema_version(database) == MIGRATIONS[-1].version
        rows = database.call(lambda tx: tx.all("SELECT version, name FROM schema_migrations"), write=False)
        assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in MIGRATIONS]
    finally:
        database.close()


def test_unique_conflicts_are_normalised_and_nothing_is_half_written(database_url: str) -> None:
    database = Database.open(database_url)
    try:
        migrate(database)
        spec = repo.TemplateSpec(
            "t", "dup", "", d.Discount(amount_fen=5), 0, None, None, None, (), 0, 0, 1, "RELEASE", "CNY"
        )
        database.call(repo.create_template, spec, 1)

        def insert_twice(tx) -> None:  # type: ignore[no-untyped-def]
            tx.execute("INSERT INTO audit_log (tenant, subject, action, create_us) VALUES ('t', 's', 'a', 1)")
            tx.execute(
                "INSERT INTO coupon_templates (tenant, template_id, discount_kind, face_value_fen,"
                " refund_policy,"
                " currency_code, create_us) VALUES ('t', 'dup', 'FIXED', 5, 'RELEASE', 'CNY', 1)"
            )

        before = database.call(lambda tx: tx.scalar("SELECT COUNT(*) FROM audit_log"), write=False)
        with pytest.raises(UniqueConflict):
            database.call(insert_twice, conflict_retries=1)
        assert database.call(lambda tx: tx.scalar("SELECT COUNT(*) FROM audit_log"), write=False) == before
        # the database itself refuses an oversell, whatever the code above it does
        with pytest.raises(Exception, match=r"(?i)check"):
            database.call(
                lambda tx: tx.execute(
                    "UPDATE coupon_templates SET total_stock = 1, issued_count = 2 WHERE template_id = 'dup'"
                )
            )
    finally:
        database.close()


def test_in_list_has_one_parameter_whatever_the_length(database_url: str) -> None:
    database = Database.open(database_url)
    try:
        migrate(database)
        ids = list(range(0, 120_000, 3))

        def count(tx) -> int:  # type: ignore[no-untyped-def]
            tx.insert_many(
                "orders",
                ("tenant", "order_id", "user_id", "amount_fen", "order_us"),
                [("t", f"o{i}", i, 1, 1) for i in range(0, 1000)],
            )
            fragment, params = tx.in_list("user_id", ids)
            return tx.scalar(f"SELECT COUNT(*) FROM orders WHERE {fragment}", params)

        assert database.call(count) == len(range(0, 1000, 3))
    finally:
        database.close()


@pytest.mark.parametrize(
    ("discount", "order", "expected"),
    [
        (d.Discount(amount_fen=1000), 5000, 1000),
        (d.Discount(amount_fen=1000), 600, 600),  # never more than the order
        (d.Discount(basis_points=1500, cap_fen=10_000), 999, 149),  # floor
        (d.Discount(basis_points=1500, cap_fen=100), 10_000, 100),  # cap
        (d.Discount(basis_points=10_000, cap_fen=10**12), 10**12, 10**12),  # 100% of the largest order
        (d.Discount(basis_points=1, cap_fen=10), 9_999, 0),
        (d.Discount(amount_fen=10), 0, 0),
    ],
)
def test_discount_math_in_integer_fen(discount: d.Discount, order: int, expected: int) -> None:
    result = discount.apply(order)
    assert result == expected and isinstance(result, int)


def test_arm_assignment_is_deterministic_and_follows_weights() -> None:
    users = np.arange(200_000, dtype=np.uint64)
    seed = d.campaign_seed("t", "c", 123)
    arms, holdout = d.assign_arms(users, seed, 1000, [1, 3])
    again, holdout_again = d.assign_arms(users[::-1], seed, 1000, [1, 3])
    assert np.array_equal(arms, again[::-1]) and np.array_equal(holdout, holdout_again[::-1])
    assert abs(holdout.mean() - 0.10) < 0.005
    treated = Counter(arms[~holdout].tolist())
    assert abs(treated[1] / (treated[0] + treated[1]) - 0.75) < 0.01
    # holdout and arm are independent: the arm split is the same inside and outside the holdout
    assert abs(arms[holdout].mean() - arms[~holdout].mean()) < 0.02
    # another campaign shuffles users differently
    other, _ = d.assign_arms(users, d.campaign_seed("t", "c2", 123), 1000, [1, 3])
    assert 0.3 < (other != arms).mean() < 0.5
    single, single_holdout = d.assign_arms([int(users[77])], seed, 1000, [1, 3])
    assert single[0] == arms[77] and single_holdout[0] == holdout[77]


@pytest.mark.parametrize(
    ("x1", "n1", "x0", "n0"), [(120, 1000, 90, 1000), (30, 200, 31, 210), (500, 4000, 20, 1000)]
)
def test_two_proportion_z_test_matches_scipy(x1: int, n1: int, x0: int, n0: int) -> None:
    p1, p0 = x1 / n1, x0 / n0
    pooled = (x1 + x0) / (n1 + n0)
    z = (p1 - p0) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    assert two_proportion_p_value(x1, n1, x0, n0) == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)
    assert two_proportion_p_value(0, 0, 5, 10) == 1.0 and two_proportion_p_value(0, 10, 0, 10) == 1.0
