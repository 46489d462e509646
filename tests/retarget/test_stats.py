"""The report's statistics against independent references (statsmodels, scipy, numpy on raw data).

Each test draws member-level data, feeds only its sufficient statistics to services.retarget.stats
and compares with a reference that sees every member.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats import proportion as smp
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import zt_ind_solve_power
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from services.retarget import stats


def _sums(y: np.ndarray, x: np.ndarray) -> stats.ArmSums:
    converted = y > 0
    return stats.ArmSums(
        n=len(y),
        converted=int(converted.sum()),
        sum_y=float(y.sum()),
        sum_y2=float((y * y).sum()),
        sum_x=float(x.sum()),
        sum_x2=float((x * x).sum()),
        sum_xy=float((x * y).sum()),
        sum_xb=float(x[converted].sum()),
    )


def _world(
    seed: int, n1: int, n0: int, effect: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Revenue per member that depends on a pre-period covariate (as spend does)."""
    rng = np.random.default_rng(seed)
    x1, x0 = rng.gamma(2.0, 300.0, n1), rng.gamma(2.0, 300.0, n0)

    def revenue(x: np.ndarray, p: float) -> np.ndarray:
        buys = rng.random(len(x)) < p + x / 4_000
        return np.where(buys, np.round(x + rng.gamma(2.0, 100.0, len(x))), 0.0)

    return revenue(x1, 0.05 + effect), x1, revenue(x0, 0.05), x0


@pytest.mark.parametrize("counts", [(130, 2000, 90, 2100), (3, 40, 0, 38), (700, 21307, 617, 21306)])
def test_rate_difference_is_newcombes_interval_and_the_pooled_z_test(counts) -> None:  # type: ignore[no-untyped-def]
    x1, n1, x0, n0 = counts
    ours = stats.rate_difference(x1, n1, x0, n0)
    low, high = smp.confint_proportions_2indep(x1, n1, x0, n0, method="newcomb", compare="diff")
    assert ours.low == pytest.approx(low, abs=1e-12) and ours.high == pytest.approx(high, abs=1e-12)
    assert ours.estimate == pytest.approx(x1 / n1 - x0 / n0)
    if x1 + x0:
        _, p = smp.proportions_ztest([x1, x0], [n1, n0])
        assert stats.two_proportion_p_value(x1, n1, x0, n0) == pytest.approx(p, rel=1e-9)


def test_wilson_matches_statsmodels() -> None:
    for x, n in ((0, 10), (7, 10), (130, 2000)):
        low, high = smp.proportion_confint(x, n, method="wilson")
        assert stats.wilson(x, n) == pytest.approx((low, high), abs=1e-12)


def test_revenue_difference_is_welch_on_the_members() -> None:
    y1, x1, y0, x0 = _world(1, 5000, 5200, 0.02)
    ours = stats.mean_difference(_sums(y1, x1), _sums(y0, x0))
    reference = CompareMeans(DescrStatsW(y1), DescrStatsW(y0))
    low, high = reference.zconfint_diff(usevar="unequal")
    _, p = reference.ztest_ind(usevar="unequal")
    assert ours.interval.estimate == pytest.approx(y1.mean() - y0.mean())
    assert (ours.interval.low, ours.interval.high) == pytest.approx((low, high), rel=1e-9)
    assert ours.p_value == pytest.approx(p, rel=1e-6)


@pytest.mark.parametrize("binary", [False, True])
def test_cuped_equals_the_adjusted_outcome_computed_per_member(binary: bool) -> None:
    y1, x1, y0, x0 = _world(2, 6000, 6000, 0.01)
    ours = stats.cuped(_sums(y1, x1), _sums(y0, x0), binary=binary)
    if binary:
        y1, y0 = (y1 > 0).astype(float), (y0 > 0).astype(float)
    x, y = np.concatenate([x1, x0]), np.concatenate([y1, y0])
    theta = np.cov(x, y)[0, 1] / np.var(x, ddof=1)
    a1, a0 = y1 - theta * (x1 - x.mean()), y0 - theta * (x0 - x.mean())
    low, high = CompareMeans(DescrStatsW(a1), DescrStatsW(a0)).zconfint_diff(usevar="unequal")
    assert ours.theta == pytest.approx(theta, rel=1e-9)
    assert ours.interval.estimate == pytest.approx(a1.mean() - a0.mean(), rel=1e-9, abs=1e-12)
    assert (ours.interval.low, ours.interval.high) == pytest.approx((low, high), rel=1e-6)
    raw = np.var(y1, ddof=1) / len(y1) + np.var(y0, ddof=1) / len(y0)
    adjusted = np.var(a1, ddof=1) / len(a1) + np.var(a0, ddof=1) / len(a0)
    assert ours.variance_reduction == pytest.approx(1 - adjusted / raw, rel=1e-6)
    assert ours.variance_reduction > 0.05  # the covariate predicts the outcome in this world


def test_cuped_without_a_covariate_changes_nothing() -> None:
    y1, x1, y0, x0 = _world(3, 3000, 3000, 0.0)
    flat = stats.cuped(_sums(y1, np.zeros_like(x1)), _sums(y0, np.zeros_like(x0)))
    plain = stats.mean_difference(_sums(y1, x1), _sums(y0, x0))
    assert flat.variance_reduction == pytest.approx(0.0, abs=1e-12)
    assert flat.interval.low == pytest.approx(plain.interval.low)


def test_holm_matches_statsmodels() -> None:
    p = [0.01, 0.04, 0.03, 0.2, 0.0004]
    _, reference, _, _ = multipletests(p, method="holm")
    assert stats.holm(p) == pytest.approx(list(reference))


def test_sample_ratio_mismatch_is_scipys_chi_square_and_flags_a_skewed_split() -> None:
    even = stats.sample_ratio([9_950, 10_050, 2_210], [0.45, 0.45, 0.1])
    reference = sps.chisquare([9_950, 10_050, 2_210], [22_210 * 0.45, 22_210 * 0.45, 22_210 * 0.1])
    assert even.chi2 == pytest.approx(reference.statistic) and even.p_value == pytest.approx(reference.pvalue)
    assert not even.mismatch
    skewed = stats.sample_ratio([10_600, 9_400, 2_010], [0.45, 0.45, 0.1])
    assert skewed.mismatch and skewed.p_value < stats.SRM_ALPHA


def test_minimum_detectable_effect_matches_statsmodels_power() -> None:
    base, treated, control = 0.03, 9000, 1000
    ours = stats.minimum_detectable_effect(base, treated, control)
    effect = zt_ind_solve_power(nobs1=treated, ratio=control / treated, alpha=0.05, power=0.8)
    assert ours == pytest.approx(effect * math.sqrt(base * (1 - base)), rel=1e-4)


def test_incremental_roi_maps_the_revenue_interval() -> None:
    roi = stats.incremental_roi(stats.Interval(20.0, 10.0, 30.0), members=1000, cost=10_000)
    assert (roi.estimate, roi.low, roi.high) == (1.0, 0.0, 2.0)
    assert stats.incremental_roi(stats.Interval(1.0, 0.0, 2.0), 10, 0) == stats.Interval(0.0, 0.0, 0.0)


def test_confidence_sequence_keeps_its_error_rate_under_daily_peeking() -> None:
    """A/A tests looked at 20 times: the fixed-horizon interval excludes 0 at some look far more often
    than 5%; the confidence sequence stays under it (and is wider than the fixed interval)."""
    rng = np.random.default_rng(7)
    runs, looks, per_look = 400, 20, 200
    fixed_false, sequential_false = 0, 0
    for _ in range(runs):
        a = rng.random(looks * per_look) < 0.1
        b = rng.random(looks * per_look) < 0.1
        fixed_hit = sequential_hit = False
        for look in range(1, looks + 1):
            n = look * per_look
            xa, xb = int(a[:n].sum()), int(b[:n].sum())
            pa, pb = xa / n, xb / n
            variance = pa * (1 - pa) / n + pb * (1 - pb) / n
            fixed = stats._normal_interval(pa - pb, variance, stats.ALPHA)
            sequence = stats.confidence_sequence(pa - pb, variance, 2 * n, planned_n=2 * looks * per_look)
            assert sequence.high - sequence.low >= fixed.high - fixed.low
            fixed_hit |= not fixed.contains(0.0)
            sequential_hit |= not sequence.contains(0.0)
        fixed_false += fixed_hit
        sequential_false += sequential_hit
    assert fixed_false / runs > 0.15  # the peeking problem is real
    assert sequential_false / runs <= 0.05
