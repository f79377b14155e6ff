"""PPO pieces of the RL core against hand-worked values: the bounded log-ratio (log rho = 100 stays finite),
truncated importance weights, the approx-KL estimator, and the PG weight on distilled tokens of each baseline.

Baselines as one config each (loss.kl_schedule x loss.pg_on_kl_tokens, mode all_token_opd: every token distilled):
  all-token self-OPD, constant lambda   constant x anneal  -> PG weight 1 - w0/w0 = 0, KL weight w0
  GRPO + constant all-token KL           constant x full    -> PG weight 1,           KL weight w0
  pure all-token distillation            any      x off     -> PG weight 0
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_trace.loss.grpo import (LOG_RATIO_BOUND, approx_kl_terms, bounded_log_ratio, clipped_surrogate,
                                      truncated_is_weights)
from megatron_trace.loss.schedule import kl_weight_at, pg_weight_on_kl_tokens
from megatron_trace.loss.trace_loss import LossConfig, TraceLoss
from megatron_trace.loss.vocab_parallel import TokenStats

F64 = torch.float64


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_log_ratio_100_gives_a_finite_loss_and_finite_gradients(advantage):
    old = torch.tensor([-105.0, -1.0, -1.0], dtype=torch.float32)
    new = torch.tensor([-5.0, -1.0, -101.0], dtype=torch.float32, requires_grad=True)  # log rho = 100, 0, -100
    adv = torch.full((3,), advantage)
    per_token, clipped = clipped_surrogate(new, old, adv)
    loss = per_token.sum()
    (grad,) = torch.autograd.grad(loss, new)
    assert torch.isfinite(per_token).all() and torch.isfinite(grad).all()
    # unbounded: exp(100) overflows fp32 to inf (the bug this guards against)
    assert math.isinf(torch.exp(torch.tensor(100.0)).item())
    rho_max = math.exp(LOG_RATIO_BOUND)
    if advantage > 0:  # rho = e^20: -min(rho, 1.28) = -1.28 (clipped); rho = e^-20: -min(rho, 0.8) = -e^-20
        assert per_token[0].item() == pytest.approx(-1.28) and bool(clipped[0])
        assert per_token[2].item() == pytest.approx(-1 / rho_max) and not bool(clipped[2])
    else:  # rho = e^20: -min(-rho, -1.28) = rho bounded at e^20; rho = e^-20: -min(-rho, -0.8) = 0.8 (clipped)
        assert per_token[0].item() == pytest.approx(rho_max, rel=1e-6) and not bool(clipped[0])
        assert per_token[2].item() == pytest.approx(0.8) and bool(clipped[2])
    assert grad[0].item() == 0.0 and grad[2].item() == 0.0  # no gradient through the clamp or the clip
    assert grad[1].item() == pytest.approx(-advantage)  # rho = 1 token: d(-rho A)/dlogprob = -A


def test_log_ratio_100_through_the_trace_loss_is_finite():
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float32, requires_grad=True)
    stats = TokenStats(lp, torch.zeros(2), torch.zeros(0))
    for adv in (1.0, -1.0):
        loss, m = TraceLoss(LossConfig())(
            stats, old_logprob=torch.tensor([-101.0, -2.0]), advantages=torch.full((2,), adv),
            routes=torch.zeros(2, dtype=torch.long), response_index=torch.zeros(2, dtype=torch.long),
            response_lengths=torch.tensor([2]), loss_mask=torch.ones(2), kl_rows=torch.zeros(0, dtype=torch.long),
            kl_weight=0.0)
        (g,) = torch.autograd.grad(loss, lp)
        assert math.isfinite(float(loss.detach())) and torch.isfinite(g).all()
        assert float(m["approx_kl_sum"]) == pytest.approx(-20.0)  # old - new bounded at -20 nats (verl's clamp)


def test_bounded_log_ratio_clamps_at_plus_minus_20_nats():
    got = bounded_log_ratio(torch.tensor([100.0, 3.0, -100.0]), torch.zeros(3))
    assert got.tolist() == [20.0, 3.0, -20.0]


def test_truncated_importance_weights_hand_values():
    old = torch.tensor([-1.0, -1.0, -1.0], dtype=F64)
    sampler = torch.tensor([-1.0, -1.0 - math.log(2.0), -1.0 + math.log(2.0)], dtype=F64)
    w = truncated_is_weights(old, sampler, cap=1.5)
    assert torch.allclose(w, torch.tensor([1.0, 1.5, 0.5], dtype=F64))  # pi_old / pi_sampler = 1, 2 -> 1.5, 0.5
    assert not w.requires_grad
    # in the loss: per-token PG terms multiplied by w (rho = 1, A = 1: l_PG = -1 each) -> (-1 - 1.5 - 0.5) / 3
    lp = old.clone().requires_grad_()
    stats = TokenStats(lp, torch.zeros(3, dtype=F64), torch.zeros(0, dtype=F64))
    loss, _ = TraceLoss(LossConfig(tis_cap=1.5))(stats, old_logprob=old, advantages=torch.ones(3, dtype=F64),
                         routes=torch.zeros(3, dtype=torch.long), response_index=torch.zeros(3, dtype=torch.long),
                         response_lengths=torch.tensor([3]), loss_mask=torch.ones(3, dtype=F64),
                         kl_rows=torch.zeros(0, dtype=torch.long), kl_weight=0.0,
                         sampler_logprob=sampler)
    assert float(loss.detach()) == pytest.approx(-3.0 / 3)
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.allclose(g, torch.tensor([-1.0, -1.5, -0.5], dtype=F64) / 3)
    with pytest.raises(ValueError, match="sampler_logprob"):
        TraceLoss(LossConfig(tis_cap=1.5))(stats, old_logprob=old, advantages=torch.ones(3, dtype=F64),
                   routes=torch.zeros(3, dtype=torch.long), response_index=torch.zeros(3, dtype=torch.long),
                   response_lengths=torch.tensor([3]), loss_mask=torch.ones(3, dtype=F64),
                   kl_rows=torch.zeros(0, dtype=torch.long), kl_weight=0.0)


def test_approx_kl_is_the_k1_estimator_old_minus_new():
    new = torch.tensor([-1.0, -2.0, -0.5])
    old = torch.tensor([-1.5, -2.0, -0.25])
    assert torch.allclose(approx_kl_terms(new, old), torch.tensor([-0.5, 0.0, 0.25]))


def _span_batch():
    """Four tokens of one response, all distilled (FKL), rho = 1, A = 1: each token's PG gradient is -w/4."""
    lp = torch.tensor([-1.0, -2.0, -0.5, -1.5], dtype=F64, requires_grad=True)
    kl = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64, requires_grad=True)
    stats = TokenStats(lp, torch.zeros(4, dtype=F64), kl)
    batch = dict(old_logprob=lp.detach().clone(), advantages=torch.ones(4, dtype=F64),
                 routes=torch.ones(4, dtype=torch.long), response_index=torch.zeros(4, dtype=torch.long),
                 response_lengths=torch.tensor([4]), loss_mask=torch.ones(4, dtype=F64),
                 kl_rows=torch.arange(4))
    return stats, batch


@pytest.mark.parametrize("schedule,pg_mode,step,pg_weight,kl_weight", [
    # TRACE: anneal x anneal; lambda = w0 during warm-up -> PG weight 0; after the anneal lambda = 0 -> PG weight 1
    ("anneal", "anneal", 0, 0.0, 0.5),
    ("anneal", "anneal", 24, 0.5, 0.25),
    ("anneal", "anneal", 39, 1.0, 0.0),
    # all-token self-OPD with constant lambda: PG weight 0 forever
    ("constant", "anneal", 0, 0.0, 0.5),
    ("constant", "anneal", 1000, 0.0, 0.5),
    # GRPO + constant all-token KL
    ("constant", "full", 0, 1.0, 0.5),
    ("constant", "full", 1000, 1.0, 0.5),
    # pure all-token distillation
    ("constant", "off", 1000, 0.0, 0.5),
    ("anneal", "off", 24, 0.0, 0.25),
])
def test_each_baselines_per_token_pg_and_kl_weights(schedule, pg_mode, step, pg_weight, kl_weight):
    lam = kl_weight_at(step, w0=0.5, warmup_steps=10, decay_steps=30, kind=schedule)
    assert lam == pytest.approx(kl_weight)
    assert pg_weight_on_kl_tokens(lam, 0.5, pg_mode) == pytest.approx(pg_weight)
    stats, batch = _span_batch()
    cfg = LossConfig(w0=0.5, mode="all_token_opd", pg_on_kl_tokens=pg_mode)
    loss, _ = TraceLoss(cfg)(stats, **batch, kl_weight=lam)
    g_lp, g_kl = torch.autograd.grad(loss, [stats.logprob, stats.kl])
    assert torch.allclose(g_lp, torch.full((4,), -pg_weight / 4, dtype=F64), atol=1e-12)  # per-token PG weight
    assert torch.allclose(g_kl, torch.full((4,), lam / 4, dtype=F64), atol=1e-12)  # lambda / |y| / R


def test_pg_weight_modes_at_lambda_zero_and_bad_mode():
    assert [pg_weight_on_kl_tokens(0.0, 0.5, m) for m in ("anneal", "full", "off")] == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="pg_on_kl_tokens"):
        pg_weight_on_kl_tokens(0.1, 0.5, "half")
