"""How a packed micro-batch (several sequences back to back in one row, see train/batching.py) goes through the
GPTModel so that each sequence sees only itself, at its own positions.

Two paths, chosen by the attention the model was built with:
- Transformer Engine attention (GPU): megatron's THD path. `PackedSeqParams(qkv_format="thd", cu_seqlens)`
  goes to the model; TE's flash/cuDNN attention confines attention to each sequence and megatron applies the
  rotary embedding per sequence (positions restart at every cu_seqlens boundary).
- megatron's local DotProductAttention (CPU, no TE): it refuses PackedSeqParams, so the model gets a
  block-diagonal causal `attention_mask` [1, 1, s, s] (True = masked, megatron's convention), and the rotary
  embedding is read at the row's `position_ids` (megatron's RotaryEmbedding otherwise returns positions
  0..s-1 for the whole row).
Both give each packed sequence exactly the computation it gets alone in a row of its own.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch

from megatron_trace.models.qwen3 import unwrap_model

__all__ = ["segment_causal_mask", "packed_seq_params", "rope_at_positions", "uses_te_attention", "packed_forward"]


def segment_causal_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Block-diagonal causal mask [1, 1, length, length] bool, True where attention is NOT allowed: a position
    attends to the positions of its own sequence up to itself. cu_seqlens [n + 1] must end at `length`."""
    device = cu_seqlens.device
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    pos = torch.arange(length, device=device)
    segment = torch.bucketize(pos, bounds[1:], right=True)  # sequence index of each position
    allowed = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed)[None, None]


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    """megatron's THD description of a packed row: every sequence (the padding tail included) is one entry of
    cu_seqlens [n + 1] int32; no per-sequence padding, so the padded boundaries are the same."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


def uses_te_attention(model) -> bool:
    """Whether the model's core attention is Transformer Engine's (which takes PackedSeqParams)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    gpt = unwrap_model(model)
    layers = getattr(gpt.decoder, "layers", [])
    if not len(layers):
        return False
    return not isinstance(layers[0].self_attention.core_attention, DotProductAttention)


@contextmanager
def rope_at_positions(model, position_ids: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's rotary embedding returns the frequencies of `position_ids` [b, s]
    (shape [s, b, 1, dim], which megatron's unfused bshd rope broadcasts over heads) instead of those of
    0..s-1. A no-op for a model without rotary embedding."""
    gpt = unwrap_model(model)
    rope = getattr(gpt, "rotary_pos_emb", None)
    if rope is None:
        yield
        return
    original = rope.forward

    def forward(max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        positions = position_ids.to(device=rope.inv_freq.device)
        table = original(max(int(max_seq_len), positions.shape[1]), offset, packed_seq, cp_group)  # [S, 1, 1, d]
        return table[:, 0, 0, :][positions.t()].unsqueeze(2)

    rope.forward = forward
    try:
        yield
    finally:
        del rope.forward  # back to the class's (cached) forward


@contextmanager
def packed_forward(model, microbatch: dict, prefix: str = "") -> Iterator[dict]:
    """Yields the extra keyword arguments of the model call for a packed micro-batch (keys
    `{prefix}cu_seqlens`, `{prefix}max_seqlen`, `{prefix}position_ids`), keeping the rotary patch of the local
    path in place for the duration of the call."""
    cu = microbatch[f"{prefix}cu_seqlens"]
    if uses_te_attention(model):
        yield {"packed_seq_params": packed_seq_params(cu, microbatch[f"{prefix}max_seqlen"])}
        return
    if microbatch[f"{prefix}tokens"].shape[0] != 1:
        raise ValueError("a packed micro-batch holds one row")
    length = microbatch[f"{prefix}tokens"].shape[1]
    with ExitStack() as stack:
        stack.enter_context(rope_at_positions(model, microbatch[f"{prefix}position_ids"]))
        yield {"attention_mask": segment_causal_mask(cu, length)}
