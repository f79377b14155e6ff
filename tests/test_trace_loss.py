"""The TRACE objective, its schedule, metrics and baselines, against examples worked by hand from docs/design.md
("The loss").

The hand example (two responses and a prompt token), w0 = 0.5, kl_weight = 0.25 -> span GRPO weight 0.5:
  token         t0    t1    t2    t3    t4    t5
  response      0     0     0     1     1     (prompt, masked)
  route         PG    FKL   FKL   PG    RKL   PG
  advantage     1     1     1     -1    -1    0
  rho           1.5   1     1     1     1     1
  l_PG          -1.28 -1    -1    +1    +1    (t0 clipped at 1 + 0.28)
  D             .     0.2   0.4   .     0.6
  PG  = (-1.28 + 0.5 (-1) + 0.5 (-1) + 1 + 0.5 (1)) / 5 = -0.78 / 5 = -0.156
  KL  = 0.25 * ((0.2 + 0.4) / 3 + 0.6 / 2) / 2 = 0.0625
  loss = -0.0935
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_trace.config_base import ConfigError, from_dict
from megatron_trace.loss.reductions import reduce_metrics
from megatron_trace.loss.trace_loss import (ExposureTracker, LossConfig, TraceLoss, all_token_routes,
                                            random_span_routes)
from megatron_trace.loss.vocab_parallel import TokenStats, token_stats
from megatron_trace.routes import Route


def step_metrics(m):
    """One micro-batch's metrics reduced as the trainer reduces a step's (one micro-batch, one rank): floats."""
    return reduce_metrics([m], TraceLoss.reductions)


def hand_batch():
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.1], dtype=torch.float64)
    logprob = (old + torch.tensor([math.log(1.5), 0, 0, 0, 0, 0], dtype=torch.float64)).requires_grad_()
    kl = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64, requires_grad=True)
    entropy = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    stats = TokenStats(logprob, entropy, kl)
    batch = dict(old_logprob=old, advantages=torch.tensor([1.0, 1, 1, -1, -1, 0], dtype=torch.float64),
                 routes=torch.tensor([0, 1, 1, 0, 2, 0]), response_index=torch.tensor([0, 0, 0, 1, 1, 0]),
                 response_lengths=torch.tensor([3, 2]), loss_mask=torch.tensor([1, 1, 1, 1, 1, 0]),
                 kl_rows=torch.tensor([1, 2, 4]))
    return stats, batch


def test_trace_loss_matches_the_hand_example():
    stats, batch = hand_batch()
    loss, m = TraceLoss(LossConfig())(stats, **batch, kl_weight=0.25)
    assert math.isclose(float(loss.detach()), -0.0935, abs_tol=1e-12)
    assert math.isclose(m["pg_loss"], -0.156, abs_tol=1e-12) and math.isclose(m["kl_loss"], 0.0625, abs_tol=1e-12)
    g_lp, g_kl = torch.autograd.grad(loss, [stats.logprob, stats.kl])
    # d/dlogprob: clipped t0 gets 0; span tokens 0.5 * (-A rho) / 5; PG tokens (-A rho) / 5; masked t5 0.
    assert torch.allclose(g_lp, torch.tensor([0.0, -0.1, -0.1, 0.2, 0.1, 0.0], dtype=torch.float64), atol=1e-12)
    # d/dD: lambda / |y| / R = 0.25 / 3 / 2 for response 0, 0.25 / 2 / 2 for response 1.
    assert torch.allclose(g_kl, torch.tensor([0.25 / 6, 0.25 / 6, 0.0625], dtype=torch.float64), atol=1e-12)


def test_metrics_are_sums_counts_and_means_per_route():
    stats, batch = hand_batch()
    _, raw = TraceLoss(LossConfig())(stats, **batch, kl_weight=0.25)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in raw.values())
    m = step_metrics(raw)
    expected = dict(tokens=5, pg_tokens=2, fkl_tokens=2, rkl_tokens=1, span_tokens=3, clipped_tokens=1,
                    kl_fkl_sum=0.6, kl_rkl_sum=0.6, kl_fkl=0.3, kl_rkl=0.6,
                    entropy_pg_sum=5.0, entropy_fkl_sum=5.0, entropy_rkl_sum=5.0,
                    entropy_pg=2.5, entropy_fkl=2.5, entropy_rkl=5.0,
                    frac_pg=0.4, frac_fkl=0.4, frac_rkl=0.2, clip_frac=0.2, kl_weight=0.25)
    for key, value in expected.items():
        assert math.isclose(m[key], value, abs_tol=1e-12), (key, m[key], value)
    assert all(isinstance(v, float) for v in m.values())


def test_global_counts_normalise_pg_by_tokens_and_kl_by_responses():
    stats, batch = hand_batch()
    loss, m = TraceLoss(LossConfig())(stats, **batch, kl_weight=0.25, num_tokens=10, num_responses=4)
    assert math.isclose(m["pg_loss"], -0.078, abs_tol=1e-12)
    assert math.isclose(m["kl_loss"], 0.03125, abs_tol=1e-12)
    assert math.isclose(float(loss.detach()), -0.04675, abs_tol=1e-12)


def test_span_tokens_get_full_grpo_weight_once_kl_weight_is_zero_and_none_at_w0():
    stats, batch = hand_batch()
    loss0, m0 = TraceLoss(LossConfig())(stats, **batch, kl_weight=0.0)
    # all tokens weight 1: (-1.28 - 1 - 1 + 1 + 1) / 5
    assert math.isclose(float(loss0.detach()), -0.256, abs_tol=1e-12) and m0["kl_loss"] == 0.0
    loss_w0, m_w0 = TraceLoss(LossConfig())(stats, **batch, kl_weight=0.5)
    # span tokens weight 0: (-1.28 + 1) / 5; KL 0.5 * 0.5 / 2
    assert math.isclose(m_w0["pg_loss"], -0.056, abs_tol=1e-12)
    assert math.isclose(m_w0["kl_loss"], 0.125, abs_tol=1e-12)


def test_grpo_mode_ignores_spans_and_kl():
    stats, batch = hand_batch()
    loss, raw = TraceLoss(LossConfig(mode="grpo"))(stats, **batch, kl_weight=0.25)
    m = step_metrics(raw)
    assert math.isclose(float(loss.detach()), -0.256, abs_tol=1e-12)
    assert m["kl_loss"] == 0.0 and m["span_tokens"] == 0.0 and m["kl_fkl_sum"] == 0.0 and m["frac_pg"] == 1.0


def test_masked_positions_cannot_leak_nan_into_the_loss():
    stats, batch = hand_batch()
    batch["old_logprob"] = batch["old_logprob"].clone()
    batch["old_logprob"][5] = float("nan")
    loss, _ = TraceLoss(LossConfig())(stats, **batch, kl_weight=0.25)
    assert math.isclose(float(loss.detach()), -0.0935, abs_tol=1e-12)


@pytest.mark.parametrize("change, message", [
    (dict(kl_rows=torch.tensor([1, 4, 2])), "kl_rows must be exactly the FKL/RKL positions"),
    (dict(kl_rows=torch.tensor([1, 2])), "kl_rows must be \\[3\\]"),
    (dict(routes=torch.tensor([0, 1, 1, 0, 2, 1])), "span routes \\(FKL/RKL\\) on tokens outside the loss mask"),
    (dict(routes=torch.tensor([0, 1, 1, 0, 2, 7])), "routes must hold Route ids"),
    (dict(advantages=torch.zeros(5)), "advantages must be \\[6\\]"),
    (dict(response_index=torch.tensor([0, 0, 0, 1, 2, 0])), "response_index must be in \\[0, R=2\\)"),
    (dict(response_lengths=torch.tensor([3, 0])), "response_lengths must be positive"),
    (dict(kl_weight=0.6), "kl_weight=0.6 must be in \\[0, w0=0.5\\]"),
    (dict(kl_weight=-0.1), "kl_weight=-0.1 must be in"),
    (dict(cfg=LossConfig(mode="all_token_opd")), "every response token must be routed FKL/RKL"),
    (dict(num_tokens=0), "must be positive"),
])
def test_bad_input_raises_a_clear_error(change, message):
    stats, batch = hand_batch()
    kwargs = dict(batch, kl_weight=0.25, cfg=LossConfig())
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        TraceLoss(kwargs.pop("cfg"))(stats, **kwargs)


def test_trace_loss_gradient_through_token_stats_matches_float64_full_vocab_reference():
    """End to end at TP=1: token_stats -> trace_loss gives the gradient of the plain formula on the logits."""
    g = torch.Generator().manual_seed(0)
    T, V = 6, 50
    z = (torch.randn(T, V, generator=g, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, V, (T,), generator=g)
    _, batch = hand_batch()
    rows = batch["kl_rows"]
    reverse = batch["routes"][rows] == int(Route.RKL)
    teacher = torch.randn(len(rows), V, generator=g, dtype=torch.float64) * 3
    batch["old_logprob"] = torch.log_softmax(z.detach(), -1).gather(1, target[:, None]).squeeze(1) + 0.1
    cfg = LossConfig(kl_clip=0.05)
    stats = token_stats(z, target, teacher_logits=teacher, kl_rows=rows, kl_reverse=reverse, kl_clip=0.05)
    loss, _ = TraceLoss(cfg)(stats, **batch, kl_weight=0.3)
    (got,) = torch.autograd.grad(loss, z)

    zr = z.detach().clone().requires_grad_()
    log_p = torch.log_softmax(zr, -1)
    rho = torch.exp(log_p.gather(1, target[:, None]).squeeze(1) - batch["old_logprob"])
    adv = batch["advantages"]
    l_pg = -torch.minimum(rho * adv, rho.clamp(0.8, 1.28) * adv)
    w = torch.tensor([1, 0.4, 0.4, 1, 0.4, 0], dtype=torch.float64)  # 1 - 0.3 / 0.5 on spans; t5 masked
    log_q = torch.log_softmax(teacher, -1)
    lp = log_p[rows]
    terms = torch.where(reverse[:, None], lp.exp() * (lp - log_q), log_q.exp() * (log_q - lp)).clamp(max=0.05)
    d = terms.sum(-1)
    ref = (l_pg * w).sum() / 5 + 0.3 * (d[0] / 3 + d[1] / 3 + d[2] / 2) / 2
    assert math.isclose(float(loss.detach()), float(ref.detach()), rel_tol=1e-12)
    (expected,) = torch.autograd.grad(ref, zr)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- schedule

def test_kl_weight_is_held_for_exactly_w_steps_then_linear_to_exactly_zero():
    # lambda_k = w0 for k < W, then w0 * max(0, 1 - (k - W + 1) / D): held for W = 10 steps (k = 0..9), not 11
    s = LossConfig()  # 0.5, 10, 30
    assert [s.kl_weight(k) for k in (0, 5, 9)] == [0.5, 0.5, 0.5]
    assert math.isclose(s.kl_weight(10), 0.5 * 29 / 30)          # 1 - (10 - 10 + 1) / 30
    assert math.isclose(s.kl_weight(24), 0.25)                   # 1 - 15 / 30
    assert math.isclose(s.kl_weight(38), 0.5 / 30)               # the last active step
    assert s.kl_weight(39) == 0.0 and s.kl_weight(40) == 0.0 and s.kl_weight(10_000) == 0.0  # off from W + D - 1
    assert s.last_active_step == 38
    weights = [s.kl_weight(k) for k in range(9, 40)]
    assert all(a > b for a, b in zip(weights, weights[1:]))


def test_kl_schedule_small_decays_and_the_constant_schedule():
    s = LossConfig(w0=0.3, warmup_steps=2, decay_steps=0)
    assert [s.kl_weight(k) for k in range(4)] == [0.3, 0.3, 0.0, 0.0]
    assert s.last_active_step == 1
    s = LossConfig(w0=0.3, warmup_steps=2, decay_steps=1)  # 1 - (2 - 2 + 1) / 1 = 0 at k = W
    assert [s.kl_weight(k) for k in range(4)] == [0.3, 0.3, 0.0, 0.0] and s.last_active_step == 1
    s = LossConfig(w0=0.4, warmup_steps=1, decay_steps=4)
    assert [s.kl_weight(k) for k in range(6)] == [0.4, 0.4 * 3 / 4, 0.4 * 2 / 4, 0.4 * 1 / 4, 0.0, 0.0]
    assert s.last_active_step == 3
    assert LossConfig(w0=0.0).last_active_step == -1
    c = LossConfig(w0=0.5, warmup_steps=10, decay_steps=30, kl_schedule="constant")
    assert [c.kl_weight(k) for k in (0, 10, 39, 40, 10_000)] == [0.5] * 5 and c.last_active_step is None
    with pytest.raises(ConfigError, match="kl_schedule"):
        LossConfig(kl_schedule="cosine")


def test_schedule_and_config_load_from_dicts_and_reject_bad_values():
    loaded = from_dict(LossConfig, {"w0": 1, "warmup_steps": 3})
    assert loaded.kl_weight(2) == 1.0 and loaded.kl_weight(3) == pytest.approx(29 / 30)
    cfg = from_dict(LossConfig, {"kl_clip": None, "mode": "random_spans"})
    assert cfg.kl_clip is None and cfg.mode == "random_spans"
    for cls, data, message in [(LossConfig, {"warmup_steps": -1}, "warmup_steps"),
                               (LossConfig, {"w0": -0.5}, "w0"),
                               (LossConfig, {"eps_low": 1.0}, "eps_low"),
                               (LossConfig, {"kl_clip": 0.0}, "kl_clip"),
                               (LossConfig, {"mode": "opd"}, "mode")]:
        with pytest.raises(ConfigError, match=message):
            from_dict(cls, data)
    with pytest.raises(ValueError, match="step must be >= 0"):
        LossConfig().kl_weight(-1)


# ---------------------------------------------------------------------------------------------------- exposure

def test_exposure_accumulates_squared_kl_weight_times_span_fraction_and_round_trips():
    t = ExposureTracker()
    assert t.update(0.5, 25, 100) == 0.0625          # 0.25 * 0.25
    assert t.update(0.25, 50, 100) == 0.09375        # + 0.0625 * 0.5
    assert t.update(0.0, 80, 100) == 0.09375         # lambda 0 adds nothing
    restored = ExposureTracker()
    restored.load_state_dict(t.state_dict())
    assert restored.value == 0.09375 and restored.steps == 3
    with pytest.raises(ValueError, match="span_tokens=5 must be in \\[0, tokens=4\\]"):
        t.update(0.5, 5, 4)


# ---------------------------------------------------------------------------------------------------- baselines

def test_all_token_baseline_routes_every_response_token_to_fkl():
    mask = torch.tensor([0, 1, 1, 1, 0])
    assert all_token_routes(mask, True).tolist() == [0, 1, 1, 1, 0]
    assert all_token_routes(mask, False).tolist() == [0, 1, 1, 1, 0]
    assert all_token_routes(mask, False, reverse_on_incorrect=True).tolist() == [0, 2, 2, 2, 0]
    assert all_token_routes(mask, True, reverse_on_incorrect=True).tolist() == [0, 1, 1, 1, 0]


def test_random_span_baseline_routes_like_annotator_spans():
    spans = torch.tensor([0, 1, 0, 1, 1])
    assert random_span_routes(spans, True).tolist() == [0, 1, 0, 1, 1]
    assert random_span_routes(spans, False).tolist() == [0, 0, 0, 0, 0]
    assert random_span_routes(spans, False, rkl=True).tolist() == [0, 2, 0, 2, 2]
    with pytest.raises(ValueError, match="outside the response"):
        random_span_routes(spans, True, loss_mask=torch.tensor([1, 1, 1, 1, 0]))


def test_all_token_opd_mode_accepts_all_token_routes():
    stats, batch = hand_batch()
    mask = batch["loss_mask"]
    batch["routes"] = all_token_routes(mask, True)
    batch["kl_rows"] = torch.tensor([0, 1, 2, 3, 4])
    stats = TokenStats(stats.logprob, stats.entropy, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64))
    loss, raw = TraceLoss(LossConfig(mode="all_token_opd"))(stats, **batch, kl_weight=0.5)
    m = step_metrics(raw)
    # at lambda = w0 the GRPO part vanishes: KL = 0.5 * ((0.1 + 0.2 + 0.3) / 3 + (0.4 + 0.5) / 2) / 2
    assert math.isclose(float(loss.detach()), 0.5 * (0.2 + 0.45) / 2, abs_tol=1e-12)
    assert m["frac_fkl"] == 1.0


def test_all_token_opd_after_the_anneal_is_grpo_on_every_token():
    # lambda_k = 0: the trainer routes nothing (no annotate, no teacher); the loss must equal plain GRPO's
    stats, batch = hand_batch()
    batch["routes"] = torch.zeros_like(batch["routes"])
    batch["kl_rows"] = torch.zeros(0, dtype=torch.long)
    stats = TokenStats(stats.logprob, stats.entropy, torch.zeros(0, dtype=torch.float64))
    loss, _ = TraceLoss(LossConfig(mode="all_token_opd"))(stats, **batch, kl_weight=0.0)
    ref, _ = TraceLoss(LossConfig(mode="grpo"))(stats, **batch, kl_weight=0.0)
    assert float(ref.detach()) != 0.0 and float(loss.detach()) == float(ref.detach())


def test_trainer_value_checks_run_per_step_and_name_the_bad_micro_batch():
    """loss.check_values: Trainer._check_loss_inputs (run once per step, before the micro-batch loop) passes a valid
    step and names the micro-batch and the cause of a bad one; the loss's hot path skips these checks."""
    from types import SimpleNamespace

    from megatron_trace.train.trainer import Trainer

    def mb(**change):
        d = dict(rows=torch.arange(6), targets=torch.tensor([1, 5, 9, 2, 0, 3]),
                 routes=torch.tensor([0, 1, 1, 0, 2, 0]), kl_rows=torch.tensor([1, 2, 4]),
                 response_index=torch.tensor([0, 0, 0, 1, 1, 1]), response_lengths=torch.tensor([3, 3]))
        d.update(change)
        return d

    cfg = LossConfig(check_values=True)
    trainer = SimpleNamespace(loss=TraceLoss(cfg), vocab_size=10, step=7, cfg=SimpleNamespace(loss=cfg))
    Trainer._check_loss_inputs(trainer, [mb(), mb()], 0.25, True)
    with pytest.raises(ValueError, match=r"step 7, micro-batch 1 \(loss.check_values\): target_ids\[2\] = 12 is "
                                         r"outside the vocabulary \[0, 10\)"):
        Trainer._check_loss_inputs(trainer, [mb(), mb(targets=torch.tensor([1, 5, 12, 2, 0, 3]))], 0.25, True)
    with pytest.raises(ValueError, match="micro-batch 0 .*kl_rows must be exactly the FKL/RKL positions"):
        Trainer._check_loss_inputs(trainer, [mb(kl_rows=torch.tensor([1, 3, 4]))], 0.25, True)
    with pytest.raises(ValueError, match="micro-batch 0 .*response_index must be in"):
        Trainer._check_loss_inputs(trainer, [mb(response_index=torch.tensor([0, 0, 0, 1, 1, 2]))], 0.25, True)
    # the same bad batch goes through the hot path's loss unchecked (check_values=False: no host sync)
    stats, batch = hand_batch()
    batch = dict(batch, routes=torch.tensor([0, 1, 1, 0, 2, 7]))  # route id 7 does not exist
    TraceLoss(cfg)(stats, **batch, kl_weight=0.25, check_values=False)
    with pytest.raises(ValueError, match="routes must hold Route ids"):
        TraceLoss(cfg)(stats, **batch, kl_weight=0.25)
    with pytest.raises(ValueError, match="fused_output_grad"):
        LossConfig(fused_output_grad="later")
    with pytest.raises(ValueError, match="kernels: 'fast' is not one of auto, compiled, eager"):
        LossConfig(kernels="fast")
