"""Qwen3 on Megatron-Core: shipped configs carry the public values, Megatron's model has exactly the public
parameter counts, and its logits equal transformers' Qwen3 given the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from dist_harness import run_distributed
from megatron_trace.models import (
    SHIPPED_CONFIGS,
    load_hf_config,
    padded_vocab_size,
    qwen3_param_count,
    qwen3_transformer_config,
)

# Public Qwen3 config.json values: hidden, intermediate, layers, heads, kv heads, tied embeddings.
PUBLIC = {
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, True),
    "qwen3-4b": (2560, 9728, 36, 32, 8, True),
    "qwen3-8b": (4096, 12288, 36, 32, 8, False),
    "qwen3-14b": (5120, 17408, 40, 40, 8, False),
    "qwen3-32b": (5120, 25600, 64, 64, 8, False),
}
# The Qwen3 model cards: "Number of Parameters" and "(Non-Embedding)", in billions, as printed.
MODEL_CARD_BILLIONS = {
    "qwen3-0.6b": ("0.6", "0.44"), "qwen3-1.7b": ("1.7", "1.4"), "qwen3-4b": ("4.0", "3.6"),
    "qwen3-8b": ("8.2", "6.95"), "qwen3-14b": ("14.8", "13.2"), "qwen3-32b": ("32.8", "31.2"),
}


def _hand_count(name: str) -> int:
    """Worked by hand from the architecture, independently of qwen3_param_count."""
    h, ffn, layers, heads, kv, tied = PUBLIC[name]
    d, vocab = 128, 151936
    per_layer = (h * heads * d) + 2 * (h * kv * d) + (heads * d * h) + 2 * d + 3 * h * ffn + 2 * h
    return layers * per_layer + h + vocab * h * (1 if tied else 2)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_shipped_configs_carry_the_public_qwen3_values(name):
    cfg = load_hf_config(name)
    h, ffn, layers, heads, kv, tied = PUBLIC[name]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (h, ffn, layers, heads, kv, tied)
    assert (cfg["head_dim"], cfg["rope_theta"], cfg["rms_norm_eps"], cfg["vocab_size"],
            cfg["max_position_embeddings"]) == (128, 1_000_000, 1e-6, 151936, 40960)


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_tiny_configs_fit_the_real_tokenizer_and_vllm_cpu_attention(name):
    cfg = load_hf_config(name)
    assert cfg["vocab_size"] == 151936 and cfg["head_dim"] >= 32
    assert cfg["tie_word_embeddings"] is (name == "tiny-tied")


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_param_count_formula_matches_the_hand_count_and_the_model_card(name):
    counts = qwen3_param_count(load_hf_config(name))
    assert counts["total"] == _hand_count(name)
    total, non_embedding = MODEL_CARD_BILLIONS[name]
    decimals = len(total.split(".")[1])
    assert f"{counts['total'] / 1e9:.{decimals}f}" == total
    decimals = len(non_embedding.split(".")[1])
    assert f"{counts['non_embedding'] / 1e9:.{decimals}f}" == non_embedding


def test_exact_public_counts_of_0p6b_and_8b():
    assert qwen3_param_count(load_hf_config("qwen3-0.6b"))["total"] == 596_049_920
    assert qwen3_param_count(load_hf_config("qwen3-8b"))["total"] == 8_190_735_360


def test_load_hf_config_reads_a_folder_or_a_json_file(tmp_path):
    cfg = dict(load_hf_config("tiny"), hidden_size=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_hf_config(str(tmp_path))["hidden_size"] == 256
    assert load_hf_config(str(tmp_path / "config.json"))["hidden_size"] == 256


def test_load_hf_config_errors_name_the_cause(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a shipped config"):
        load_hf_config("qwen3-7b")
    cfg = load_hf_config("tiny")
    del cfg["num_key_value_heads"]
    (tmp_path / "a.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing required key.*num_key_value_heads"):
        load_hf_config(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text(json.dumps(dict(load_hf_config("tiny"), hidden_size=-1)))
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        load_hf_config(str(tmp_path / "b.json"))
    (tmp_path / "c.json").write_text(json.dumps(dict(load_hf_config("tiny"), rope_scaling={"type": "yarn"})))
    with pytest.raises(ValueError, match="rope_scaling"):
        load_hf_config(str(tmp_path / "c.json"))
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf_config(str(tmp_path / "d.json"))


def test_padded_vocab_is_the_next_multiple_of_128_times_tp():
    assert padded_vocab_size(151936, 1) == 151936  # 1187 * 128
    assert padded_vocab_size(151936, 2) == 152064  # 594 * 256
    assert padded_vocab_size(151936, 8) == 152576  # 149 * 1024
    assert padded_vocab_size(1000, 1) == padded_vocab_size(1000, 2) == 1024
    with pytest.raises(ValueError):
        padded_vocab_size(100, 0)


def test_transformer_config_is_qwen3_shaped():
    tcfg = qwen3_transformer_config(load_hf_config("qwen3-8b"), tp=8, pp=4)
    assert (tcfg.num_layers, tcfg.hidden_size, tcfg.ffn_hidden_size) == (36, 4096, 12288)
    assert (tcfg.num_attention_heads, tcfg.num_query_groups, tcfg.kv_channels) == (32, 8, 128)
    assert tcfg.qk_layernorm and tcfg.gated_linear_unit and not tcfg.add_bias_linear and not tcfg.add_qkv_bias
    assert tcfg.normalization == "RMSNorm" and tcfg.layernorm_epsilon == 1e-6
    assert tcfg.activation_func is torch.nn.functional.silu
    assert (tcfg.tensor_model_parallel_size, tcfg.pipeline_model_parallel_size) == (8, 4)
    if not torch.cuda.is_available():
        assert tcfg.use_cpu_initialization and tcfg.params_dtype == torch.float32
        assert not (tcfg.bias_activation_fusion or tcfg.masked_softmax_fusion or tcfg.apply_rope_fusion
                    or tcfg.gradient_accumulation_fusion or tcfg.persist_layer_norm)
    full = qwen3_transformer_config(load_hf_config("tiny"), recompute="full")
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)


def test_transformer_config_errors_name_the_field():
    cfg = load_hf_config("qwen3-8b")  # 32 heads, 8 kv heads, 36 layers
    with pytest.raises(ValueError, match="num_attention_heads=32 is not divisible by .* tp=3"):
        qwen3_transformer_config(cfg, tp=3)
    with pytest.raises(ValueError, match="num_key_value_heads=8 is not divisible by .* tp=16"):
        qwen3_transformer_config(cfg, tp=16)
    with pytest.raises(ValueError, match="num_hidden_layers=36 is not divisible by .* pp=5"):
        qwen3_transformer_config(cfg, pp=5)
    with pytest.raises(ValueError, match="recompute"):
        qwen3_transformer_config(cfg, recompute="some")
    with pytest.raises(ValueError, match="unknown TransformerConfig field.*no_such_knob"):
        qwen3_transformer_config(cfg, no_such_knob=1)


# --- built models (one single-process launch) -------------------------------------------------------------------

def _hf_to_megatron_tp1(hf_state: dict, cfg: dict, padded_vocab: int) -> dict:
    """Transformers Qwen3 weights renamed/laid out as Megatron's TP=1 GPTModel (local spec), written here from
    the two layouts' definitions: fused QKV is grouped per query group [q_g, k_g, v_g]; fc1 is [gate; up]."""
    heads, kv, d, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["hidden_size"]

    def pad(w):
        return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], w.shape[1])])

    out = {"embedding.word_embeddings.weight": pad(hf_state["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": hf_state["model.norm.weight"]}
    if not cfg["tie_word_embeddings"]:
        out["output_layer.weight"] = pad(hf_state["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = hf_state[src + "self_attn.q_proj.weight"].view(kv, heads // kv * d, h)
        k = hf_state[src + "self_attn.k_proj.weight"].view(kv, d, h)
        v = hf_state[src + "self_attn.v_proj.weight"].view(kv, d, h)
        out[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, h)
        out[dst + "self_attention.linear_proj.weight"] = hf_state[src + "self_attn.o_proj.weight"]
        out[dst + "self_attention.q_layernorm.weight"] = hf_state[src + "self_attn.q_norm.weight"]
        out[dst + "self_attention.k_layernorm.weight"] = hf_state[src + "self_attn.k_norm.weight"]
        out[dst + "input_layernorm.weight"] = hf_state[src + "input_layernorm.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf_state[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([hf_state[src + "mlp.gate_proj.weight"],
                                                        hf_state[src + "mlp.up_proj.weight"]])
        out[dst + "mlp.linear_fc2.weight"] = hf_state[src + "mlp.down_proj.weight"]
    return out


def _models(rank: int, world_size: int) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models import build_qwen3_model

    initialize_distributed(seed=5)
    out: dict = {"counts": {}, "logits": {}}
    for name in sorted(PUBLIC):  # parameters on the meta device: shapes only, nothing allocated
        cfg = load_hf_config(name)
        tcfg = qwen3_transformer_config(cfg, perform_initialization=False)
        with torch.device("meta"):
            model = build_qwen3_model(cfg, config=tcfg)
        out["counts"][name] = sum(p.numel() for p in model.parameters())
    for name in ("tiny", "tiny-tied"):
        cfg = dict(load_hf_config(name), vocab_size=1000, bos_token_id=None, eos_token_id=None)
        torch.manual_seed(0)
        hf = Qwen3ForCausalLM(Qwen3Config(**cfg)).double().eval()
        with torch.no_grad():  # non-trivial norms, so that a misplaced norm weight shows
            for n, p in hf.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
        model = build_qwen3_model(cfg).eval()
        state = _hf_to_megatron_tp1({k: v.float() for k, v in hf.state_dict().items()}, cfg, 1024)
        params = dict(model.named_parameters())
        assert set(state) == set(params), (sorted(set(state) ^ set(params)))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])
        tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = model(input_ids=tokens, position_ids=torch.arange(24).expand(2, 24), attention_mask=None)
            ref = hf(input_ids=tokens).logits
        out["logits"][name] = (tuple(ours.shape), (ours[..., :1000].double() - ref).abs().max().item(),
                               ref.abs().max().item())
    destroy_distributed()
    return out


@pytest.fixture(scope="module")
def built():
    return run_distributed(_models, 1, timeout=300)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_megatron_model_has_exactly_the_hand_counted_parameters(built, name):
    assert built["counts"][name] == _hand_count(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_megatron_logits_equal_transformers_qwen3_with_the_same_weights(built, name):
    shape, max_diff, scale = built["logits"][name]
    assert shape == (2, 24, 1024)  # [b, s, padded vocab]
    assert scale > 0.1 and max_diff < 1e-4 * scale, (max_diff, scale)
