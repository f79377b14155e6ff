"""The model call for `loss.fused_output_layer`: the GPT model returns its final hidden states instead of logits,
and the loss runs the output layer itself, chunk by chunk (loss/fused_output.py), so `[rows, vocab/tp]` logits are
never stored.

`output_hidden_states(model, microbatch, rows=None)` is a context manager entered around one model call (the
`model_context` of train.step.forward_backward). Within it the output layer (megatron's ColumnParallelLinear)
returns the hidden states it would have multiplied, prepared as it prepares them (under sequence parallelism
gathered along the sequence; otherwise wrapped so that backward all-reduces the hidden-state gradient over the TP
group, as the layer's own backward does), and stores the weight it would have used in `microbatch["output_weight"]`
(`[vocab/tp, H]`: the output layer's, or the word embedding's with tied embeddings). The model then returns
`[b, s, H]` (or, with `rows`, `[1, K, H]`: only those flattened batch-major positions, for the teacher's span rows).
A no-op on pipeline stages without an output layer.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_trace.distributed import collectives
from megatron_trace.models.qwen3 import unwrap_model

__all__ = ["output_hidden_states", "OUTPUT_WEIGHT"]

OUTPUT_WEIGHT = "output_weight"  # the microbatch key the weight is stored under


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over `group`. (megatron's copy_to_tensor_model_parallel_region
    all-reduces `grad.contiguous()`, which is a copy -- and so reduces nothing -- when the gradient arrives as the
    transposed view the GPT model's `[s, b] -> [b, s]` transpose hands back.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        collectives.all_reduce(grad, group=ctx.group)
        return grad, None


@contextmanager
def output_hidden_states(model, microbatch: dict, rows: torch.Tensor | None = None):
    gpt = unwrap_model(model)
    layer = getattr(gpt, "output_layer", None)
    if layer is None or not getattr(gpt, "post_process", False):
        yield
        return
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    def forward(hidden_states, weight=None, runtime_gather_output=None):
        if getattr(layer, "sequence_parallel", False):
            hidden_states = gather_from_sequence_parallel_region(hidden_states)
        elif torch.is_grad_enabled() and ps.get_tensor_model_parallel_world_size() > 1:
            # identity forward, TP all-reduce of the (per-vocab-shard partial) gradient in backward
            hidden_states = _AllReduceGrad.apply(hidden_states, ps.get_tensor_model_parallel_group())
        microbatch[OUTPUT_WEIGHT] = layer.weight if weight is None else weight
        if rows is not None:
            s, b, h = hidden_states.shape
            flat = hidden_states.transpose(0, 1).reshape(b * s, h)
            hidden_states = flat.index_select(0, rows.to(flat.device)).unsqueeze(1)
        return hidden_states, None

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward  # back to the class's forward
