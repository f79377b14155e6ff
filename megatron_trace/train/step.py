"""The Megatron optimisation step shared by the trainer and the tests: build (DDP model + megatron optimizer),
forward/backward over microbatches through megatron's pipeline schedules, optimizer step, zero grads.

Loss scaling contract. `loss_fn` returns a loss already normalised by the caller (e.g. divided by the number of
loss tokens of the whole global batch). The gradient this step produces is the plain SUM, over every microbatch
of every data-parallel (and context-parallel) rank, of d loss / d params: no mean over microbatches or ranks is
taken on top. megatron-core's schedule instead scales a 2-tuple loss by `cp_size / num_microbatches`
(`forward_step_calc_loss`, "legacy loss averaging"), and megatron's DDP averages gradients over the dp x cp group
(`gradient_scaling_factor = 1 / (dp * cp)`). The net factor is `1 / (num_microbatches * dp)`, so `forward_backward`
hands the schedule `loss * num_microbatches * dp`, which cancels it exactly.
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial
from typing import Any, Callable, ContextManager

import torch

from megatron_trace.models.qwen3 import unwrap_model
from megatron_trace.train.packing import packed_forward

__all__ = ["build_model_and_optimizer", "forward_backward", "optimizer_step", "zero_grad"]

LossFn = Callable[[torch.Tensor, dict], "tuple[torch.Tensor, dict]"]


def build_model_and_optimizer(hf_config: dict, tcfg, *, lr: float, weight_decay: float = 0.0,
                              adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_eps: float = 1e-8,
                              clip_grad: float = 1.0, use_distributed_optimizer: bool = False,
                              bf16: bool = False):
    """This rank's Qwen3 chunk wrapped in megatron's DDP, and a megatron Adam optimizer over it.

    tcfg: the TransformerConfig (see models.qwen3_transformer_config); it is also wired with the hooks the
    schedules call (no_sync for gradient accumulation, finalize_model_grads for the DP all-reduce and the tied
    embedding all-reduce between first and last stage, and the optimizer's loss scale).
    Returns (model_chunks: list[DistributedDataParallel], optimizer: MegatronOptimizer).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_trace.models.qwen3 import build_qwen3_model

    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if use_distributed_optimizer and not torch.cuda.is_available():
        # megatron's DistributedOptimizer accepts only parameters whose type() is torch.cuda.*Tensor.
        raise ValueError("use_distributed_optimizer=True needs CUDA (megatron-core's DistributedOptimizer "
                         "only takes CUDA parameters); use the default optimizer on CPU")
    model = build_qwen3_model(hf_config, config=tcfg)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer)
    chunk = DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=model)
    # Data-parallel replicas start from DP rank 0's weights whatever their seeds were.
    chunk.broadcast_params()
    model_chunks = [chunk]

    opt_config = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=adam_beta1, adam_beta2=adam_beta2,
        adam_eps=adam_eps, clip_grad=clip_grad, bf16=bf16, params_dtype=tcfg.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, model_chunks)

    tcfg.no_sync_func = chunk.no_sync
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    return model_chunks, optimizer


def _model_device(model_chunks: list) -> torch.device:
    return next(model_chunks[0].parameters()).device


def _to_device(microbatch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in microbatch.items()}


def _check_microbatches(microbatches: list[dict], seq_length: int, micro_batch_size: int, fixed: bool) -> None:
    """fixed (a pipeline: stages exchange fixed-size activations): every micro-batch is [micro_batch_size,
    seq_length]; otherwise (one stage) each may be shorter, [micro_batch_size, s_i <= seq_length]."""
    if not microbatches:
        raise ValueError("forward_backward needs at least one microbatch")
    for i, mb in enumerate(microbatches):
        for key in ("tokens", "position_ids"):
            if key not in mb:
                raise KeyError(f"microbatch {i} has no {key!r} (needs tokens [b, s] and position_ids [b, s])")
        shape, positions = tuple(mb["tokens"].shape), tuple(mb["position_ids"].shape)
        if positions != shape:
            raise ValueError(f"microbatch {i}: position_ids has shape {positions}, tokens {shape}")
        if fixed and shape != (micro_batch_size, seq_length):
            raise ValueError(f"microbatch {i}: tokens has shape {shape}, expected (micro_batch_size, "
                             f"seq_length) = ({micro_batch_size}, {seq_length}); pad every microbatch to "
                             f"the same shape (pipeline stages exchange fixed-size activations)")
        if not fixed and (len(shape) != 2 or shape[0] != micro_batch_size or shape[1] > seq_length):
            raise ValueError(f"microbatch {i}: tokens has shape {shape}, expected (micro_batch_size, s <= "
                             f"seq_length) = ({micro_batch_size}, <= {seq_length})")


def forward_backward(model_chunks: list, microbatches: list[dict], loss_fn: LossFn, *, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False, finalize_grads: bool = True,
                     model_context: Callable[[Any, dict], ContextManager] | None = None) -> list:
    """Forward (and backward unless forward_only) over `microbatches` with megatron's schedule for the current
    pipeline layout.

    microbatches: this rank's microbatches (every stage of a pipeline gets the same list), each a dict with
      `tokens [b, s]` int64 and `position_ids [b, s]` int64 plus any tensors `loss_fn` needs; right-padded, so
      the causal mask is the only mask; or packed (b = 1, several sequences back to back, with `cu_seqlens`
      [n + 1] int32 and `max_seqlen`: see train/packing.py). Under pipeline parallelism every microbatch of a
      call has the same shape [micro_batch_size, seq_length]; on a single stage each may be shorter than
      seq_length (megatron's no-pipelining schedule exchanges no activations).
    loss_fn(logits, microbatch) -> (loss, metrics): logits `[b, s, padded_vocab / tp]` (this TP rank's vocab
      slice), loss a scalar tensor already normalised by the caller (see the module docstring: gradients are
      summed over microbatches and DP/CP ranks), metrics anything picklable.
    Returns the list of `metrics`, one per microbatch, on the last pipeline stage; [] on other stages.
    Gradients accumulate into the DDP grad buffers (call zero_grad first).
    model_context(model, microbatch): an optional context manager entered around each model call (the
      teacher uses it to run the output layer on span rows only).
    finalize_grads: False leaves out megatron's gradient finalize (the DP all-reduce, tied-embedding sync), for
      all but the last of several calls that accumulate into the same gradients.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _check_microbatches(microbatches, seq_length, micro_batch_size,
                        fixed=ps.get_pipeline_model_parallel_world_size() > 1)
    num_microbatches = len(microbatches)
    # Cancels the schedule's cp/num_microbatches and DDP's 1/(dp*cp): see the module docstring.
    loss_scale = float(num_microbatches * ps.get_data_parallel_world_size())
    device = _model_device(model_chunks)

    def scaled_loss(microbatch: dict, logits: torch.Tensor):
        loss, metrics = loss_fn(logits, microbatch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn must return (scalar loss tensor, metrics)")
        return loss.reshape(()) * loss_scale, metrics

    def forward_step(data_iterator, model):
        microbatch = _to_device(next(data_iterator), device)
        with ExitStack() as stack:
            kwargs = {"attention_mask": None}
            if "cu_seqlens" in microbatch:  # packed: attention and positions confined to each sequence
                kwargs = stack.enter_context(packed_forward(model, microbatch))
            if model_context is not None:
                stack.enter_context(model_context(model, microbatch))
            logits = model(input_ids=microbatch["tokens"], position_ids=microbatch["position_ids"], labels=None,
                           **kwargs)
        return logits, partial(scaled_loss, microbatch)

    forward_backward_func = get_forward_backward_func()
    # The schedule runs the model config's finalize_model_grads_func after the last backward; it is switched off
    # for this call only.
    config = unwrap_model(model_chunks[0]).config
    finalize = config.finalize_model_grads_func
    if not finalize_grads:
        config.finalize_model_grads_func = None
    try:
        metrics = forward_backward_func(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=model_chunks,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    finally:
        config.finalize_model_grads_func = finalize
    return list(metrics) if ps.is_pipeline_last_stage() else []


def optimizer_step(optimizer) -> tuple[bool, float | None, int | None]:
    """Clip, step and copy back: returns (update_successful, grad_norm, num_zeros_in_grad) from megatron.
    grad_norm is the global L2 norm over all model-parallel shards before clipping."""
    return optimizer.step()


def zero_grad(model_chunks: list, optimizer) -> None:
    """Zero the DDP gradient buffers and the optimizer's main grads before the next forward_backward."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
