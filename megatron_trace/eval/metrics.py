"""Benchmark scores from per-problem correct counts: avg@k, unbiased pass@k, and bootstrap confidence intervals.

Input everywhere is `correct [problems, k]`: 0/1 (or bool) per sampled response, k responses per problem.
- avg@k: the mean accuracy over all k samples of all problems (the paper's headline number; for k = 1 the plain
  accuracy). Equal to the mean over problems of c_i / k.
- pass@k: the unbiased estimator of Chen et al. (2021), from n >= k samples with c correct:
  pass@k = 1 - C(n - c, k) / C(n, k), averaged over problems. With n == k it is the fraction of problems
  solved at least once.
- Confidence intervals: percentile bootstrap over problems (resample problems with replacement, recompute the
  score), the population being the benchmark's problems; its width shrinks with k because each problem's score
  is a mean of more samples.
All scores are fractions in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["avg_at_k", "pass_at_k", "pass_at_k_per_problem", "bootstrap_ci", "Score", "score_benchmark"]


def _as_matrix(correct) -> np.ndarray:
    m = np.asarray(correct, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"correct must be a non-empty [problems, k] array of 0/1, got shape {m.shape}")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError("correct must hold only 0/1 (one verdict per sampled response)")
    return m


def avg_at_k(correct) -> float:
    """Mean accuracy over the k samples of every problem. correct: [problems, k] of 0/1."""
    return float(_as_matrix(correct).mean())


def pass_at_k_per_problem(n: int, c, k: int) -> np.ndarray:
    """Unbiased pass@k of each problem from n samples with c[i] correct: 1 - C(n-c, k) / C(n, k). Shape [problems].

    Computed as a product 1 - prod_{j=n-c+1}^{n} (1 - k / j), which never forms the (huge) binomials.
    """
    c = np.atleast_1d(np.asarray(c, dtype=np.int64))
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (samples per problem); got k={k}, n={n}")
    if np.any(c < 0) or np.any(c > n):
        raise ValueError(f"correct counts must lie in [0, n={n}]")
    out = np.empty(len(c), dtype=np.float64)
    for i, ci in enumerate(c):
        if n - ci < k:  # every k-subset contains a correct sample
            out[i] = 1.0
        else:
            out[i] = 1.0 - float(np.prod(1.0 - k / np.arange(n - ci + 1, n + 1, dtype=np.float64)))
    return out


def pass_at_k(correct, k: int) -> float:
    """Unbiased pass@k averaged over problems. correct: [problems, n] of 0/1 with n >= k samples per problem."""
    m = _as_matrix(correct)
    return float(pass_at_k_per_problem(m.shape[1], m.sum(axis=1).astype(np.int64), k).mean())


def bootstrap_ci(per_problem, *, statistic: Callable[[np.ndarray], float] | None = None, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `per_problem` scores [problems] (or of `statistic` of them).

    Problems are resampled with replacement `resamples` times with a seeded generator (same inputs, same
    interval). Returns (low, high) fractions.
    """
    x = np.asarray(per_problem, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"per_problem must be a non-empty 1-D array, got shape {x.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    if statistic is None:
        stats = x[idx].mean(axis=1)
    else:
        stats = np.array([statistic(x[row]) for row in idx])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


@dataclass
class Score:
    """One metric of one benchmark: point estimate and bootstrap interval (fractions in [0, 1])."""

    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}


def score_benchmark(correct, *, pass_ks: tuple[int, ...] = (), confidence: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> dict[str, Score]:
    """avg@k and pass@j (for each j in pass_ks, j <= k) of one benchmark, each with its bootstrap interval.

    correct: [problems, k] of 0/1. Keys: "avg@k" and "pass@j" with the numbers filled in (e.g. "avg@16").
    """
    m = _as_matrix(correct)
    n = m.shape[1]
    per_problem = {f"avg@{n}": m.mean(axis=1)}
    counts = m.sum(axis=1).astype(np.int64)
    for j in pass_ks:
        per_problem[f"pass@{j}"] = pass_at_k_per_problem(n, counts, j)
    out = {}
    for name, values in per_problem.items():
        low, high = bootstrap_ci(values, confidence=confidence, resamples=resamples, seed=seed)
        out[name] = Score(float(values.mean()), low, high)
    return out
