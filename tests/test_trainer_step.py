"""One TRACE update through the real trainer: the same at TP=1 and TP=2 x PP=2, and equal to the TRACE loss
recomputed plainly in float64 from transformers' Qwen3 on the gathered batch.

The batch mixes PG, FKL and RKL tokens, so the teacher pass (privileged prompt + the same response tokens,
span-sparse output layer) and both KL directions are on the path. The vocabulary (1000) is not a multiple of
128 x tp, so Megatron's vocabulary padding is exercised too.
"""

from __future__ import annotations

import random

import pytest
import torch

from dist_harness import run_distributed
from tiny_hf_model import make_tiny_qwen3_dir

VOCAB = 1000
KL_WEIGHT = 0.3
W0 = 0.5
KL_CLIP = 0.05


def _samples():
    from megatron_trace.routes import Route
    from megatron_trace.train.batching import Sample

    rng = random.Random(7)
    out = []
    for i in range(6):
        P, L, Pt = rng.randint(5, 12), rng.randint(6, 14), rng.randint(8, 16)
        routes = [int(Route.PG)] * L
        correct = i % 2 == 0
        if i != 5:  # one response with no span at all
            start = rng.randint(0, L - 3)
            for t in range(start, start + 3):
                routes[t] = int(Route.FKL if correct else Route.RKL)
        out.append(Sample(prompt_ids=[rng.randrange(VOCAB) for _ in range(P)],
                          response_ids=[rng.randrange(VOCAB) for _ in range(L)],
                          sampler_logprobs=[-1.0] * L, routes=routes, advantage=rng.uniform(-1.5, 1.5),
                          reward=float(correct), group=i // 2,
                          teacher_prompt_ids=[rng.randrange(VOCAB) for _ in range(Pt)] if i != 5 else None))
    return out


def _update(rank, world_size, hf_dir, tp, pp, mbs, per_pass, fused_output_layer=False, check_values=False):
    from megatron_trace.config import load_config
    from megatron_trace.sync.weight_bridge import export_hf_buckets
    from megatron_trace.train.trainer import Trainer

    cfg = load_config(None, [f"model.hf_config={hf_dir}", f"model.load={hf_dir}", f"parallel.tp={tp}",
                             f"parallel.pp={pp}", "data.path=megatron_trace/data/assets/arith_test.jsonl",
                             "annotate.annotator=reference_match", f"loss.w0={W0}", f"loss.kl_clip={KL_CLIP}",
                             "loss.eps_low=0.2", "loss.eps_high=0.28", "optim.lr=0.01", "optim.clip_grad=100.0",
                             "optim.adam_eps=0.01",  # Adam step 1 is lr*g/(|g|+eps): keep it smooth in g
                             f"optim.micro_batch_size={mbs}", f"teacher.microbatches_per_pass={per_pass}",
                             "checkpoint.resume=none", f"loss.fused_output_layer={str(fused_output_layer).lower()}",
                             f"loss.check_values={str(check_values).lower()}",
                             f"logging.output_dir=/tmp/trace_step_{world_size}", "logging.tensorboard=false"])
    trainer = Trainer(cfg, start_rollout=False)
    metrics = trainer.update(_samples(), KL_WEIGHT)
    weights = {}
    for bucket in export_hf_buckets(trainer.model[0], trainer.hf_config, bucket_bytes=1 << 20):
        weights.update({n: t.numpy().copy() for n, t in bucket})  # numpy: torch tensors in a queue need the sender alive
    trainer.close()
    return {"metrics": metrics, "weights": weights}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # HF's default init with the head x20: larger logits than the default init, so the KL terms are far from zero;
    # a tokenizer that fits the 1000-row vocabulary (974 BPE entries + 26 specials).
    return make_tiny_qwen3_dir(str(tmp_path_factory.mktemp("trace_step") / "hf"), seed=0, tied=False,
                               vocab_size=VOCAB, hidden=64, intermediate=128, layers=2, max_positions=512,
                               tokenizer="truncated", init_std=None, lm_head_scale=20.0)


@pytest.fixture(scope="module")
def single(hf_dir):
    # All micro-batches' teacher logits at once (2 micro-batches).
    return run_distributed(_update, 1, hf_dir, 1, 1, 4, 0, init_gloo=False, timeout=300)[0]


@pytest.fixture(scope="module")
def tp2_pp2(hf_dir):
    # 3 micro-batches, teacher logits one micro-batch at a time (the DP all-reduce after the last group only).
    return run_distributed(_update, 4, hf_dir, 2, 2, 2, 1, init_gloo=False, timeout=400)[0]


@pytest.fixture(scope="module")
def tp2_pp2_fused(hf_dir):
    # loss.fused_output_layer: the output layer runs inside the loss for the student and the teacher's span rows
    # (its gradient formed in the forward pass, loss.fused_output_grad in_forward); loss.check_values on: the
    # per-step value checks pass on a valid batch.
    return run_distributed(_update, 4, hf_dir, 2, 2, 2, 1, True, True, init_gloo=False, timeout=400)[0]


def _reference_loss(hf_dir: str) -> dict:
    """The TRACE loss of docs/design.md ("The loss") in float64 on full-vocabulary logits from transformers' Qwen3.

    Old log-probs are recomputed under the same weights, so rho = 1 and l_PG(t) = -A (the clip is inactive).
    """
    from transformers import Qwen3ForCausalLM

    from megatron_trace.routes import Route

    model = Qwen3ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64).eval()
    samples = _samples()
    n_tokens = sum(len(s.response_ids) for s in samples)
    pg = kl = 0.0
    fkl_sum = rkl_sum = 0.0
    for s in samples:
        L, P = len(s.response_ids), len(s.prompt_ids)
        with torch.no_grad():
            logits = model(torch.tensor([s.prompt_ids + s.response_ids])).logits[0]
        logp = torch.log_softmax(logits[P - 1:P - 1 + L], dim=-1)
        routes = torch.tensor(s.routes)
        span = routes != Route.PG
        weight = torch.where(span, torch.tensor(1 - KL_WEIGHT / W0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        pg += float((weight * -s.advantage).sum())
        if span.any():
            Pt = len(s.teacher_prompt_ids)
            with torch.no_grad():
                t_logits = model(torch.tensor([s.teacher_prompt_ids + s.response_ids])).logits[0]
            logq = torch.log_softmax(t_logits[Pt - 1:Pt - 1 + L], dim=-1)
            p, q = logp.exp(), logq.exp()
            fkl = (q * (logq - logp)).clamp(max=KL_CLIP).sum(-1)
            rkl = (p * (logp - logq)).clamp(max=KL_CLIP).sum(-1)
            d = torch.where(routes == Route.FKL, fkl, rkl)[span]
            kl += float(d.sum()) / L
            fkl_sum += float(fkl[routes == Route.FKL].sum())
            rkl_sum += float(rkl[routes == Route.RKL].sum())
    return {"loss": pg / n_tokens + KL_WEIGHT * kl / len(samples), "kl_fkl_sum": fkl_sum, "kl_rkl_sum": rkl_sum}


def test_routed_loss_on_the_last_stage_equals_a_float64_recomputation(hf_dir, single, tp2_pp2):
    ref = _reference_loss(hf_dir)
    assert ref["kl_fkl_sum"] > 1e-3 and ref["kl_rkl_sum"] > 1e-3, "the batch must exercise both KL directions"
    for got in (single["metrics"], tp2_pp2["metrics"]):
        for key in ("loss", "kl_fkl_sum", "kl_rkl_sum"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    m = single["metrics"]
    assert m["fkl_tokens"] == 9 and m["rkl_tokens"] == 6 and m["tokens"] == sum(len(s.response_ids) for s in _samples())


def test_trace_step_at_tp2_pp2_equals_tp1(hf_dir, single, tp2_pp2):
    _assert_same_step(hf_dir, single, tp2_pp2)


def test_fused_output_layer_step_at_tp2_pp2_equals_the_materialised_tp1_step(hf_dir, single, tp2_pp2_fused):
    """The fused output layer (logits never stored) under TP on the last PP stage: same metrics and updated
    weights (the output layer's and every layer below it, through the hidden-state gradient's TP all-reduce)."""
    _assert_same_step(hf_dir, single, tp2_pp2_fused)


def _assert_same_step(hf_dir, a, b):
    import os

    from safetensors.torch import load_file

    for key in ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm"):
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-5, abs=1e-6), key
    assert a["weights"].keys() == b["weights"].keys()
    moved = 0.0
    for name, w in a["weights"].items():
        assert w.shape == b["weights"][name].shape, name
        torch.testing.assert_close(torch.from_numpy(b["weights"][name]), torch.from_numpy(w), rtol=1e-5, atol=1e-5,
                                   msg=name)
    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    for name, w in a["weights"].items():
        moved = max(moved, float((torch.from_numpy(w) - hf[name]).abs().max()))
    assert moved > 1e-3, "the step must actually move the weights (lr 0.01)"
