"""The report on the Hillstrom e-mail experiment against statsmodels/scipy over the raw file.

The adapter writes the experiment into a real ledger (SQLite) as a campaign with arms, holdout and
attributed orders; the report (repository facts -> report.py) must agree with an independent
computation on the CSV: differences, intervals, z, p, Holm, SRM, and CUPED with ``history``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps
from statsmodels.stats import proportion as smp
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from services.events.adapters.common import shared_data_dir
from services.retarget import domain as d
from services.retarget import repository as repo
from services.retarget.db import Database
from services.retarget.hillstrom import import_hillstrom, read_hillstrom
from services.retarget.migrations import migrate
from services.retarget.report import campaign_report

pytestmark = pytest.mark.realdata
FOLDER = shared_data_dir() / "hillstrom-email"
LAUNCH_US = 1_205_000_000_000_000  # March 2008


@pytest.fixture(scope="module")
def data() -> pl.DataFrame:
    if not (FOLDER / "hillstrom.csv").is_file():
        pytest.skip(
            f"real data set hillstrom-email not found under {FOLDER.parent} (set FLASHCROWD_SHARED_DATA)"
        )
    return read_hillstrom(FOLDER)


@pytest.fixture(scope="module")
def report(data: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    database = Database.open(f"sqlite:///{tmp_path_factory.mktemp('hillstrom') / 'ledger.db'}")
    try:
        migrate(database)
        pk = database.call(import_hillstrom, "thillstrom", data, launch_us=LAUNCH_US, now=LAUNCH_US)

        def read(tx):  # type: ignore[no-untyped-def]
            campaign = repo.campaign_by_pk(tx, pk)
            return repo.campaign_facts(tx, campaign, LAUNCH_US + 30 * 86_400_000_000)

        facts = database.call(read, write=False)
        return campaign_report(facts, d.campaign_name("thillstrom", "hillstrom"))
    finally:
        database.close()


def _arm(data: pl.DataFrame, arm: str) -> pl.DataFrame:
    return data.filter(pl.col("arm") == arm)


@pytest.mark.parametrize("arm_id", ["mens", "womens"])
def test_conversion_difference_matches_statsmodels(data: pl.DataFrame, report, arm_id: str) -> None:  # type: ignore[no-untyped-def]
    arm, control = _arm(data, arm_id), _arm(data, d.HOLDOUT_ARM)
    x1, n1, x0, n0 = (
        int(arm["conversion"].sum()),
        arm.height,
        int(control["conversion"].sum()),
        control.height,
    )
    funnel = {a.arm_id: a for a in report.arms}[arm_id]
    assert (funnel.targeted, funnel.converters) == (n1, x1)
    assert {a.arm_id: a for a in report.arms}[d.HOLDOUT_ARM].converters == x0
    low, high = smp.confint_proportions_2indep(x1, n1, x0, n0, method="newcomb", compare="diff")
    assert funnel.conversion_difference.value == pytest.approx(x1 / n1 - x0 / n0)
    assert (funnel.conversion_difference.low, funnel.conversion_difference.high) == pytest.approx((low, high))
    z, p = smp.proportions_ztest([x1, x0], [n1, n0])
    assert funnel.p_value == pytest.approx(p, rel=1e-9)
    assert z > 3  # the published result: both e-mails raised conversion


def test_revenue_difference_matches_welch_on_the_spend(data: pl.DataFrame, report) -> None:  # type: ignore[no-untyped-def]
    for arm_id in ("mens", "womens"):
        y1 = _arm(data, arm_id)["spend_cents"].to_numpy().astype(float)
        y0 = _arm(data, d.HOLDOUT_ARM)["spend_cents"].to_numpy().astype(float)
        reference = CompareMeans(DescrStatsW(y1), DescrStatsW(y0))
        low, high = reference.zconfint_diff(usevar="unequal")
        _, p = reference.ztest_ind(usevar="unequal")
        funnel = {a.arm_id: a for a in report.arms}[arm_id]
        assert funnel.revenue_fen == int(y1.sum())
        assert funnel.revenue_difference.value == pytest.approx(y1.mean() - y0.mean())
        assert (funnel.revenue_difference.low, funnel.revenue_difference.high) == pytest.approx(
            (low, high), rel=1e-6
        )
        assert funnel.revenue_p_value == pytest.approx(p, rel=1e-6)
        # the always-valid sequence is wider than the fixed-horizon interval it sits beside
        assert (
            funnel.sequential_revenue_difference.low < low
            and funnel.sequential_revenue_difference.high > high
        )


def test_holm_and_the_sample_ratio_match_statsmodels_and_scipy(data: pl.DataFrame, report) -> None:  # type: ignore[no-untyped-def]
    treated = [a for a in report.arms if a.arm_id != d.HOLDOUT_ARM]
    _, adjusted, _, _ = multipletests([a.p_value for a in treated], method="holm")
    assert [a.adjusted_p_value for a in treated] == pytest.approx(list(adjusted))
    counts = [_arm(data, arm).height for arm in ("mens", "womens", d.HOLDOUT_ARM)]
    shares = [(d.BASIS_POINTS - d.BASIS_POINTS // 3) / 2] * 2 + [d.BASIS_POINTS // 3]
    expected = sps.chisquare(counts, np.array(shares) / sum(shares) * sum(counts))
    assert report.sample_ratio.chi_square == pytest.approx(expected.statistic)
    assert report.sample_ratio.p_value == pytest.approx(expected.pvalue)
    assert not report.sample_ratio.mismatch  # the split was random


def test_cuped_with_history_reduces_the_variance(data: pl.DataFrame, report) -> None:  # type: ignore[no-untyped-def]
    for arm_id in ("mens", "womens"):
        arm, control = _arm(data, arm_id), _arm(data, d.HOLDOUT_ARM)
        y1, y0 = (g["spend_cents"].to_numpy().astype(float) for g in (arm, control))
        x1, x0 = (g["history_cents"].to_numpy().astype(float) for g in (arm, control))
        x, y = np.concatenate([x1, x0]), np.concatenate([y1, y0])
        theta = np.cov(x, y)[0, 1] / np.var(x, ddof=1)
        a1, a0 = y1 - theta * (x1 - x.mean()), y0 - theta * (x0 - x.mean())
        funnel = {a.arm_id: a for a in report.arms}[arm_id]
        assert funnel.cuped_revenue_difference.value == pytest.approx(a1.mean() - a0.mean(), rel=1e-6)
        raw = np.var(y1, ddof=1) / len(y1) + np.var(y0, ddof=1) / len(y0)
        adjusted = np.var(a1, ddof=1) / len(a1) + np.var(a0, ddof=1) / len(a0)
        assert funnel.cuped_variance_reduction == pytest.approx(1 - adjusted / raw, rel=1e-6)
        assert funnel.cuped_variance_reduction > 0


def test_a_missing_file_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"hillstrom\.csv"):
        read_hillstrom(tmp_path)
