"""The privileged teacher: the same network reading (privileged prompt + the student's response tokens).

The teacher is either the live policy (`refresh_steps == 1`: no extra memory) or a frozen snapshot of it
refreshed every `refresh_steps` steps (a second model of the same layout, weights only, no grads). Only span
rows need teacher logits, so by default the output layer (the `[hidden, vocab/tp]` matmul, the largest single
cost at Qwen3's 152k vocabulary) runs on those rows alone (`sparse_output_rows`). Nothing runs once lambda_k = 0.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch

from megatron_trace.models.qwen3 import unwrap_model
from megatron_trace.train.step import forward_backward

__all__ = ["Teacher", "sparse_output_rows"]


@contextmanager
def sparse_output_rows(model, rows: torch.Tensor):
    """Within the block, the model's output layer computes logits only for `rows` of its input.

    rows: [K] int64 indices into the flattened (batch-major) `[b * s]` positions. The GPTModel then returns
    logits `[1, K, vocab/tp]` instead of `[b, s, vocab/tp]`. A no-op on stages without an output layer.
    Under sequence parallelism the hidden states are gathered along the sequence first (as megatron does for
    last-token inference), then the layer runs without its own gather.
    """
    gpt = unwrap_model(model)
    layer = getattr(gpt, "output_layer", None)
    if layer is None or not getattr(gpt, "post_process", False):
        yield
        return
    original = layer.forward
    seq_parallel = getattr(layer, "sequence_parallel", False)

    def forward(hidden_states, weight=None, runtime_gather_output=None):
        if seq_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states)
        s, b, h = hidden_states.shape
        selected = hidden_states.transpose(0, 1).reshape(b * s, h).index_select(0, rows.to(hidden_states.device))
        return original(selected.unsqueeze(1), weight=weight, runtime_gather_output=runtime_gather_output)

    layer.forward = forward
    if seq_parallel:
        layer.sequence_parallel = False
    try:
        yield
    finally:
        del layer.forward  # back to the class's forward
        layer.sequence_parallel = seq_parallel


class Teacher:
    """Computes teacher logits `[K, vocab/tp]` on the span rows of each micro-batch.

    live_model_chunks: the policy's chunks. build_snapshot: makes an empty model of the same layout (called once,
    only when refresh_steps > 1).
    """

    def __init__(self, live_model_chunks: list, *, refresh_steps: int = 1, sparse_output: bool = True,
                 build_snapshot: Callable[[], torch.nn.Module] | None = None):
        self.live = live_model_chunks
        self.refresh_steps = refresh_steps
        self.sparse_output = sparse_output
        self.snapshot: list | None = None
        self.snapshot_step: int | None = None  # the step whose weights the snapshot holds
        if refresh_steps > 1:
            if build_snapshot is None:
                raise ValueError("a teacher snapshot (refresh_steps > 1) needs build_snapshot")
            model = build_snapshot()
            model.requires_grad_(False)
            model.eval()
            self.snapshot = [model]

    def maybe_refresh(self, step: int) -> None:
        """Copy the live weights into the snapshot at steps 0, N, 2N, ... (or when never filled)."""
        if self.snapshot is None:
            return
        if self.snapshot_step is None or step - self.snapshot_step >= self.refresh_steps:
            with torch.no_grad():
                for dst, src in zip(self.snapshot[0].parameters(), unwrap_model(self.live[0]).parameters()):
                    dst.copy_(src)
            self.snapshot_step = step

    @property
    def model_chunks(self) -> list:
        return self.snapshot if self.snapshot is not None else self.live

    def logits(self, microbatches: list[dict], *, micro_batch_size: int, seq_length: int
               ) -> list[torch.Tensor | None]:
        """Teacher logits for each micro-batch's `teacher_rows`: a list of `[K_i, vocab/tp]` tensors on the last
        pipeline stage, a list of None elsewhere. Forward only, no grad."""
        sparse = self.sparse_output

        def context(model, mb):
            return sparse_output_rows(model, mb["rows"]) if sparse else nullcontext()

        def keep_rows(logits: torch.Tensor, mb: dict):
            width = logits.shape[-1]
            flat = logits.reshape(-1, width)
            if not sparse:
                flat = flat.index_select(0, mb["rows"])
            return logits.sum() * 0.0, flat.detach()

        return self._forward(microbatches, context, keep_rows, micro_batch_size, seq_length)

    def hidden_rows(self, microbatches: list[dict], *, micro_batch_size: int, seq_length: int
                    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """For `loss.fused_output_layer`: instead of logits, each micro-batch's final hidden states of its
        `teacher_rows` and the teacher's output weight shard, `([K_i, H], [vocab/tp, H])` (the loss computes the
        logits chunk by chunk); a list of None off the last pipeline stage. Forward only, no grad."""
        from megatron_trace.train.output_layer import OUTPUT_WEIGHT, output_hidden_states

        def context(model, mb):
            return output_hidden_states(model, mb, rows=mb["rows"])

        def keep_rows(hidden: torch.Tensor, mb: dict):
            return hidden.sum() * 0.0, (hidden.reshape(-1, hidden.shape[-1]).detach(), mb[OUTPUT_WEIGHT].detach())

        return self._forward(microbatches, context, keep_rows, micro_batch_size, seq_length)

    def _forward(self, microbatches, context, keep_rows, micro_batch_size, seq_length) -> list:
        from megatron.core import parallel_state as ps

        teacher_mbs = []
        for mb in microbatches:
            t = {"tokens": mb["teacher_tokens"], "position_ids": mb["teacher_position_ids"], "rows": mb["teacher_rows"]}
            if "teacher_cu_seqlens" in mb:  # packed like the student's micro-batch
                t.update(cu_seqlens=mb["teacher_cu_seqlens"], max_seqlen=mb["teacher_max_seqlen"])
            teacher_mbs.append(t)
        was_training = [m.training for m in self.model_chunks]
        for m in self.model_chunks:
            m.eval()
        try:
            with torch.no_grad():
                out = forward_backward(self.model_chunks, teacher_mbs, keep_rows, seq_length=seq_length,
                                       micro_batch_size=micro_batch_size, forward_only=True,
                                       model_context=context)
        finally:
            for m, t in zip(self.model_chunks, was_training):
                m.train(t)
        return out if ps.is_pipeline_last_stage() else [None] * len(microbatches)
