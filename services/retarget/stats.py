"""Experiment statistics of a campaign report, from per-arm sufficient statistics.

Everything here works on sums a ledger can keep up to date incrementally (``ArmSums``: members,
converters, and the sums of the outcome ``y`` (revenue per member), the covariate ``x`` (pre-period
spend) and their squares and cross products), so a report never rescans members. The methods are the
ones GrowthBook and Statsig document, and tests check them against statsmodels/scipy:

* conversion difference: Newcombe's hybrid score interval (method 10, from two Wilson intervals),
  with the pooled two-proportion z-test p-value;
* revenue per targeted member: Welch (unequal variances) normal interval of the difference;
* ROI of the increment: the revenue-difference interval mapped through
  ``(delta x n_arm - cost) / cost`` (monotone, so its end points map to the interval's);
* CUPED: ``y - theta (x - mean x)`` with ``theta = cov(x, y) / var(x)`` pooled over both groups; the
  variance reduction is ``1 - var(adjusted) / var(raw)`` of the difference;
* sequential: the asymptotic confidence sequence of Waudby-Smith et al. (2023), which GrowthBook
  uses, tuned for a planned sample size: valid at every look, so daily peeking keeps its error rate;
* sample-ratio mismatch: chi-square of the assignment counts against the configured shares;
* several arms: Holm's step-down adjustment of the p-values;
* planning: minimum detectable effect of a conversion difference at a given power.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as sps

#: Default level of every interval (95%) and the SRM alarm threshold.
ALPHA = 0.05
SRM_ALPHA = 0.001


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class ArmSums:
    """Sufficient statistics of one group: ``n`` members, ``converted`` of them converted, and the
    sums over members of revenue ``y`` and covariate ``x`` (members without orders count as 0)."""

    n: int
    converted: int = 0
    sum_y: float = 0.0
    sum_y2: float = 0.0
    sum_x: float = 0.0
    sum_x2: float = 0.0
    sum_xy: float = 0.0
    #: Sum of ``x`` over converted members (the cross product of ``x`` and the 0/1 conversion).
    sum_xb: float = 0.0

    @property
    def rate(self) -> float:
        return self.converted / self.n if self.n else 0.0

    @property
    def mean_y(self) -> float:
        return self.sum_y / self.n if self.n else 0.0

    def var_y(self) -> float:
        return _variance(self.n, self.sum_y, self.sum_y2)


def _variance(n: int, total: float, squares: float) -> float:
    """Sample variance (n - 1) from a count, a sum and a sum of squares; 0 below two members."""
    if n < 2:
        return 0.0
    return max(0.0, (squares - total * total / n) / (n - 1))


def _z(alpha: float) -> float:
    return float(sps.norm.ppf(1.0 - alpha / 2.0))


def wilson(x: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson score interval of a proportion ``x / n``."""
    if n <= 0:
        return 0.0, 1.0
    z = _z(alpha)
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_difference(x1: int, n1: int, x0: int, n0: int, alpha: float = ALPHA) -> Interval:
    """``p1 - p0`` with Newcombe's hybrid score interval (no continuity correction)."""
    p1 = x1 / n1 if n1 else 0.0
    p0 = x0 / n0 if n0 else 0.0
    if n1 <= 0 or n0 <= 0:
        return Interval(p1 - p0, -1.0, 1.0)
    l1, u1 = wilson(x1, n1, alpha)
    l0, u0 = wilson(x0, n0, alpha)
    d = p1 - p0
    low = d - math.sqrt((p1 - l1) ** 2 + (u0 - p0) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p0 - l0) ** 2)
    return Interval(d, low, high)


def two_proportion_p_value(x1: int, n1: int, x0: int, n0: int) -> float:
    """Two-sided p-value of H0: p1 == p0 (pooled standard error); 1.0 when degenerate."""
    if n1 <= 0 or n0 <= 0:
        return 1.0
    pooled = (x1 + x0) / (n1 + n0)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n0)
    if variance <= 0.0:
        return 1.0
    z = (x1 / n1 - x0 / n0) / math.sqrt(variance)
    return math.erfc(abs(z) / math.sqrt(2.0))


def _normal_interval(estimate: float, variance: float, alpha: float) -> Interval:
    half = _z(alpha) * math.sqrt(max(variance, 0.0))
    return Interval(estimate, estimate - half, estimate + half)


def _normal_p_value(estimate: float, variance: float) -> float:
    if variance <= 0.0:
        return 1.0
    return math.erfc(abs(estimate) / math.sqrt(2.0 * variance))


@dataclass(frozen=True)
class MeanDifference:
    interval: Interval
    #: Variance of the difference estimate (the squared standard error).
    variance: float
    p_value: float


def mean_difference(arm: ArmSums, control: ArmSums, alpha: float = ALPHA) -> MeanDifference:
    """Revenue per member ``mean_y(arm) - mean_y(control)``: Welch normal interval and p-value."""
    if arm.n < 2 or control.n < 2:
        return MeanDifference(Interval(arm.mean_y - control.mean_y, -math.inf, math.inf), math.inf, 1.0)
    variance = arm.var_y() / arm.n + control.var_y() / control.n
    estimate = arm.mean_y - control.mean_y
    return MeanDifference(
        _normal_interval(estimate, variance, alpha), variance, _normal_p_value(estimate, variance)
    )


def incremental_roi(difference: Interval, members: int, cost: float) -> Interval:
    """ROI of the increment the arm caused: ``(delta x members - cost) / cost``; 0s without cost."""
    if cost <= 0:
        return Interval(0.0, 0.0, 0.0)

    def roi(delta: float) -> float:
        return (delta * members - cost) / cost

    return Interval(roi(difference.estimate), roi(difference.low), roi(difference.high))


@dataclass(frozen=True)
class Cuped:
    interval: Interval
    variance: float
    p_value: float
    theta: float
    #: ``1 - var(adjusted difference) / var(raw difference)`` (0 when the covariate explains nothing).
    variance_reduction: float


def cuped(arm: ArmSums, control: ArmSums, *, binary: bool = False, alpha: float = ALPHA) -> Cuped:
    """CUPED-adjusted difference of revenue per member (or of conversion, ``binary=True``)."""

    def outcome(g: ArmSums) -> tuple[float, float, float]:
        # sum of y, sum of y^2 and sum of x*y for the chosen outcome
        if binary:
            return float(g.converted), float(g.converted), g.sum_xb
        return g.sum_y, g.sum_y2, g.sum_xy

    n = arm.n + control.n
    raw_variance = 0.0
    groups = []
    for g in (arm, control):
        sy, syy, sxy = outcome(g)
        if g.n < 2:
            return Cuped(Interval(0.0, -math.inf, math.inf), math.inf, 1.0, 0.0, 0.0)
        var_y = _variance(g.n, sy, syy)
        var_x = _variance(g.n, g.sum_x, g.sum_x2)
        cov = (sxy - sy * g.sum_x / g.n) / (g.n - 1)
        groups.append((g, sy / g.n, g.sum_x / g.n, var_y, var_x, cov))
        raw_variance += var_y / g.n
    # theta from the pooled sums (both groups together), as in Deng et al. (2013)
    sx = arm.sum_x + control.sum_x
    sxx = arm.sum_x2 + control.sum_x2
    sy_all = outcome(arm)[0] + outcome(control)[0]
    sxy_all = outcome(arm)[2] + outcome(control)[2]
    var_x_all = _variance(n, sx, sxx)
    cov_all = (sxy_all - sy_all * sx / n) / (n - 1)
    theta = cov_all / var_x_all if var_x_all > 0 else 0.0
    mean_x_all = sx / n
    adjusted = []
    variance = 0.0
    for g, mean_y, mean_x, var_y, var_x, cov in groups:
        adjusted.append(mean_y - theta * (mean_x - mean_x_all))
        variance += max(0.0, var_y - 2 * theta * cov + theta * theta * var_x) / g.n
    estimate = adjusted[0] - adjusted[1]
    reduction = 1.0 - variance / raw_variance if raw_variance > 0 else 0.0
    return Cuped(
        _normal_interval(estimate, variance, alpha),
        variance,
        _normal_p_value(estimate, variance),
        theta,
        reduction,
    )


def confidence_sequence(
    estimate: float, variance: float, n: int, *, planned_n: int, alpha: float = ALPHA
) -> Interval:
    """Always-valid interval of an asymptotically normal difference (Waudby-Smith et al. 2023).

    ``variance`` is the squared standard error of ``estimate`` at ``n`` units in all, so the
    per-unit variance is ``variance x n``. ``planned_n`` tunes the sequence to be tightest there.
    """
    if n <= 0 or not math.isfinite(variance) or variance < 0:
        return Interval(estimate, -math.inf, math.inf)
    planned = max(planned_n, 1)
    rho2 = (-2.0 * math.log(alpha) + math.log(-2.0 * math.log(alpha) + 1.0)) / planned
    sigma2 = variance * n
    half = math.sqrt(
        sigma2 * 2.0 * (n * rho2 + 1.0) / (n * n * rho2) * math.log(math.sqrt(n * rho2 + 1.0) / alpha)
    )
    return Interval(estimate, estimate - half, estimate + half)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class SampleRatio:
    chi2: float
    p_value: float
    #: True when ``p_value < SRM_ALPHA``: the split did not work and the comparison is suspect.
    mismatch: bool


def sample_ratio(counts: Sequence[int], shares: Sequence[float]) -> SampleRatio:
    """Chi-square goodness of fit of assignment ``counts`` to the configured ``shares``."""
    total = sum(counts)
    weight = sum(shares)
    if total <= 0 or weight <= 0 or len(counts) < 2:
        return SampleRatio(0.0, 1.0, False)
    chi2 = 0.0
    for count, share in zip(counts, shares, strict=True):
        expected = total * share / weight
        if expected > 0:
            chi2 += (count - expected) ** 2 / expected
    p = float(sps.chi2.sf(chi2, len(counts) - 1))
    return SampleRatio(chi2, p, p < SRM_ALPHA)


def minimum_detectable_effect(
    base_rate: float, treated: int, control: int, *, alpha: float = ALPHA, power: float = 0.8
) -> float:
    """Smallest absolute conversion difference a two-sided test detects with ``power``."""
    if treated <= 0 or control <= 0 or not 0.0 < base_rate < 1.0:
        return math.inf
    z = _z(alpha) + float(sps.norm.ppf(power))
    return z * math.sqrt(base_rate * (1.0 - base_rate) * (1.0 / treated + 1.0 / control))


__all__ = [
    "ALPHA",
    "SRM_ALPHA",
    "ArmSums",
    "Cuped",
    "Interval",
    "MeanDifference",
    "SampleRatio",
    "confidence_sequence",
    "cuped",
    "holm",
    "incremental_roi",
    "mean_difference",
    "minimum_detectable_effect",
    "rate_difference",
    "sample_ratio",
    "two_proportion_p_value",
    "wilson",
]
