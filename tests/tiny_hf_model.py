"""A tiny random Qwen3 saved as a Hugging Face folder, with the real Qwen3 tokenizer files: a shared test fixture.

The folder is what a user would point the product at (config.json + model.safetensors + tokenizer files), so
vLLM, transformers and the checkpoint converter all load it the ordinary way. Weights are fp32 and random but
seeded: the same `seed` always writes the same tensors, different seeds give different models.
"""

from __future__ import annotations

import os
import shutil

# vLLM's CPU attention needs head_dim >= 32 (and a multiple of 16 from 32 up): 16 fails at the first generate.
_MIN_HEAD_DIM = 32


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
) -> str:
    """Write a random fp32 `Qwen3ForCausalLM` (config, safetensors weights, Qwen3 tokenizer files) into `path`.

    tied: share the input embedding with the output head (`tie_word_embeddings`, as Qwen3 <= 4B does).
    vocab_size: model vocabulary rows (151,936 = Qwen3's padded vocabulary; must cover the tokenizer's 151,669).
    Returns `path`. Everything is written into a temporary sibling folder that is renamed when complete.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_trace.data.tokenizer import load_tokenizer, qwen3_tokenizer_dir

    if head_dim < _MIN_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim}: vLLM's CPU attention supports head_dim >= {_MIN_HEAD_DIM}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    tok_dir = qwen3_tokenizer_dir()
    n_tok = len(load_tokenizer(tok_dir))
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the Qwen3 tokenizer's {n_tok} tokens")

    tok = load_tokenizer(tok_dir)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        torch_dtype="float32",
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # The seed fixes every tensor: init is done under a private generator state so callers' RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(torch.float32).eval()
        # HF's default init (std 0.02) makes near-uniform logits; a larger spread gives peaked distributions,
        # so greedy decoding is well separated from ties and tests are sensitive to wrong weights.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif p.dim() >= 2:
                    p.normal_(0.0, 0.08 if "embed" in name or "lm_head" in name else 0.06)

    path = os.path.abspath(path)
    tmp = path + ".tmp-writing"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(tmp, name))
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
