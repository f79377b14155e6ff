"""hf_mapping.write_shard_into_hf: every TP rank writing its own shard into the full HF tensors gives exactly the
HF tensors of the merged parameter (iter_hf_tensors_from_megatron), for every parameter, tied and untied, at
TP = 1, 2, 4, with megatron's vocabulary padding; and the shards' bytes land once."""

from __future__ import annotations

import pytest
import torch

from megatron_trace.checkpoint.hf_mapping import (Qwen3Dims, hf_names_for, hf_param_shapes, iter_hf_tensors_from_megatron,
                                                  megatron_param_names, megatron_param_shape, shard_for_tp,
                                                  write_shard_into_hf)
from megatron_trace.models import load_hf_config


@pytest.mark.parametrize("model", ["tiny", "tiny-tied"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ranks_writing_their_shards_build_the_merged_hf_tensors(model, tp):
    cfg = dict(load_hf_config(model))
    cfg.update(num_attention_heads=8, num_key_value_heads=4, vocab_size=1000)  # 4 groups: split at TP=4 too
    cfg.update(hidden_size=64, intermediate_size=128, head_dim=16)
    dims = Qwen3Dims.from_hf_config(cfg)
    padded = 1024  # megatron pads the vocabulary to a multiple of 128 x tp
    gen = torch.Generator().manual_seed(0)
    shapes = hf_param_shapes(dims)
    for mname in megatron_param_names(dims):
        full = torch.randn(megatron_param_shape(mname, dims, padded), generator=gen)
        expected = dict(iter_hf_tensors_from_megatron([(mname, full)], cfg))
        hf = {n: torch.full(shapes[n], float("nan")) for n in hf_names_for(mname, dims) if n in expected}
        written = sum(write_shard_into_hf(mname, shard_for_tp(mname, full, r, tp), dims, r, tp, hf)
                      for r in range(tp))
        assert hf.keys() == expected.keys(), mname
        for n, t in expected.items():
            assert torch.equal(hf[n], t), (mname, n)  # every element written, none left NaN
        assert written == sum(t.numel() * t.element_size() for t in expected.values()), mname


def test_names_missing_from_the_destination_are_skipped():
    """A parameter split over two buckets (q in one, k and v in the next) is written bucket by bucket."""
    cfg = dict(load_hf_config("tiny"))
    dims = Qwen3Dims.from_hf_config(cfg)
    mname = "decoder.layers.0.self_attention.linear_qkv.weight"
    full = torch.randn(megatron_param_shape(mname, dims, 1))
    expected = dict(iter_hf_tensors_from_megatron([(mname, full)], cfg))
    q_name, k_name, v_name = hf_names_for(mname, dims)
    first = {q_name: torch.full_like(expected[q_name], float("nan"))}
    second = {n: torch.full_like(expected[n], float("nan")) for n in (k_name, v_name)}
    for r in range(2):
        shard = shard_for_tp(mname, full, r, 2)
        write_shard_into_hf(mname, shard, dims, r, 2, first)
        write_shard_into_hf(mname, shard, dims, r, 2, second)
    for part in (first, second):
        for n, t in part.items():
            assert torch.equal(t, expected[n]), n
