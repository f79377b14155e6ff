"""Qwen3 dense models on Megatron-Core: HF config.json -> TransformerConfig -> GPTModel.

Qwen3 is a GPT with grouped-query attention, RMSNorm on queries and keys per head (qk_layernorm), SwiGLU MLPs
without biases, pre-RMSNorm residual blocks and rotary position embeddings (base `rope_theta`). The 0.6B-4B
checkpoints tie the output layer to the word embeddings; 8B-32B do not.

Layer spec: megatron's local spec (plain torch modules) on CPU or without Transformer Engine; the Transformer
Engine spec when TE is importable and CUDA is available.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SHIPPED_CONFIGS", "load_hf_config", "padded_vocab_size", "parallel_layout_problems",
           "qwen3_transformer_config", "build_qwen3_model", "qwen3_param_count", "unwrap_model"]

SHIPPED_CONFIGS = ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "tiny", "tiny-tied",
                   "tiny-bpe4k")

# HF config.json keys a Qwen3 model cannot be built without.
_REQUIRED_INT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "vocab_size", "max_position_embeddings")
_REQUIRED_FLOAT_KEYS = ("rms_norm_eps",)


def _rope_theta(hf_config: dict) -> float:
    """`rope_theta` sits at the top level of Qwen3's config.json; transformers>=5 also writes it inside
    `rope_parameters`."""
    if "rope_theta" in hf_config:
        return float(hf_config["rope_theta"])
    params = hf_config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    raise ValueError("Qwen3 config has no rope_theta (neither top-level nor in rope_parameters)")


def _validate_hf_config(cfg: dict, source: str) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: a config.json must hold a JSON object, got {type(cfg).__name__}")
    missing = [k for k in _REQUIRED_INT_KEYS + _REQUIRED_FLOAT_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{source}: Qwen3 config is missing required key(s): {', '.join(missing)}")
    for key in _REQUIRED_INT_KEYS:
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
    if not isinstance(cfg["rms_norm_eps"], (int, float)) or cfg["rms_norm_eps"] <= 0:
        raise ValueError(f"{source}: rms_norm_eps must be a positive number, got {cfg['rms_norm_eps']!r}")
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"{source}: head_dim must be a positive even integer (rotary pairs), got {head_dim!r}")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError(f"{source}: num_attention_heads ({cfg['num_attention_heads']}) is not a multiple of "
                         f"num_key_value_heads ({cfg['num_key_value_heads']})")
    if cfg.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"{source}: model_type is {cfg['model_type']!r}; only dense 'qwen3' is supported")
    if cfg.get("rope_scaling"):
        raise ValueError(f"{source}: rope_scaling={cfg['rope_scaling']!r} is not supported (plain rope only)")
    if cfg.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported")
    if cfg.get("attention_bias"):
        raise ValueError(f"{source}: attention_bias=true is not supported (Qwen3 has no attention biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={cfg['hidden_act']!r}; Qwen3's SwiGLU needs 'silu'")
    _rope_theta(cfg)
    return cfg


def load_hf_config(name_or_path: str) -> dict:
    """An HF Qwen3 config as a dict, from a shipped name (see SHIPPED_CONFIGS), a folder holding config.json,
    or a path to a .json file. Required keys are checked; `head_dim` is filled in when absent."""
    if name_or_path in SHIPPED_CONFIGS:
        text = resources.files("megatron_trace.models").joinpath("configs", f"{name_or_path}.json").read_text()
        source = f"shipped config {name_or_path!r}"
    else:
        path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{name_or_path!r} is neither a shipped config ({', '.join(SHIPPED_CONFIGS)}) nor a folder with "
                f"config.json nor a json file"
            )
        with open(path, encoding="utf-8") as f:
            text = f.read()
        source = path
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    cfg = _validate_hf_config(cfg, source)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("tie_word_embeddings", False)
    return cfg


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocabulary size padded up to a multiple of `multiple * tp`, as Megatron-LM pads it, so that every TP rank
    holds an equal, aligned slice. Rows past `vocab_size` are padding, never real tokens."""
    if vocab_size <= 0 or tp <= 0 or multiple <= 0:
        raise ValueError(f"vocab_size, tp and multiple must be positive, got {vocab_size}, {tp}, {multiple}")
    step = multiple * tp
    return -(-vocab_size // step) * step


def parallel_layout_problems(hf_config: dict, *, tp: int, pp: int) -> list[tuple[str, str]]:
    """What `tp` / `pp` do not divide in a Qwen3 config: (the parallel size's name, the message) pairs, e.g.
    ("tp", "num_attention_heads=32 is not divisible by tensor-parallel size tp=3"); [] when the layout fits."""
    out = []
    for field in ("num_attention_heads", "num_key_value_heads"):
        if hf_config[field] % tp:
            out.append(("tp", f"{field}={hf_config[field]} is not divisible by tensor-parallel size tp={tp}"))
    if hf_config["num_hidden_layers"] % pp:
        out.append(("pp", f"num_hidden_layers={hf_config['num_hidden_layers']} is not divisible by "
                          f"pipeline-parallel size pp={pp}"))
    return out


def qwen3_transformer_config(hf_config: dict, *, tp: int = 1, pp: int = 1, cp: int = 1,
                             params_dtype: torch.dtype = torch.float32, bf16: bool = False,
                             recompute: str | None = None, **overrides: Any):
    """Megatron `TransformerConfig` for a Qwen3 HF config at the given parallel sizes.

    recompute: None, "selective" (core attention only) or "full" (every layer, uniform, 1 layer per unit).
    overrides: any further TransformerConfig field (applied last; unknown names raise).
    On CPU (no CUDA) the model is fp32 with CPU initialisation and every fused kernel off.
    """
    from megatron.core.transformer import TransformerConfig

    cfg = _validate_hf_config(dict(hf_config), "hf_config")
    heads, kv_heads, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    for _, problem in parallel_layout_problems(cfg, tp=tp, pp=pp):
        raise ValueError(problem)
    if recompute not in (None, "selective", "full"):
        raise ValueError(f"recompute must be None, 'selective' or 'full', got {recompute!r}")

    on_gpu = torch.cuda.is_available()
    if bf16 and not on_gpu:
        raise ValueError("bf16=True needs CUDA; on CPU the model runs in fp32")
    if bf16:
        params_dtype = torch.bfloat16
    recompute_kwargs: dict[str, Any] = {}
    if recompute == "full":
        recompute_kwargs = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        recompute_kwargs = dict(recompute_granularity="selective")

    kwargs: dict[str, Any] = dict(
        num_layers=layers,
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=cfg.get("head_dim", cfg["hidden_size"] // heads),
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg["rms_norm_eps"]),
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        use_cpu_initialization=not on_gpu,
        **recompute_kwargs,
    )
    if not on_gpu:
        # The fused kernels are CUDA (or apex/TE) kernels; gradient_accumulation_fusion needs APEX/TE on CUDA.
        kwargs.update(bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
                      persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
                      cross_entropy_loss_fusion=False)
    field_names = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - field_names)
    if unknown:
        raise ValueError(f"unknown TransformerConfig field(s) in overrides: {', '.join(unknown)}")
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _layer_spec():
    """TE spec on CUDA with Transformer Engine, else megatron's local (plain torch) spec."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if torch.cuda.is_available():
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            pass
        else:
            return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    return get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")


def build_qwen3_model(hf_config: dict, *, config=None, pre_process: bool | None = None,
                      post_process: bool | None = None, vocab_multiple: int = 128):
    """A Megatron `GPTModel` holding this rank's part of a Qwen3 (its TP shard of its PP stage's layers).

    config: a TransformerConfig (default: qwen3_transformer_config at the parallel sizes of parallel_state).
    pre_process / post_process: whether this chunk owns the embedding / the final norm and output layer
    (default: first / last pipeline stage). The vocabulary is padded to `padded_vocab_size(vocab, tp,
    vocab_multiple)`; output logits are `[b, s, padded_vocab / tp]` when called with labels=None.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    cfg = _validate_hf_config(dict(hf_config), "hf_config")
    if config is None:
        config = qwen3_transformer_config(
            cfg, tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
            cp=ps.get_context_parallel_world_size())
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    return GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(),
        vocab_size=padded_vocab_size(cfg["vocab_size"], config.tensor_model_parallel_size, vocab_multiple),
        max_sequence_length=cfg["max_position_embeddings"],
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=_rope_theta(cfg),
    )


def unwrap_model(model):
    """The GPTModel inside its training wrappers (DDP, Float16Module), or `model` itself if unwrapped."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def qwen3_param_count(hf_config: dict, *, padded_vocab: int | None = None) -> dict[str, int]:
    """Parameter counts of a Qwen3 from its config (no model built): {"embedding", "non_embedding", "total"}.

    embedding = word embeddings (+ the output layer when untied); non_embedding = decoder layers + final norm.
    """
    cfg = _validate_hf_config(dict(hf_config), "hf_config")
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim", h // heads)
    attention = h * heads * d + 2 * h * kv * d + heads * d * h + 2 * d  # q, k, v, o projections; q/k norms
    mlp = 3 * h * cfg["intermediate_size"]  # gate, up, down
    layer = attention + mlp + 2 * h  # + input and pre-MLP RMSNorm
    vocab = padded_vocab or cfg["vocab_size"]
    embedding = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    non_embedding = cfg["num_hidden_layers"] * layer + h  # + final RMSNorm
    return {"embedding": embedding, "non_embedding": non_embedding, "total": embedding + non_embedding}
