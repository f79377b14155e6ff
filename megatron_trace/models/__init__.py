"""Qwen3 on Megatron-Core: HF config -> TransformerConfig -> GPTModel (local spec on CPU, TE spec on GPU)."""

from megatron_trace.models.qwen3 import (
    SHIPPED_CONFIGS,
    build_qwen3_model,
    load_hf_config,
    padded_vocab_size,
    qwen3_param_count,
    qwen3_transformer_config,
    unwrap_model,
)

__all__ = ["SHIPPED_CONFIGS", "build_qwen3_model", "load_hf_config", "padded_vocab_size", "qwen3_param_count",
           "qwen3_transformer_config", "unwrap_model"]
