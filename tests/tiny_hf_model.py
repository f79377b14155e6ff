"""The one builder of tiny random Qwen3 Hugging Face folders used by the tests, and transformers references of them.

A folder is what a user would point the product at (config.json + safetensors + tokenizer files), so vLLM,
transformers and the checkpoint converter all load it the ordinary way. Weights are random but seeded: the same
arguments always write the same tensors, different seeds give different models.
"""

from __future__ import annotations

import os
import shutil

# vLLM's CPU attention needs head_dim >= 32 (and a multiple of 16 from 32 up): 16 fails at the first generate.
_MIN_HEAD_DIM = 32

# The checkpoint tests' models: 4 layers (two per stage at PP=2), any vocabulary size (no tokenizer), all matrices
# at std 0.08 so a wrong mapping changes the logits visibly.
CHECKPOINT_MODEL = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=32, max_positions=256,
                        init_std=(0.08, 0.08), tokenizer=None)


def make_tiny_qwen3_dir(
    path: str,
    *,
    seed: int,
    tied: bool,
    vocab_size: int = 151936,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    intermediate: int = 256,
    max_positions: int = 4096,
    tokenizer: str | None = "qwen3",
    init_std: tuple[float, float] | None = (0.08, 0.06),
    lm_head_scale: float = 1.0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
) -> str:
    """Write a random `Qwen3ForCausalLM` into `path`; returns `path`. Everything is written into a temporary
    sibling folder that is renamed when complete.

    tied: share the input embedding with the output head (`tie_word_embeddings`, as Qwen3 <= 4B does).
    vocab_size: model vocabulary rows (151,936 = Qwen3's padded vocabulary; must cover the tokenizer's 151,669
        with tokenizer="qwen3").
    tokenizer: "qwen3" = every file of the real Qwen3 tokenizer (and its special-token ids in the config);
        "truncated" = the Qwen3 BPE cut to fit `vocab_size` (vocab_size - 26 entries + 26 specials);
        "files" = the Qwen3 tokenizer.json / tokenizer_config.json copied as they are (files that must travel
        through a conversion; the vocabulary need not fit); None = no tokenizer.
    init_std: (embedding and head, other matrices) std, with norm weights at 1 + 0.1 N(0, 1). HF's default init
        (std 0.02) makes near-uniform logits; a larger spread gives peaked distributions, so greedy decoding is
        well separated from ties and a wrong mapping changes the logits visibly. None = HF's default init.
    lm_head_scale: the output head is multiplied by this (larger logits: KL terms far from zero).
    dtype: the saved weights' dtype; max_shard_size: shard the safetensors (with an index json) at this size.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_trace.data.tokenizer import load_tokenizer, qwen3_tokenizer_dir, truncate_qwen3_tokenizer

    if head_dim < _MIN_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim}: vLLM's CPU attention supports head_dim >= {_MIN_HEAD_DIM}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    if tokenizer not in ("qwen3", "truncated", "files", None):
        raise ValueError(f"tokenizer={tokenizer!r} is not one of qwen3, truncated, files, None")
    tok_dir = qwen3_tokenizer_dir()
    special_ids = {}
    if tokenizer == "qwen3":
        tok = load_tokenizer(tok_dir)
        if vocab_size < len(tok):
            raise ValueError(f"vocab_size={vocab_size} is smaller than the Qwen3 tokenizer's {len(tok)} tokens")
        special_ids = dict(bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        torch_dtype=dtype,
        **special_ids,
    )
    # The seed fixes every tensor: init is done under a private generator state so callers' RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(torch.float32).eval()
        with torch.no_grad():
            if init_std is not None:
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.copy_(1.0 + 0.1 * torch.randn_like(p))
                    elif p.dim() >= 2:
                        p.normal_(0.0, init_std[0] if "embed" in name or "lm_head" in name else init_std[1])
            if lm_head_scale != 1.0:
                model.lm_head.weight.mul_(lm_head_scale)
    model = model.to(getattr(torch, dtype))

    path = os.path.abspath(path)
    tmp = path + ".tmp-writing"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp, safe_serialization=True, **shards)
    if tokenizer == "qwen3":
        for name in os.listdir(tok_dir):
            shutil.copy(os.path.join(tok_dir, name), os.path.join(tmp, name))
    elif tokenizer == "files":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tok_dir, name), os.path.join(tmp, name))
    elif tokenizer == "truncated":
        truncate_qwen3_tokenizer(tmp, vocab_size - 26)  # + 26 special tokens = vocab_size ids
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- transformers references for generation tests


def hf_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    """Exactly `n_new` greedy tokens from a transformers model after `prompt`."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_logprobs(model, prompt: list[int], response: list[int]):
    """Teacher-forced log p(response_t | prefix) from a full-vocab float64 log_softmax: [len(response)], nats."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def load_hf_model(model_dir: str, dtype=None):
    """transformers' own Qwen3 reading `model_dir` (fp32 unless `dtype`), in eval mode: the reference."""
    import torch
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32).eval()


def hf_logits(path: str, tokens):
    """Reference logits [b, s, vocab] from transformers' own Qwen3 reading the folder (fp32)."""
    import torch

    with torch.no_grad():
        return load_hf_model(path)(input_ids=tokens).logits
