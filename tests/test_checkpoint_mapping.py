"""HF <-> Megatron mapping claims that need no model: fusion layouts, TP sharding rules, PP ranges, padding."""

import pytest
import torch

from megatron_trace.checkpoint.hf_mapping import (
    EMBEDDING,
    OUTPUT_LAYER,
    Qwen3Dims,
    canonical_megatron_name,
    check_parallel_layout,
    fuse_qkv,
    global_layer_index,
    hf_names_for,
    hf_param_shapes,
    iter_hf_tensors_from_megatron,
    layers_for_stage,
    local_layer_index,
    megatron_param_names,
    megatron_tensor_from_hf,
    merge_tp_shards,
    pad_vocab,
    shard_for_tp,
    split_qkv,
    unpad_vocab,
)

CFG = dict(model_type="qwen3", vocab_size=300, hidden_size=8, intermediate_size=12, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, head_dim=2, tie_word_embeddings=False)


def rows(*labels):
    """A [len(labels), 1] tensor whose single column is the row's label: layouts become readable."""
    return torch.tensor(labels, dtype=torch.float64).reshape(-1, 1)


def test_fused_qkv_puts_each_query_groups_q_heads_then_k_then_v():
    # 4 q heads, 2 groups, head_dim 1: group 0 owns q heads 0,1 and kv head 0.
    q, k, v = rows(10, 11, 12, 13), rows(20, 21), rows(30, 31)
    fused = fuse_qkv(q, k, v, num_query_groups=2, head_dim=1)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    q2, k2, v2 = split_qkv(fused, 2, 1)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_fused_qkv_with_head_dim_2_keeps_head_rows_together():
    q = rows(*range(100, 108))  # 4 heads x 2 dims
    k, v = rows(200, 201, 202, 203), rows(300, 301, 302, 303)
    fused = fuse_qkv(q, k, v, num_query_groups=2, head_dim=2).flatten().tolist()
    assert fused == [100, 101, 102, 103, 200, 201, 300, 301, 104, 105, 106, 107, 202, 203, 302, 303]


def test_tp_shard_of_fused_qkv_is_whole_query_groups():
    q, k, v = rows(10, 11, 12, 13), rows(20, 21), rows(30, 31)
    fused = fuse_qkv(q, k, v, 2, 1)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert shard_for_tp(name, fused, 0, 2).flatten().tolist() == [10, 11, 20, 30]
    assert shard_for_tp(name, fused, 1, 2).flatten().tolist() == [12, 13, 21, 31]


def test_tp_shard_of_fc1_is_gate_slice_then_up_slice():
    gate, up = rows(1, 2, 3, 4), rows(5, 6, 7, 8)
    fc1 = torch.cat([gate, up])
    name = "decoder.layers.3.mlp.linear_fc1.weight"
    assert shard_for_tp(name, fc1, 0, 2).flatten().tolist() == [1, 2, 5, 6]
    assert shard_for_tp(name, fc1, 1, 2).flatten().tolist() == [3, 4, 7, 8]


@pytest.mark.parametrize("name,shape,dim", [
    (EMBEDDING, (8, 3), 0),
    ("decoder.layers.1.self_attention.linear_proj.weight", (3, 8), 1),
    ("decoder.layers.1.mlp.linear_fc2.weight", (3, 8), 1),
])
def test_vocab_and_row_parallel_shards_are_plain_chunks(name, shape, dim):
    t = torch.randn(shape, dtype=torch.float64)
    for tp in (1, 2, 4):
        shards = [shard_for_tp(name, t, r, tp) for r in range(tp)]
        for r, s in enumerate(shards):
            assert torch.equal(s, t.narrow(dim, r * (shape[dim] // tp), shape[dim] // tp))
        assert torch.equal(merge_tp_shards(name, shards), t)


@pytest.mark.parametrize("suffix", ["input_layernorm.weight", "self_attention.q_layernorm.weight",
                                    "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.weight",
                                    "self_attention.linear_qkv.weight"])
def test_merge_tp_shards_inverts_shard_for_tp(suffix):
    name = f"decoder.layers.2.{suffix}"
    t = torch.randn(16, 3) if "linear" in suffix and "layer_norm" not in suffix else torch.randn(16)
    for tp in (1, 2, 4):
        assert torch.equal(merge_tp_shards(name, [shard_for_tp(name, t, r, tp) for r in range(tp)]), t)


def test_replicated_shards_that_disagree_are_rejected():
    name = "decoder.final_layernorm.weight"
    with pytest.raises(ValueError, match="differs across tensor-parallel ranks"):
        merge_tp_shards(name, [torch.zeros(4), torch.ones(4)])


def test_shard_for_tp_names_the_parameter_when_tp_does_not_divide():
    with pytest.raises(ValueError, match=r"embedding\.word_embeddings\.weight: rows 300 .* tensor parallel size 8"):
        shard_for_tp(EMBEDDING, torch.zeros(300, 2), 0, 8)


def test_te_pre_norm_names_alias_the_local_spec_names():
    assert canonical_megatron_name("decoder.layers.5.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.5.input_layernorm.weight"
    assert canonical_megatron_name("decoder.layers.5.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.5.pre_mlp_layernorm.weight"
    dims = Qwen3Dims.from_hf_config(CFG)
    assert hf_names_for("decoder.layers.3.mlp.linear_fc1.layer_norm_weight", dims) == \
        ["model.layers.3.post_attention_layernorm.weight"]


def test_pad_rows_are_zero_and_unpad_restores_the_vocab():
    w = torch.randn(300, 4)
    p = pad_vocab(w, 384)
    assert p.shape == (384, 4) and torch.equal(p[:300], w) and not p[300:].any()
    assert torch.equal(unpad_vocab(p, 300), w)
    with pytest.raises(ValueError, match="exceed the padded vocab"):
        pad_vocab(w, 256)


def test_pipeline_stages_split_layers_evenly_and_indices_round_trip():
    assert [list(layers_for_stage(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for g in range(8):
        stage, local = local_layer_index(g, 8, 4)
        assert global_layer_index(local, 8, 4, stage) == g
    with pytest.raises(ValueError, match="pipeline parallel size 3 does not divide num_hidden_layers=8"):
        layers_for_stage(8, 3, 0)


def test_parallel_layout_errors_name_each_field():
    dims = Qwen3Dims.from_hf_config(CFG)
    with pytest.raises(ValueError) as e:
        check_parallel_layout(dims, tp=4, pp=3, padded_vocab=300 + 2)
    msg = str(e.value)
    assert "num_key_value_heads (query groups)=2" in msg and "pipeline parallel size 3" in msg
    assert "intermediate_size=12" not in msg and "vocab size 302" in msg
    check_parallel_layout(dims, tp=2, pp=4, padded_vocab=384)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_megatron_to_hf_is_the_identity(tied):
    cfg = dict(CFG, tie_word_embeddings=tied)
    dims = Qwen3Dims.from_hf_config(cfg)
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for n, s in hf_param_shapes(dims).items()}
    assert ("lm_head.weight" in hf) == (not tied)
    megatron = [(n, megatron_tensor_from_hf(n, hf.__getitem__, dims, padded_vocab=384))
                for n in megatron_param_names(dims)]
    if tied:  # the last pipeline stage's copy of the embedding converts to nothing
        megatron.append((OUTPUT_LAYER, megatron[0][1]))
    back = dict(iter_hf_tensors_from_megatron(megatron, cfg))
    assert back.keys() == hf.keys()
    for n in hf:
        assert torch.equal(back[n], hf[n]), n


def test_iter_hf_tensors_rejects_a_tensor_that_does_not_match_the_config():
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.mlp\.linear_fc2\.weight: shape \(8, 10\)"):
        list(iter_hf_tensors_from_megatron([("decoder.layers.0.mlp.linear_fc2.weight", torch.zeros(8, 10))], CFG))


def test_reading_only_a_ranks_slice_of_hf_tensors_gives_that_ranks_shard(tmp_path):
    """megatron_shard_from_hf (sliced reads) == shard_for_tp of the full fused tensor, from a file and a dict."""
    from safetensors.torch import save_file

    from megatron_trace.checkpoint.hf_io import HFTensorSource
    from megatron_trace.checkpoint.hf_mapping import megatron_shard_from_hf

    cfg = dict(CFG, num_key_value_heads=4)  # 4 query groups: TP=4 still splits them
    dims = Qwen3Dims.from_hf_config(cfg)
    g = torch.Generator().manual_seed(1)
    hf = {n: torch.randn(s, generator=g) for n, s in hf_param_shapes(dims).items()}
    save_file(hf, str(tmp_path / "model.safetensors"))
    for source in (HFTensorSource(str(tmp_path)), HFTensorSource(hf)):
        for tp, padded in ((1, 384), (2, 512), (4, 512)):
            for name in megatron_param_names(dims):
                full = megatron_tensor_from_hf(name, hf.__getitem__, dims, padded)
                for r in range(tp):
                    got = megatron_shard_from_hf(name, source, dims, padded, r, tp)
                    assert torch.equal(got, shard_for_tp(name, full, r, tp)), (name, tp, r)
