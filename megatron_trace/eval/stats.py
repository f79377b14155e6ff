"""Statistics of a few seeds: Student-t intervals of a mean, the area under a learning curve, and paired
differences between two arms run on the same seeds.

The scaling grids run every arm on the same seeds from one shared warm-start; at a given seed two arms share the
data order and the first step's samples, so the per-seed difference of their scores is the paired quantity and
its t-interval is much tighter than the difference of two independent intervals. With 3 seeds the 95% interval
uses t(0.975, 2) = 4.303, not 1.96: few seeds give wide intervals, honestly.

Plain Python (no SciPy in the environment): the t quantile is found by bisection on the t CDF, which is
integrated with Simpson's rule from the density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

__all__ = ["t_quantile", "MeanCI", "mean_ci", "curve_auc", "paired_difference"]


def _t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with df degrees of freedom (x >= 0 by symmetry)."""
    if x < 0:
        return 1.0 - _t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    # Simpson on [0, x]; the density is smooth and x is at most a few tens for the quantiles used here.
    n = 4000
    h = x / n
    s = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


@lru_cache(maxsize=64)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df > 0 degrees of freedom (0.5 < p < 1), to ~1e-9."""
    if not 0.5 < p < 1.0:
        raise ValueError(f"t_quantile: p={p} must be in (0.5, 1)")
    if df <= 0:
        raise ValueError(f"t_quantile: df={df} must be > 0")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class MeanCI:
    """Mean of n values with its two-sided t-interval; lo/hi are NaN when n < 2 (no spread to estimate)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean and `level` Student-t interval of the mean (sample std, n - 1 degrees of freedom)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("mean_ci: no values")
    m = sum(vals) / n
    if n < 2:
        return MeanCI(m, float("nan"), float("nan"), n)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return MeanCI(m, m - half, m + half, n)


def curve_auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Normalised area under a learning curve: the trapezoid-rule area divided by the step span, i.e. the mean
    height of the curve (same units as `values`; a single point gives its value). Steps must be increasing."""
    if len(steps) != len(values) or not steps:
        raise ValueError(f"curve_auc: {len(steps)} steps but {len(values)} values (need >= 1 of each, equal)")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError("curve_auc: steps must be strictly increasing")
    if len(steps) == 1:
        return float(values[0])
    area = sum((steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def paired_difference(arm: Mapping[int, float], base: Mapping[int, float], level: float = 0.95) -> MeanCI:
    """Mean over the seeds both arms ran of (arm[seed] - base[seed]), with its t-interval."""
    seeds = sorted(set(arm) & set(base))
    if not seeds:
        raise ValueError(f"paired_difference: no common seed (arm {sorted(arm)}, base {sorted(base)})")
    return mean_ci([arm[s] - base[s] for s in seeds], level)
