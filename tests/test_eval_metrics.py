"""avg@k, unbiased pass@k and bootstrap intervals against hand-computed values."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from megatron_trace.eval.metrics import (avg_at_k, bootstrap_ci, pass_at_k, pass_at_k_per_problem,
                                         score_benchmark)

# 3 problems x 4 samples: 2/4, 0/4, 4/4 correct.
CORRECT = [[1, 0, 1, 0],
           [0, 0, 0, 0],
           [1, 1, 1, 1]]


def test_avg_at_k_is_the_mean_accuracy_over_all_samples():
    assert avg_at_k(CORRECT) == pytest.approx((2 / 4 + 0 + 4 / 4) / 3)  # = 0.5
    assert avg_at_k([[1], [0], [0], [1]]) == 0.5  # k = 1: plain accuracy


def test_pass_at_k_equals_the_binomial_formula_worked_by_hand():
    # n = 5 samples, c = 2 correct, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k_per_problem(5, [2], 2)[0] == pytest.approx(0.7)
    # n = 4, c = 1, k = 1: 1/4; k = 3: 1 - C(3,3)/C(4,3) = 3/4; k = 4: 1
    assert pass_at_k_per_problem(4, [1, 1, 1], 1)[0] == pytest.approx(0.25)
    assert pass_at_k_per_problem(4, [1], 3)[0] == pytest.approx(0.75)
    assert pass_at_k_per_problem(4, [1], 4)[0] == 1.0
    # the product form agrees with exact binomials on a large n where the binomials are huge
    n, c, k = 200, 7, 50
    assert pass_at_k_per_problem(n, [c], k)[0] == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)


def test_pass_at_k_with_k_equal_n_is_the_fraction_solved_at_least_once():
    assert pass_at_k(CORRECT, 4) == pytest.approx(2 / 3)
    # pass@1 equals avg@k (the unbiased estimator of single-sample accuracy)
    assert pass_at_k(CORRECT, 1) == pytest.approx(avg_at_k(CORRECT))
    # pass@2 per problem: c=2 -> 1 - C(2,2)/C(4,2) = 5/6; c=0 -> 0; c=4 -> 1
    assert pass_at_k(CORRECT, 2) == pytest.approx((5 / 6 + 0 + 1) / 3)


def test_bad_inputs_are_refused_with_the_cause():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(CORRECT, 5)
    with pytest.raises(ValueError, match="0/1"):
        avg_at_k([[0.5, 1.0]])
    with pytest.raises(ValueError, match="problems, k"):
        avg_at_k([1, 0, 1])


def test_bootstrap_interval_contains_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    per_problem = rng.random(50)
    low, high = bootstrap_ci(per_problem, seed=3)
    assert low < per_problem.mean() < high
    assert (low, high) == bootstrap_ci(per_problem, seed=3)
    # the 95% interval of a mean is about +-1.96 standard errors
    se = per_problem.std(ddof=1) / np.sqrt(len(per_problem))
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bootstrap_interval_narrows_as_k_grows():
    # 100 problems, each solved with probability 0.5: the per-problem score averages k coin flips, so the
    # interval of avg@k shrinks about as 1/sqrt(k).
    rng = np.random.default_rng(0)
    widths = {}
    for k in (1, 4, 16):
        correct = (rng.random((100, k)) < 0.5).astype(int)
        s = score_benchmark(correct, resamples=1000)[f"avg@{k}"]
        assert s.ci_low <= s.value <= s.ci_high
        widths[k] = s.ci_high - s.ci_low
    assert widths[4] < 0.7 * widths[1] and widths[16] < 0.7 * widths[4]
    assert widths[16] == pytest.approx(widths[1] / 4, rel=0.35)


def test_score_benchmark_reports_avg_and_pass_at_each_k():
    scores = score_benchmark(CORRECT, pass_ks=(1, 2, 4), resamples=200)
    assert set(scores) == {"avg@4", "pass@1", "pass@2", "pass@4"}
    assert scores["avg@4"].value == pytest.approx(0.5)
    assert scores["pass@4"].value == pytest.approx(2 / 3)
    for s in scores.values():
        assert 0.0 <= s.ci_low <= s.value <= s.ci_high <= 1.0
