"""Batch scoring in worker processes: a hanging or crashing item scores 0, is counted, and never stalls."""

import os
import time

import pytest

from megatron_trace.rewards.batch import RewardScorer, score_batch

# sympy evaluates this power tower exactly when math-verify compares it: it does not finish in minutes.
HANGING = "The answer is $\\boxed{9^{9^{9^{9}}}}$"


def crashing_reward(response: str, gold: str) -> float:
    """A verifier that takes its process down on one input (as a segfaulting extension would)."""
    if response == "crash":
        os._exit(3)
    if response == "raise":
        raise RuntimeError("verifier bug")
    return 1.0 if response == gold else 0.0


@pytest.fixture(scope="module")
def math_scorer():
    with RewardScorer("math", workers=2) as scorer:
        yield scorer


def test_batch_scores_match_the_single_item_reward(math_scorer):
    responses = ["$\\boxed{81}$", "$\\boxed{80}$", "no box", "<think>\n</think>\n\\boxed{\\frac{1}{2}}"]
    golds = ["81", "81", "81", "0.5"]
    out = math_scorer.score(responses, golds, timeout_s=30.0)
    assert out.scores == [1.0, 0.0, 0.0, 1.0]
    assert (out.timeouts, out.errors) == (0, 0)


def test_hanging_item_is_cut_off_and_the_pool_keeps_working(math_scorer):
    t0 = time.monotonic()
    out = math_scorer.score([HANGING, "$\\boxed{2}$", "$\\boxed{3}$"], ["1", "2", "2"], timeout_s=2.0)
    elapsed = time.monotonic() - t0
    assert out.scores == [0.0, 1.0, 0.0]
    assert out.timeouts == 1 and out.errors == 0
    assert elapsed < 30.0  # bounded by the time limit plus a worker restart, not by sympy
    # the killed worker was replaced: the next batch uses the full pool again
    again = math_scorer.score(["$\\boxed{5}$"] * 3, ["5"] * 3, timeout_s=30.0)
    assert again.scores == [1.0, 1.0, 1.0] and again.timeouts == 0
    assert math_scorer.replaced >= 1


def test_crashing_and_raising_items_score_zero_and_are_counted():
    with RewardScorer(crashing_reward, workers=1) as scorer:
        out = scorer.score(["a", "crash", "raise", "b"], ["a", "x", "x", "b"], timeout_s=30.0)
    assert out.scores == [1.0, 0.0, 0.0, 1.0]
    assert out.errors == 2 and out.timeouts == 0
    assert any("died" in m for m in out.error_messages)
    assert any("verifier bug" in m for m in out.error_messages)


def test_bad_gold_answer_is_an_error_not_a_crash(math_scorer):
    out = math_scorer.score(["$\\boxed{1}$"], [""], timeout_s=30.0)
    assert out.scores == [0.0] and out.errors == 1
    assert "gold answer is empty" in out.error_messages[0]


def test_score_batch_reuses_one_pool():
    from megatron_trace.rewards import batch

    a = score_batch(["\\boxed{A}"], ["A"], "choice", workers=1, timeout_s=30.0)
    pool = batch._SCORERS[("choice", 1)]
    b = score_batch(["\\boxed{B}"], ["A"], "choice", workers=1, timeout_s=30.0)
    assert batch._SCORERS[("choice", 1)] is pool
    assert (a.scores, b.scores) == ([1.0], [0.0])


def test_unknown_reward_and_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardScorer("nope")
    with RewardScorer("choice", workers=1) as scorer:
        with pytest.raises(ValueError, match="2 responses but 1 gold"):
            scorer.score(["a", "b"], ["A"])
