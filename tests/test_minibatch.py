"""PPO mini-batches: the split, and a tiny TRACE update at TP=2 (CPU, gloo) taking 4 optimizer steps on one rollout
batch (2 mini-batches x 2 epochs) with log p_old from one no-grad forward before the first step.

First step: the weights are those log p_old was computed with, so rho = 1 on every token (no clip, approx_kl 0).
Later steps: the weights moved (lr 0.01), so rho != 1 and, at this learning rate, the 0.2/0.28 clip fires.
"""

from __future__ import annotations

import pytest

from dist_harness import run_distributed
from megatron_trace.train.minibatch import minibatch_indices, optimizer_steps_per_batch


def test_minibatches_partition_the_batch_in_near_equal_seeded_parts():
    parts = minibatch_indices(10, 4, seed=3)
    assert len(parts) == 3 and sorted(len(p) for p in parts) == [3, 3, 4]
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert parts == minibatch_indices(10, 4, seed=3) and parts != minibatch_indices(10, 4, seed=4)
    assert minibatch_indices(10, 0, seed=3) == [list(range(10))] == minibatch_indices(10, 16, seed=3)
    assert optimizer_steps_per_batch(10, 4, 2) == 6 and optimizer_steps_per_batch(10, 0, 1) == 1
    with pytest.raises(ValueError, match="num_samples"):
        minibatch_indices(0, 4, seed=0)


def _update(rank, world_size, hf_dir):
    from test_trainer_step import KL_WEIGHT, W0, _samples

    from megatron_trace.config import load_config
    from megatron_trace.train.trainer import Trainer

    cfg = load_config(None, [f"model.hf_config={hf_dir}", f"model.load={hf_dir}", "parallel.tp=2",
                             "data.path=megatron_trace/data/assets/arith_test.jsonl",
                             "annotate.annotator=reference_match", f"loss.w0={W0}", "loss.kl_clip=0.05",
                             "optim.lr=0.01", "optim.clip_grad=100.0", "optim.adam_eps=0.01",
                             "optim.micro_batch_size=2", "optim.global_batch_size=3", "optim.epochs=2",
                             "checkpoint.resume=none", f"logging.output_dir=/tmp/minibatch_{world_size}",
                             "logging.tensorboard=false"])
    trainer = Trainer(cfg, start_rollout=False)
    per_step = []
    step_minibatch = trainer._step_minibatch

    def recording(prep, kl_weight):
        m = step_minibatch(prep, kl_weight)
        per_step.append(m)
        return m

    trainer._step_minibatch = recording
    metrics = trainer.update(_samples(), KL_WEIGHT)
    trainer.close()
    return {"metrics": metrics, "per_step": per_step}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from test_trainer_step import VOCAB
    from tiny_hf_model import make_tiny_qwen3_dir

    # the model of test_trainer_step (head x20: KL terms far from zero), a tokenizer that fits its 1000 rows
    hf_dir = make_tiny_qwen3_dir(str(tmp_path_factory.mktemp("minibatch") / "hf"), seed=0, tied=False,
                                 vocab_size=VOCAB, hidden=64, intermediate=128, layers=2, max_positions=512,
                                 tokenizer="truncated", init_std=None, lm_head_scale=20.0)
    return run_distributed(_update, 2, hf_dir, init_gloo=False, timeout=400)[0]


def test_tiny_trace_update_at_tp2_takes_4_steps_and_the_clip_acts(result):
    m, steps = result["metrics"], result["per_step"]
    assert m["optimizer_steps"] == 4 and len(steps) == 4
    first = steps[0]
    # rho = 1 exactly up to float noise on the first step: log p_old came from these very weights
    assert first["clipped_tokens"] == 0 and abs(first["approx_kl"]) < 1e-5
    later = steps[1:]
    assert all(abs(s["approx_kl"]) > 1e-4 for s in later), [s["approx_kl"] for s in later]
    assert sum(s["clipped_tokens"] for s in later) > 0
    assert m["clip_frac"] > 0 and m["clip_frac"] == pytest.approx(
        sum(s["clipped_tokens"] for s in steps) / sum(s["tokens"] for s in steps))
    # each epoch covers the batch once: 2 mini-batches of 3 responses, counts per pass
    from test_trainer_step import _samples

    assert m["tokens"] == sum(len(s.response_ids) for s in _samples())
    assert sum(s["tokens"] for s in steps) == 2 * m["tokens"]
    assert m["fkl_tokens"] == 9 and m["rkl_tokens"] == 6  # spans kept through the split
    for key in ("loss", "pg_loss", "kl_loss", "grad_norm", "approx_kl"):
        assert m[key] == m[key] and abs(m[key]) < 1e6, key


def test_step_metrics_combine_as_declared():
    from megatron_trace.train.minibatch import combine_step_metrics

    steps = [dict(tokens=10.0, clipped_tokens=0.0, loss=1.0, grad_norm=2.0, update_skipped=0.0, kl_weight=0.5),
             dict(tokens=30.0, clipped_tokens=6.0, loss=3.0, grad_norm=4.0, update_skipped=1.0, kl_weight=0.5)]
    m = combine_step_metrics(steps, {"tokens": "sum", "clipped_tokens": "sum", "loss": "sum", "kl_weight": "max",
                                     "clip_frac": ("clipped_tokens", "tokens")}, epochs=2)
    assert m["clip_frac"] == 6 / 40  # over all steps' tokens, not the mean of the steps' fractions
    assert m["tokens"] == 20 and m["loss"] == 2.0 and m["grad_norm"] == 3.0 and m["grad_norm_max"] == 4.0
    assert m["kl_weight"] == 0.5 and m["update_skipped"] == 1 and m["optimizer_steps"] == 2
