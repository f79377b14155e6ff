"""A converted Qwen3 gives transformers' logits at every TP/PP layout, tied and untied, by both loading paths.

Reference: transformers' `Qwen3ForCausalLM` reading the HF folder (fp32). Under test: megatron `GPTModel` from
`build_qwen3_model`, filled (a) by `load_hf_state_into_model` from the HF folder / an in-memory state dict and
(b) by `dist_checkpointing.load(model.sharded_state_dict(), dir)` of the converter's output. All layouts run in
ONE 4-process launch: TP=1, TP=2, PP=2 and TP=2 x PP=2 (the remaining ranks are data-parallel replicas).
The untied model's vocab (300) is not a multiple of 128, so pad rows are exercised (384 at TP=1, 512 at TP=2).
"""

import os

import pytest
import torch

from tiny_hf_model import CHECKPOINT_MODEL, hf_logits, make_tiny_qwen3_dir
from dist_harness import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
MODELS = {"untied": dict(tied=False, vocab_size=300, seed=1, max_shard_size="150KB"),
          "tied": dict(tied=True, vocab_size=256, seed=2)}
TOLERANCE = 1e-4


def _forward_logits(model, tokens):
    """Full-vocab logits [b, s, padded_vocab] on the last pipeline stage (None elsewhere), via megatron's schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    collected = []

    def step(_data, m):
        output = m(tokens, positions, None)

        def keep(out):
            collected.append(out.detach())
            return out.sum() * 0.0, {}

        return output, keep

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                    num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    local = collected[0]  # [b, s, padded_vocab / tp]
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _parity_worker(rank, world_size, cases, tokens):
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file

    from megatron_trace.checkpoint.convert import ConversionError, load_converted_checkpoint
    from megatron_trace.checkpoint.hf_mapping import load_hf_state_into_model
    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models.qwen3 import build_qwen3_model, load_hf_config

    results = {}
    for tp, pp in LAYOUTS:
        initialize_distributed(tp=tp, pp=pp, seed=123)
        for name, case in cases.items():
            hf_config = load_hf_config(case["hf_dir"])
            vocab = hf_config["vocab_size"]
            ref = case["ref"]

            def record(path, model):
                logits = _forward_logits(model, tokens)
                if logits is not None:
                    results[(name, tp, pp, path)] = dict(
                        max_diff=(logits[..., :vocab] - ref).abs().max().item(),
                        pad_max=logits[..., vocab:].abs().max().item() if logits.shape[-1] > vocab else 0.0,
                        padded=logits.shape[-1])

            # (a) straight from HF: the folder, and an in-memory state dict for the tied model.
            model = build_qwen3_model(hf_config)
            hf_source = case["hf_dir"] if name == "untied" else _load_all(load_file, case["hf_dir"])
            load_hf_state_into_model(model, hf_source, hf_config)
            record("hf", model)
            # (b) the converter's distributed checkpoint, converted for this TP, loaded the plain megatron way.
            model = build_qwen3_model(hf_config)
            ckpt = case["megatron_dirs"][tp]
            state = dist_checkpointing.load(model.sharded_state_dict(), ckpt)
            state.pop("content_metadata")
            model.load_state_dict(state, strict=True)
            record("dist_checkpoint", model)
            # A checkpoint converted for another TP has another padded vocab: the checked loader says so.
            if name == "untied" and tp == 2 and pp == 1:
                try:
                    load_converted_checkpoint(build_qwen3_model(hf_config), case["megatron_dirs"][1])
                except ConversionError as e:
                    results["wrong_tp_error"] = str(e)
        destroy_distributed()
    return results


def _load_all(load_file, hf_dir):
    return load_file(os.path.join(hf_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def parity_cases(tmp_path_factory):
    from megatron_trace.checkpoint.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("parity")
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    cases = {}
    for name, spec in MODELS.items():
        hf_dir = make_tiny_qwen3_dir(str(root / f"hf-{name}"), **spec, **CHECKPOINT_MODEL)
        dirs = {tp: str(root / f"megatron-{name}-tp{tp}") for tp in (1, 2)}
        for tp, out in dirs.items():
            convert_hf_to_megatron(hf_dir, out, tp=tp, pp=2)
        cases[name] = dict(hf_dir=hf_dir, megatron_dirs=dirs, ref=hf_logits(hf_dir, tokens))
    assert os.path.exists(os.path.join(cases["untied"]["hf_dir"], "model.safetensors.index.json"))
    return cases, tokens


def test_converted_qwen3_matches_transformers_logits_at_every_layout(parity_cases):
    cases, tokens = parity_cases
    per_rank = run_distributed(_parity_worker, 4, cases, tokens, timeout=600)
    merged = {}
    for r in per_rank:
        for key, value in r.items():
            merged.setdefault(key, []).append(value)
    expected = {(n, tp, pp, path) for n in MODELS for tp, pp in LAYOUTS for path in ("hf", "dist_checkpoint")}
    assert expected <= set(merged), f"cases without a last-stage result: {expected - set(merged)}"
    for key in sorted(expected):
        for res in merged[key]:
            assert res["max_diff"] < TOLERANCE, (key, res)
            assert res["pad_max"] == 0.0, (key, res)  # pad rows are zero: their logits are exactly 0
    assert merged[("untied", 1, 1, "hf")][0]["padded"] == 384
    assert merged[("untied", 2, 1, "hf")][0]["padded"] == 512
    # the reference itself is far from trivial: a wrong mapping would not hide under the tolerance
    assert cases["untied"]["ref"].std() > 0.1
    assert any("re-convert with --tp 2" in e for e in merged["wrong_tp_error"])
