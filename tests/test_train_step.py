"""One Megatron train step (DDP + megatron Adam, clipped) gives the same losses, gradient norms and updated
weights at TP=2 x PP=2 and at DP=2 x TP=2 x PP=2 as on a single process (TP=1, PP=1), for tied and untied
embeddings. All layouts start from the same HF-format weights (a fixed seed), loaded shard by shard.

The per-layout microbatch counts differ on purpose (2 on one process with 2 sequences each, 4 of 1 at DP=1,
2 of 1 per rank at DP=2): the loss is normalised once by the caller, so any extra averaging over microbatches or
data-parallel ranks would change the gradient norm.
"""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_distributed

pytestmark = pytest.mark.slow

SEQ, BATCH, VOCAB, STEPS = 16, 4, 1000, 2
# Adam made SGD-like by a large eps: the update is ~ LR * grad / ADAM_EPS, linear in the gradient, so a wrong
# gradient scale or a wrong element shows in the weights (plain Adam normalises both away; on near-zero
# gradients it also turns fp32 summation-order noise into lr-sized differences).
LR, ADAM_EPS = 1e-2, 1e-1
CONFIGS = ("tiny", "tiny-tied")


def _hf_config(name: str) -> dict:
    from megatron_trace.models import load_hf_config

    return dict(load_hf_config(name), vocab_size=VOCAB)


def _reference_hf_state(cfg: dict) -> dict:
    """Random HF Qwen3 weights, identical on every rank (fixed seed)."""
    from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, hf_param_shapes

    g = torch.Generator().manual_seed(1234)
    state = {}
    for name, shape in hf_param_shapes(Qwen3Dims.from_hf_config(cfg)).items():
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = 0.1 * torch.randn(shape, generator=g)
    return state


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[1, 11:] = 0  # right padding
    loss_mask[3, 6:] = 0
    loss_mask[:, -1] = 0  # no next token
    return dict(tokens=tokens, position_ids=torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
                labels=tokens.roll(-1, dims=1), loss_mask=loss_mask)


def _loss_fn(logits, mb):
    """Token-mean cross-entropy over the GLOBAL batch: each microbatch divides by the global token count."""
    from megatron.core import tensor_parallel

    ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), mb["labels"])
    loss = (ce * mb["loss_mask"]).sum() / mb["global_tokens"]
    return loss, {"loss": loss.item()}


def _fused_loss_fn(hidden, mb):
    """The same loss with the output layer fused into it (loss.fused_output_layer): the model returns hidden states
    and the output weight shard; logits are never materialised. No vocabulary-padding mask (vocab_size=None), as
    the reference scores the padded columns too."""
    from megatron.core import parallel_state as ps

    from megatron_trace.loss.fused_output import fused_output_token_stats
    from megatron_trace.train.output_layer import OUTPUT_WEIGHT

    weight = mb[OUTPUT_WEIGHT]
    stats = fused_output_token_stats(hidden.reshape(-1, hidden.shape[-1]), weight, mb["labels"].reshape(-1),
                                     vocab_start=ps.get_tensor_model_parallel_rank() * weight.shape[0],
                                     group=ps.get_tensor_model_parallel_group(), chunk_rows=5)
    loss = -(stats.logprob * mb["loss_mask"].reshape(-1)).sum() / mb["global_tokens"]
    return loss, {"loss": loss.item()}


def _global_params(model) -> dict:
    """This rank's parameters by Megatron name with the GLOBAL layer index, as numpy (pickled by value)."""
    params = {}
    for local_name, p in model.named_parameters():
        parts = local_name.split(".")
        if local_name.startswith("decoder.layers."):
            parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
        params[".".join(parts)] = p.detach().numpy().copy()
    return params


def _run_layout(name: str, tp: int, pp: int, micro_batch_size: int, recompute: str | None = None,
                fused_output_layer: bool = False) -> dict:
    from megatron_trace.checkpoint.hf_mapping import load_hf_state_into_model
    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models import qwen3_transformer_config
    from megatron_trace.train.output_layer import output_hidden_states
    from megatron_trace.train.step import build_model_and_optimizer, forward_backward, optimizer_step, zero_grad

    loss_fn, context = (_fused_loss_fn, output_hidden_states) if fused_output_layer else (_loss_fn, None)
    layout = initialize_distributed(tp=tp, pp=pp, seed=3)
    try:
        cfg = _hf_config(name)
        tcfg = qwen3_transformer_config(cfg, tp=tp, pp=pp, recompute=recompute)
        chunks, optimizer = build_model_and_optimizer(cfg, tcfg, lr=LR, adam_eps=ADAM_EPS, clip_grad=1.0)
        load_hf_state_into_model(chunks[0], _reference_hf_state(cfg), cfg)
        initial = _global_params(chunks[0].module)

        batch = _global_batch()
        global_tokens = batch["loss_mask"].sum()
        per_rank = BATCH // layout.dp
        mine = {k: v[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank] for k, v in batch.items()}
        microbatches = [dict({k: v[i:i + micro_batch_size] for k, v in mine.items()}, global_tokens=global_tokens)
                        for i in range(0, per_rank, micro_batch_size)]

        out = dict(layout=layout, losses=[], grad_norms=[], forward_only=None, initial_params=initial)
        for step in range(STEPS):
            zero_grad(chunks, optimizer)
            metrics = forward_backward(chunks, microbatches, loss_fn, seq_length=SEQ,
                                       micro_batch_size=micro_batch_size, model_context=context)
            ok, grad_norm, _ = optimizer_step(optimizer)
            assert ok
            out["losses"].append([m["loss"] for m in metrics])
            out["grad_norms"].append(grad_norm)
        # forward only: the losses of the updated model, no gradient
        zero_grad(chunks, optimizer)
        metrics = forward_backward(chunks, microbatches, loss_fn, seq_length=SEQ,
                                   micro_batch_size=micro_batch_size, forward_only=True, model_context=context)
        out["forward_only"] = [m["loss"] for m in metrics]
        out["grads_after_forward_only"] = max(float(p.main_grad.abs().max()) for p in chunks[0].parameters())

        out["params"] = _global_params(chunks[0].module)
        return out
    finally:
        destroy_distributed()


def _ranks(rank: int, world_size: int, layouts: list) -> dict:
    return {(name, tp, pp, *recompute): _run_layout(name, tp, pp, mbs, *recompute)
            for name, tp, pp, mbs, *recompute in layouts}


@pytest.fixture(scope="module")
def reference():
    """Single process, TP=1, PP=1: two microbatches of two sequences; and the same with activation recompute."""
    layouts = [(n, 1, 1, 2) for n in CONFIGS] + [("tiny", 1, 1, 2, "full"), ("tiny", 1, 1, 2, "selective")]
    return run_distributed(_ranks, 1, layouts, timeout=300)[0]


@pytest.fixture(scope="module")
def tp2_pp2():
    return run_distributed(_ranks, 4, [(n, 2, 2, 1) for n in CONFIGS], timeout=400)


@pytest.fixture(scope="module")
def dp2_tp2_pp2():
    return run_distributed(_ranks, 8, [(n, 2, 2, 1) for n in CONFIGS], timeout=500)


@pytest.fixture(scope="module")
def tp2_pp2_fused():
    return run_distributed(_ranks, 4, [(n, 2, 2, 1, None, True) for n in CONFIGS], timeout=400)


def _check_against_reference(results: list, reference: dict, dp: int, variant: tuple = ()) -> None:
    from megatron_trace.checkpoint.hf_mapping import EMBEDDING, OUTPUT_LAYER, merge_tp_shards

    for name in CONFIGS:
        ref = reference[(name, 1, 1)]
        runs = [r[(name, 2, 2, *variant)] for r in results]
        for run in runs:
            assert (run["layout"].tp, run["layout"].pp, run["layout"].dp) == (2, 2, dp)
        last = [run for run in runs if run["layout"].is_last_stage]
        # losses: the sum over all microbatches of all DP ranks (one TP rank each) is the global token-mean
        for step in range(STEPS):
            total = sum(sum(run["losses"][step]) for run in last if run["layout"].tp_rank == 0)
            assert total == pytest.approx(sum(ref["losses"][step]), abs=1e-5), (name, step)
            for run in runs:
                # megatron's fp32 norm (local_multi_tensor_l2_norm on CPU) is itself off the float64 norm by
                # ~5e-6 relative; a wrong gradient scale or a double-counted tied embedding is far larger
                assert run["grad_norms"][step] == pytest.approx(ref["grad_norms"][step], rel=3e-5), (name, step)
        assert sum(sum(run["forward_only"]) for run in last if run["layout"].tp_rank == 0) == pytest.approx(
            sum(ref["forward_only"]), abs=1e-5)
        assert all(run["forward_only"] == [] for run in runs if not run["layout"].is_last_stage)
        assert all(run["grads_after_forward_only"] == 0 for run in runs)
        assert ref["losses"][0] != ref["losses"][1]  # the first step did change the model

        # updated weights: full tensors merged from the TP shards of each stage, every DP replica separately
        for dp_rank in range(dp):
            merged = {}
            for pp_rank in range(2):
                shards = sorted((r for r in runs
                                 if (r["layout"].dp_rank, r["layout"].pp_rank) == (dp_rank, pp_rank)),
                                key=lambda r: r["layout"].tp_rank)
                for pname in shards[0]["params"]:
                    full = merge_tp_shards(pname, [torch.from_numpy(s["params"][pname]) for s in shards])
                    # a tied model's last stage holds a copy of the embedding as its output layer
                    key = EMBEDDING if (pname == OUTPUT_LAYER and OUTPUT_LAYER not in ref["params"]) else pname
                    merged.setdefault(key, []).append(full)
            assert set(merged) == set(ref["params"]), (name, set(merged) ^ set(ref["params"]))
            for pname, fulls in merged.items():
                expected = torch.from_numpy(ref["params"][pname])
                for full in fulls:
                    diff = (full - expected).abs().max().item()
                    assert diff < 1e-5, (name, dp_rank, pname, diff)


def test_reference_step_moves_the_weights_far_more_than_the_tolerance_and_clips(reference):
    for name in CONFIGS:
        ref = reference[(name, 1, 1)]
        assert ref["grad_norms"][0] > 1.0  # so clipping at 1.0 is exercised
        assert ref["losses"][1] < ref["losses"][0]
        moved = {n: float(abs(ref["params"][n] - ref["initial_params"][n]).max()) for n in ref["params"]}
        assert min(moved.values()) > 1e-4, moved


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_activation_recompute_changes_nothing_but_memory(reference, recompute):
    plain, again = reference[("tiny", 1, 1)], reference[("tiny", 1, 1, recompute)]
    assert sum(again["losses"], []) == pytest.approx(sum(plain["losses"], []), abs=1e-6)
    assert again["grad_norms"] == pytest.approx(plain["grad_norms"], rel=1e-6)
    for pname, value in plain["params"].items():
        assert abs(again["params"][pname] - value).max() < 1e-6, pname


def test_tp2_pp2_step_equals_single_process(tp2_pp2, reference):
    _check_against_reference(tp2_pp2, reference, dp=1)


def test_fused_output_layer_tp2_pp2_step_equals_single_process(tp2_pp2_fused, reference):
    """loss.fused_output_layer under TP on the last PP stage, tied and untied embeddings: the output layer computed
    inside the loss gives the same losses, gradient norms and updated weights as logits then cross-entropy."""
    _check_against_reference(tp2_pp2_fused, reference, dp=1, variant=(None, True))


def test_dp2_tp2_pp2_step_equals_single_process(dp2_tp2_pp2, reference):
    _check_against_reference(dp2_tp2_pp2, reference, dp=2)


def test_microbatch_shapes_are_fixed_under_a_pipeline_and_may_shrink_on_one_stage():
    from megatron_trace.train.step import _check_microbatches

    def mb(b, s):
        return dict(tokens=torch.zeros(b, s, dtype=torch.long), position_ids=torch.zeros(b, s, dtype=torch.long))

    # a pipeline: every micro-batch [micro_batch_size, seq_length] (stages exchange fixed-size activations)
    with pytest.raises(ValueError, match="microbatch 1: tokens has shape \\(1, 6\\).*pipeline"):
        _check_microbatches([mb(1, 8), mb(1, 6)], 8, 1, fixed=True)
    # one stage: shorter rows are fine, longer ones or another batch size are not
    _check_microbatches([mb(1, 8), mb(1, 6)], 8, 1, fixed=False)
    with pytest.raises(ValueError, match="microbatch 1: tokens has shape \\(1, 9\\)"):
        _check_microbatches([mb(1, 8), mb(1, 9)], 8, 1, fixed=False)
    with pytest.raises(ValueError, match="microbatch 0: tokens has shape \\(2, 8\\)"):
        _check_microbatches([mb(2, 8)], 8, 1, fixed=False)
    with pytest.raises(ValueError, match="position_ids has shape"):
        _check_microbatches([dict(tokens=torch.zeros(1, 8, dtype=torch.long),
                                  position_ids=torch.zeros(1, 6, dtype=torch.long))], 8, 1, fixed=False)
    with pytest.raises(KeyError, match="position_ids"):
        _check_microbatches([dict(tokens=torch.zeros(1, 8, dtype=torch.long))], 8, 1, fixed=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only limitation")
def test_distributed_optimizer_on_cpu_is_refused_with_the_reason():
    from megatron_trace.models import load_hf_config
    from megatron_trace.train.step import build_model_and_optimizer

    with pytest.raises(ValueError, match="use_distributed_optimizer=True needs CUDA"):
        build_model_and_optimizer(load_hf_config("tiny"), None, lr=1e-3, use_distributed_optimizer=True)
