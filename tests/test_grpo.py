"""GRPO pieces against small examples worked by hand from the formulas (expected numbers written out)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_trace.loss.grpo import (clipped_surrogate, dynamic_sampling_mask, group_advantages, overlong_penalty,
                                      token_mean)


def test_group_advantages_are_reward_minus_group_mean_over_unbiased_std():
    # group [1, 0, 0, 0]: mean 0.25, deviations 0.75, -0.25 x3; unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25
    # -> std 0.5 -> A = [1.5, -0.5, -0.5, -0.5]. group [2, 2, 2, 2]: all 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, eps=0.0)
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0]), atol=1e-7)
    # eps enters the denominator: 0.75 / (0.5 + 0.5) = 0.75
    assert math.isclose(float(group_advantages(rewards, 4, eps=0.5)[0]), 0.75, rel_tol=1e-7)


def test_group_advantages_without_std_are_centered_rewards():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, 2.0]]), 4, normalize_std=False)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 0.0, 0.0]))


def test_group_advantages_accept_flat_or_grouped_rewards_alike():
    flat = torch.tensor([0.0, 1.0, 1.0, 5.0, 2.0, 3.0])
    assert torch.equal(group_advantages(flat, 3), group_advantages(flat.view(2, 3), 3))


def test_group_of_one_has_zero_advantage():
    assert torch.equal(group_advantages(torch.tensor([3.0, -1.0]), 1), torch.zeros(2))


@pytest.mark.parametrize("rewards, group_size, message", [
    (torch.ones(5), 2, "5 rewards do not split into groups of 2"),
    (torch.ones(2, 3), 2, "n != group_size 2"),
    (torch.ones(2, 2, 2), 2, "must be \\[G\\*n\\] or \\[num_groups, n\\]"),
    (torch.ones(4), 0, "group_size must be a positive int"),
    (torch.tensor([1.0, float("nan")]), 2, "NaN/inf"),
])
def test_group_advantages_reject_bad_shapes(rewards, group_size, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, group_size)


def test_dynamic_sampling_drops_groups_whose_rewards_are_all_equal():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    assert dynamic_sampling_mask(rewards, 2).tolist() == [False, True, False, False]
    assert dynamic_sampling_mask(rewards.view(2, 4), 4).tolist() == [True, True]
    with pytest.raises(ValueError, match="do not split"):
        dynamic_sampling_mask(rewards, 3)


def test_overlong_penalty_is_zero_then_a_linear_ramp_then_full():
    # max_len 100, buffer 20: free up to 80, ramp (80, 100], -penalty beyond 100.
    lengths = torch.tensor([50, 80, 90, 95, 100, 101])
    assert torch.allclose(overlong_penalty(lengths, 100, 20), torch.tensor([0.0, 0.0, -0.5, -0.75, -1.0, -1.0]))
    assert torch.allclose(overlong_penalty(lengths, 100, 20, penalty=2.0),
                          torch.tensor([0.0, 0.0, -1.0, -1.5, -2.0, -2.0]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=torch.ones(2, 2), max_len=10, buffer=2), "lengths must be \\[N\\]"),
    (dict(lengths=torch.tensor([-1]), max_len=10, buffer=2), "non-negative"),
    (dict(lengths=torch.tensor([1]), max_len=10, buffer=0), "buffer must be in \\(0, max_len=10\\]"),
    (dict(lengths=torch.tensor([1]), max_len=10, buffer=11), "buffer must be in"),
])
def test_overlong_penalty_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        overlong_penalty(**kwargs)


def test_clipped_surrogate_matches_hand_values_and_gradients():
    # (advantage, rho) -> (loss, clipped, d loss / d logprob), eps_low 0.2, eps_high 0.28:
    cases = [
        (1.0, 1.5, -1.28, True, 0.0),     # A > 0, rho above 1.28: clipped, no gradient
        (1.0, 1.25, -1.25, False, -1.25),  # inside clip-higher (a symmetric 0.2 clip would cut it)
        (1.0, 0.5, -0.5, False, -0.5),     # A > 0, rho small: unclipped branch is the min, d(-A rho) = -A rho
        (-1.0, 0.5, 0.8, True, 0.0),       # A < 0, rho below 0.8: clipped
        (-1.0, 0.75, 0.8, True, 0.0),
        (-1.0, 1.5, 1.5, False, 1.5),      # A < 0, rho large: unclipped (pessimistic) branch
        (2.0, 1.1, -2.2, False, -2.2),     # inside the trust region
        (0.0, 3.0, 0.0, False, 0.0),
    ]
    adv = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    old = torch.linspace(-3.0, -0.5, len(cases), dtype=torch.float64)
    logprob = (old + torch.log(torch.tensor([c[1] for c in cases], dtype=torch.float64))).requires_grad_()
    loss, clipped = clipped_surrogate(logprob, old, adv)
    assert torch.allclose(loss, torch.tensor([c[2] for c in cases], dtype=torch.float64), atol=1e-12)
    assert clipped.tolist() == [c[3] for c in cases]
    (grad,) = torch.autograd.grad(loss.sum(), logprob)
    assert torch.allclose(grad, torch.tensor([c[4] for c in cases], dtype=torch.float64), atol=1e-12)


def test_clipped_surrogate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="old_logprob has shape \\(3,\\), logprob has \\(4,\\)"):
        clipped_surrogate(torch.zeros(4), torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="advantages has shape"):
        clipped_surrogate(torch.zeros(4), torch.zeros(4), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="logprob must be \\[T\\]"):
        clipped_surrogate(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))


def test_token_mean_divides_masked_sum_by_global_count():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert float(token_mean(x, mask)) == 2.0
    assert float(token_mean(x, mask, num_tokens=12)) == 0.5  # e.g. 12 tokens across all micro-batches
