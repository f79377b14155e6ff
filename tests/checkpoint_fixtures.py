"""Tiny random Qwen3 HF folders for the checkpoint tests: any vocab size (no tokenizer coverage needed), fp32,
seeded, weights spread wide enough that logits are far from uniform (a wrong mapping changes them visibly)."""

from __future__ import annotations

import os
import shutil

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rope_theta=1_000_000.0,
            rms_norm_eps=1e-6)


def make_hf_dir(path: str, *, seed: int, tied: bool, vocab_size: int, max_shard_size: str | None = None,
                with_tokenizer: bool = False, dtype: str = "float32", **overrides) -> str:
    """Write a random `Qwen3ForCausalLM` (fp32 unless `dtype`) to `path` (sharded with an index json when
    `max_shard_size`; with the Qwen3 tokenizer files when `with_tokenizer`)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, tie_word_embeddings=tied, **{**TINY, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(torch.float32).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, dtype))
    if os.path.exists(path):
        shutil.rmtree(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    if with_tokenizer:
        from megatron_trace.data.tokenizer import qwen3_tokenizer_dir

        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(qwen3_tokenizer_dir(), name), os.path.join(path, name))
    return path


def hf_logits(path: str, tokens):
    """Reference logits [b, s, vocab] from transformers' own Qwen3 reading the folder (fp32)."""
    import torch
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits
