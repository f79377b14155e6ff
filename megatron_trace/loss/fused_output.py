"""The output layer fused into the token statistics: logits are computed chunk by chunk and never stored.

    logits = hidden @ weight^T          hidden [T, H], weight [V/tp, H] (this rank's vocab shard), logits [T, V/tp]

`fused_output_token_stats(hidden, weight, targets, ...)` returns the same TokenStats as
`token_stats(hidden @ weight.T, targets, ...)` (loss/vocab_parallel.py: the same kernels, the same three
all-reduces), but holds at most one `[chunk_rows, V/tp]` block of logits (plus the kernels' temporaries of the
same size) at a time, for the student rows and for the span-sparse teacher rows (teacher_hidden [K, H] x
teacher_weight). Backward recomputes each block and turns its logit gradient at once into the hidden-state and
weight gradients (two matmuls), so neither `[T, V/tp]` logits nor their gradient ever exist.

Cost: the matmuls are recomputed -- student rows 2x + once per teacher row, teacher rows 2x in forward and once in
backward -- in exchange for never storing `T x V/tp` values (at Qwen3's 152k vocabulary, 4 GB per 8k fp32 rows
per TP rank, twice with the gradient).

`fused_output_loss(hidden, weight, targets, row_loss, ...)` removes the recomputation for losses that are a sum over
rows (RowLoss; the routed TRACE loss is one: TraceLoss.rows): each block's gradient is formed in the forward pass
as soon as the block is reduced over the vocab shards (the fused linear cross-entropy idea), so every logit block
is multiplied out once -- 3 matmul passes over the student rows and 4 over the teacher rows, against 3 and 1 for
the materialised output layer and 4 and 7 for fused_output_token_stats.

Tensor parallelism: `weight` is the rank's slice of the ColumnParallelLinear output layer (or of the tied word
embedding, the same `[V/tp, H]` layout); the hidden-state gradient returned is this shard's partial sum, which the
caller all-reduces over the TP group as megatron's output layer does (copy_to_tensor_model_parallel_region around
the input: see train/fused_output_layer.py).

Vocabulary padding: columns with global id >= vocab_size (Megatron pads the vocabulary to a multiple of
128 x tp) get logit -1e9, so they take no probability mass (exp underflows to exactly 0) and no gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_trace.loss.vocab_parallel import (Kernels, LogitSource, TokenStats, _all_reduce, _check_finite,
                                                _check_owners, _kernel, _math_dtype, _use_compiled, check_shapes,
                                                check_token_stats_values, chunks, prepare_teacher_args,
                                                stats_forward, student_chunk_grad, student_grad_coefficients,
                                                teacher_chunk_grad)

__all__ = ["fused_output_token_stats", "fused_output_loss", "RowLoss", "PAD_LOGIT"]

PAD_LOGIT = -1e9  # logit of padded vocabulary columns: no mass, no NaN in p log p


class HiddenLogits(LogitSource):
    """Logit blocks computed on demand from hidden states and the output weight shard."""

    def __init__(self, h: torch.Tensor, w: torch.Tensor, th: torch.Tensor, tw: torch.Tensor, valid: int):
        self.h, self.w, self.th, self.tw, self.valid = h, w, th, tw, valid
        self.rows, self.k_rows, self.width = h.shape[0], th.shape[0], w.shape[0]
        self.dtype, self.device = h.dtype, h.device

    def _logits(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        z = h @ w.t()
        if self.valid < self.width:
            z[:, self.valid:] = PAD_LOGIT
        return z

    def student(self, s, e):
        return self._logits(self.h[s:e], self.w)

    def student_at(self, idx):
        return self._logits(self.h.index_select(0, idx), self.w)

    def teacher(self, s, e):
        return self._logits(self.th[s:e], self.tw)


class _FusedOutputStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, target, th, tw, kl_rows, kl_reverse, vocab_start, valid, clip, group, chunk_rows,
                compiled, check_values):
        src = HiddenLogits(h, w, th, tw, valid)
        with torch.no_grad():
            logprob, entropy, kl, saved = stats_forward(src, target, kl_rows, kl_reverse, vocab_start, clip, group,
                                                        chunk_rows, compiled, check_values)
        ctx.save_for_backward(h, w, target, th, tw, kl_rows, kl_reverse, clip, *saved)
        ctx.vocab_start, ctx.valid, ctx.chunk_rows, ctx.compiled = vocab_start, valid, chunk_rows, compiled
        ctx.set_materialize_grads(False)
        return logprob, entropy, kl

    @staticmethod
    def backward(ctx, g_logprob, g_entropy, g_kl):
        h, w, target, th, tw, kl_rows, kl_reverse, clip, *saved = ctx.saved_tensors
        nones = (None,) * 12
        use_kl = g_kl is not None and kl_rows.numel() > 0
        need_student = g_logprob is not None or g_entropy is not None
        if not need_student and not use_kl:
            return (None, None) + nones
        dtype = _math_dtype(h.dtype)
        rows, width = h.shape[0], w.shape[0]
        chunk, compiled = ctx.chunk_rows, ctx.compiled
        src = HiddenLogits(h, w, th, tw, ctx.valid)
        # fp32 accumulators (fp64 for fp64 inputs); every block's logit gradient goes into them at once
        grad_h = torch.zeros(h.shape, dtype=dtype, device=h.device)
        grad_w = torch.zeros(w.shape, dtype=dtype, device=w.device)

        sink = functools.partial(_add_block_grads, w=w, grad_h=grad_h, grad_w=grad_w)

        with torch.no_grad():
            if need_student:
                coeffs = student_grad_coefficients(saved, g_logprob, g_entropy, rows, dtype, h.device)
                local_target = target - ctx.vocab_start
                block = torch.empty(min(chunk + 1, rows), width, dtype=dtype, device=h.device)
                for s, e in chunks(rows, chunk):
                    out = block[:e - s]
                    student_chunk_grad(out, src.student(s, e), saved, coeffs, local_target, s, e, compiled)
                    sink(out, h[s:e], slice(s, e))
            if use_kl:
                for s, e in chunks(kl_rows.numel(), chunk):
                    idx = kl_rows[s:e]
                    gk = teacher_chunk_grad(src, saved, kl_rows, kl_reverse, clip, g_kl, s, e, compiled)
                    sink(gk, h.index_select(0, idx), idx)
        return (grad_h.to(h.dtype) if ctx.needs_input_grad[0] else None,
                grad_w.to(w.dtype) if ctx.needs_input_grad[1] else None) + nones



def _add_block_grads(g: torch.Tensor, rows_h: torch.Tensor, at, *, w: torch.Tensor, grad_h: torch.Tensor,
                     grad_w: torch.Tensor) -> None:
    """Add one block's output-layer gradients: grad_h[at] += g @ w, grad_w += g^T @ rows_h.

    g: [n, V/tp] gradient of the block's logits; rows_h: [n, hidden] its hidden rows; at: a slice or [n] row ids.
    The matmuls run in the hidden states' dtype, as the output layer's own backward does; accumulation in grad's."""
    g = g.to(rows_h.dtype)
    gh = g @ w
    if isinstance(at, slice):
        grad_h[at] += gh
    else:
        grad_h.index_add_(0, at, gh.to(grad_h.dtype))
    grad_w.add_(g.t() @ rows_h)

def _prepare(hidden, weight, target_ids, vocab_start, group, vocab_size, teacher_hidden, teacher_weight, kl_rows,
             kl_reverse, kl_clip, chunk_rows, check_values):
    """Checks of fused_output_token_stats / fused_output_loss arguments and their defaults. Returns (teacher_hidden,
    teacher_weight, kl_rows, kl_reverse, valid, clip_t): empty teacher tensors when there is no teacher; valid =
    this shard's columns below vocab_size; clip_t the 0-d clip (inf = exact KL)."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating 2-D tensor, got {getattr(t, 'shape', type(t))}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[1]} != output weight's {weight.shape[1]} (weight is "
                         f"[V/tp, H])")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype}, weight {weight.dtype}; the output layer needs one dtype")
    rows, width = hidden.shape[0], weight.shape[0]
    if teacher_hidden is not None:
        if teacher_weight is None:
            teacher_weight = weight.detach()
        if teacher_hidden.requires_grad or teacher_weight.requires_grad:
            raise ValueError("teacher_hidden/teacher_weight must not require grad (the teacher is a constant)")
        if teacher_hidden.dim() != 2 or teacher_hidden.shape[1] != hidden.shape[1]:
            raise ValueError(f"teacher_hidden must be [K, H={hidden.shape[1]}], got {tuple(teacher_hidden.shape)}")
        if teacher_weight.shape != weight.shape:
            raise ValueError(f"teacher_weight {tuple(teacher_weight.shape)} != weight {tuple(weight.shape)}")
        teacher_hidden, teacher_weight = teacher_hidden.to(hidden.dtype), teacher_weight.to(hidden.dtype)
    elif teacher_weight is not None:
        raise ValueError("teacher_weight given without teacher_hidden")
    kl_rows, kl_reverse, clip = prepare_teacher_args(rows, teacher_hidden, kl_rows, kl_reverse, kl_clip,
                                                     hidden.device, "teacher_hidden")
    # the logits' shapes, as token_stats would see them (meta tensors: no compute)
    meta_z = torch.empty((rows, width), dtype=hidden.dtype, device="meta")
    meta_u = None if teacher_hidden is None else torch.empty((teacher_hidden.shape[0], width), dtype=hidden.dtype,
                                                             device="meta")
    check_shapes(meta_z, target_ids, meta_u, kl_rows, kl_reverse, vocab_start, group, chunk_rows, what="logits")
    if target_ids.device != hidden.device:
        raise ValueError(f"target_ids on {target_ids.device}, hidden on {hidden.device}")
    world = dist.get_world_size(group) if group is not None else 1
    padded = width * world
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {padded}] (V/tp={width} x tp={world})")
    valid = max(0, min(width, vocab_size - vocab_start))
    if check_values:
        check_token_stats_values(target_ids, vocab_size, kl_rows, rows)
    if teacher_hidden is None:
        teacher_hidden = hidden.new_empty((0, hidden.shape[1]))
        teacher_weight = weight.detach()
        kl_rows = torch.zeros(0, dtype=torch.long, device=hidden.device)
        kl_reverse = torch.zeros(0, dtype=torch.bool, device=hidden.device)
    clip_t = torch.full((), clip, dtype=_math_dtype(hidden.dtype), device=hidden.device)
    return teacher_hidden, teacher_weight, kl_rows.long(), kl_reverse, valid, clip_t


def fused_output_token_stats(hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, *,
                             vocab_start: int = 0, group=None, vocab_size: int | None = None,
                             teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                             kl_rows: torch.Tensor | None = None, kl_reverse: torch.Tensor | None = None,
                             kl_clip: float | None = None, chunk_rows: int = 512, kernels: Kernels = "auto",
                             check_values: bool = False) -> TokenStats:
    """token_stats of the logits `hidden @ weight.T`, computed block by block (the logits are never stored).

    hidden: [T, H] final hidden states of the scored rows (requires grad; replicated over the TP group).
    weight: [V/tp, H] this rank's output-layer (or tied embedding) shard; vocab_start its first global id.
    target_ids: [T] global ids. vocab_size: the real vocabulary (columns at or beyond it are padding, logit -1e9);
        default: no padding.
    teacher_hidden: [K, H] the teacher's final hidden states of its span rows (no grad); teacher_weight:
        [V/tp, H] the teacher's output weight shard (default: `weight`, detached -- the live policy as teacher).
    kl_rows, kl_reverse, kl_clip, group, kernels, check_values: as in token_stats.
    chunk_rows: rows per logit block; extra memory is a few chunk_rows x V/tp fp32 blocks.

    Returns TokenStats(logprob [T], entropy [T], kl [K]) (fp32; fp64 for fp64 inputs). The gradient reaching
    `hidden` is this vocab shard's part: under TP the caller all-reduces it (megatron's output layer does the same).
    Backward recomputes every logit block (see fused_output_loss for the variant that does not).
    """
    teacher_hidden, teacher_weight, kl_rows, kl_reverse, valid, clip_t = _prepare(
        hidden, weight, target_ids, vocab_start, group, vocab_size, teacher_hidden, teacher_weight, kl_rows,
        kl_reverse, kl_clip, chunk_rows, check_values)
    compiled = _use_compiled(kernels, hidden.device)
    logprob, entropy, kl = _FusedOutputStats.apply(
        hidden, weight, target_ids.long(), teacher_hidden, teacher_weight, kl_rows, kl_reverse,
        int(vocab_start), valid, clip_t, group, chunk_rows, compiled, check_values)
    return TokenStats(logprob, entropy, kl)


# ------------------------------------------------------------------------------------------------------------------
# gradient in the forward pass: for losses that are a sum over rows
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class RowLoss:
    """A loss that is a sum over rows of the token statistics:

        L = sum_t student(logprob, entropy, s, e)[t - s]  +  sum_k kl_coef[k] * kl[k]

    student(logprob [n], entropy [n], s, e) -> [n]: the loss terms of student rows s:e, where row i's term may
        depend on logprob[i] and entropy[i] only (and on constants: advantages, old log-probs, token weights,
        normalisers known before the forward). Called once per block of rows, under autograd, so any elementwise
        expression (the PPO clip included) gets its exact gradient.
    kl_coef: [K] the weight of each teacher row's KL (None or empty: no KL term).
    """

    student: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
    kl_coef: Optional[torch.Tensor] = None


def _row_gradients(fn, logprob, entropy, s, e):
    """(sum of the rows' loss terms, d/d logprob [n] or None, d/d entropy [n] or None) of fn on rows s:e."""
    with torch.enable_grad():
        lp = logprob.detach().requires_grad_()
        ent = entropy.detach().requires_grad_()
        terms = fn(lp, ent, s, e)
        if not isinstance(terms, torch.Tensor) or terms.shape != lp.shape:
            raise ValueError(f"RowLoss.student must return the [{e - s}] loss terms of rows {s}:{e}, got "
                             f"{tuple(getattr(terms, 'shape', ())) or type(terms).__name__}")
        total = terms.sum()
        if not total.requires_grad:
            return total.detach(), None, None
        g_lp, g_ent = torch.autograd.grad(total, (lp, ent), allow_unused=True)
    return total.detach(), g_lp, g_ent


def _reduce_block_stats(local, local_target, width, group):
    """Global row statistics of one block from its local ones: local = (max, sum-exp, moment, target logit) [n]
    each, relative to the local max (vocab_parallel._row_stats). Two all-reduces (MAX, SUM). Returns (max, sum-exp,
    moment, shifted target logit, owners) [n] each, the sums relative to the global max."""
    m, sum_exp, moment, picked = local
    maxima = m.clone()
    _all_reduce(maxima, dist.ReduceOp.MAX, group)
    scale = torch.exp(m - maxima)
    owned = (local_target >= 0) & (local_target < width)
    sums = torch.stack([sum_exp * scale, scale * (moment + (m - maxima) * sum_exp),
                        torch.where(owned, picked - maxima, torch.zeros_like(picked)), owned.to(m.dtype)])
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    return maxima, sums[0], sums[1], sums[2], sums[3]


def loss_forward(src: HiddenLogits, target, kl_rows, kl_reverse, vocab_start, clip, group, chunk_rows, compiled,
                 row_loss: RowLoss, need_grad: bool, check_values: bool = False):
    """The loss and its gradients in one pass over the logit blocks: each block of student rows is multiplied out,
    reduced over the vocab shards (MAX, SUM), its rows' loss gradient taken, and its logit gradient turned at once
    into hidden-state and weight gradients; then each block of teacher rows (teacher and student logits of those
    rows: MAX, SUM, then SUM of the KL parts) likewise. No logit block is computed twice.

    Returns (loss 0-d, logprob [T], entropy [T], kl [K], grad_h [T, H] or None, grad_w [V/tp, H] or None); the
    gradients are in the math dtype (fp32; fp64 for fp64 inputs)."""
    h, w = src.h, src.w
    dtype = _math_dtype(h.dtype)
    rows, k_rows, width, device = src.rows, src.k_rows, src.width, src.device
    row_stats = _kernel("_row_stats", compiled)
    kl_terms = _kernel("_kl_terms", compiled)
    kl_grad = _kernel("_kl_grad", compiled)
    z_max = torch.empty(rows, dtype=dtype, device=device)
    z_sum = torch.empty_like(z_max)
    logprob = torch.empty_like(z_max)
    entropy = torch.empty_like(z_max)
    kl = torch.empty(k_rows, dtype=dtype, device=device)
    loss = torch.zeros((), dtype=dtype, device=device)
    grad_h = torch.zeros(h.shape, dtype=dtype, device=device) if need_grad else None
    grad_w = torch.zeros(w.shape, dtype=dtype, device=device) if need_grad else None
    local_target = target - vocab_start
    block = torch.empty(min(chunk_rows + 1, rows), width, dtype=dtype, device=device) if need_grad else None

    sink = functools.partial(_add_block_grads, w=w, grad_h=grad_h, grad_w=grad_w) if need_grad else None

    for s, e in chunks(rows, chunk_rows):
        z = src.student(s, e)
        m, zs, moment, target_logit, owners = _reduce_block_stats(row_stats(z, local_target[s:e]),
                                                                  local_target[s:e], width, group)
        if check_values:
            _check_finite(m, e - s)
            _check_owners(owners, target[s:e])
        log_z = torch.log(zs)
        z_max[s:e], z_sum[s:e] = m, zs
        logprob[s:e] = target_logit - log_z
        entropy[s:e] = log_z - moment / zs
        part, g_lp, g_ent = _row_gradients(row_loss.student, logprob[s:e], entropy[s:e], s, e)
        loss += part
        if need_grad and (g_lp is not None or g_ent is not None):
            saved = (z_max[s:e], z_sum[s:e], entropy[s:e])
            coeffs = student_grad_coefficients(saved, g_lp, g_ent, e - s, dtype, device)
            out = block[:e - s]
            student_chunk_grad(out, z, saved, coeffs, local_target[s:e], 0, e - s, compiled)
            sink(out, h[s:e], slice(s, e))
        del z

    block = None  # freed before the teacher blocks (three of their size are alive there: u, zk, the KL gradient)
    kl_coef = row_loss.kl_coef
    if k_rows and kl_coef is not None and kl_coef.shape != (k_rows,):
        raise ValueError(f"RowLoss.kl_coef must be [K] = [{k_rows}] (one weight per teacher row), got "
                         f"{tuple(kl_coef.shape)}")
    # teacher blocks of half the rows: three blocks are alive at once here, two for the student rows
    k_chunk = max(2, chunk_rows // 2)
    no_target = torch.full((min(k_chunk + 1, k_rows),), -1, dtype=torch.long, device=device)
    for s, e in chunks(k_rows, k_chunk):
        idx = kl_rows[s:e]
        u = src.teacher(s, e)
        zk = src.student_at(idx)
        u_max, u_sum, _, _, _ = _reduce_block_stats(row_stats(u, no_target[:e - s]), no_target[:e - s], width,
                                                    group)
        if check_values:
            _check_finite(u_max, 0)
        zk_max, zk_sum = z_max.index_select(0, idx), z_sum.index_select(0, idx)
        parts = torch.stack(kl_terms(zk, None, u, zk_max, zk_sum, u_max, u_sum, kl_reverse[s:e], clip))
        _all_reduce(parts, dist.ReduceOp.SUM, group)
        kl[s:e] = parts[0]
        if kl_coef is None:
            continue
        coef = kl_coef[s:e].to(dtype)
        loss += (parts[0] * coef).sum()
        if need_grad:
            gk = kl_grad(zk, None, u, zk_max, zk_sum, u_max, u_sum, kl_reverse[s:e], clip, parts[1], coef)
            sink(gk, h.index_select(0, idx), idx)
        del u, zk
    return loss, logprob, entropy, kl, grad_h, grad_w


class _FusedOutputLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, target, th, tw, kl_rows, kl_reverse, vocab_start, valid, clip, group, chunk_rows,
                compiled, row_loss, need_grad, check_values):
        src = HiddenLogits(h, w, th, tw, valid)
        loss, logprob, entropy, kl, grad_h, grad_w = loss_forward(
            src, target, kl_rows, kl_reverse, vocab_start, clip, group, chunk_rows, compiled, row_loss, need_grad,
            check_values)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.in_dtypes = (h.dtype, w.dtype)
        ctx.mark_non_differentiable(logprob, entropy, kl)
        return loss, logprob, entropy, kl

    @staticmethod
    def backward(ctx, g_loss, *_):
        nones = (None,) * 14
        if g_loss is None or not ctx.saved_tensors:
            return (None, None) + nones
        grad_h, grad_w = ctx.saved_tensors
        # the loss is the sum of the rows' terms: its gradient is the forward's, times the scalar upstream
        g = g_loss.to(grad_h.dtype)
        return ((grad_h * g).to(ctx.in_dtypes[0]) if ctx.needs_input_grad[0] else None,
                (grad_w * g).to(ctx.in_dtypes[1]) if ctx.needs_input_grad[1] else None) + nones


def fused_output_loss(hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, row_loss: RowLoss, *,
                      vocab_start: int = 0, group=None, vocab_size: int | None = None,
                      teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                      kl_rows: torch.Tensor | None = None, kl_reverse: torch.Tensor | None = None,
                      kl_clip: float | None = None, chunk_rows: int = 512, kernels: Kernels = "auto",
                      check_values: bool = False) -> tuple[torch.Tensor, TokenStats]:
    """Output layer + token statistics + a row-sum loss, with the gradient formed in the forward pass (the fused
    linear cross-entropy idea, here across vocab shards and with entropy and clipped KL).

    Because `row_loss` (RowLoss) is a sum over rows whose per-row terms depend only on that row's statistics, a
    block's logit gradient is known as soon as the block's rows are reduced over the vocab shards; the forward turns
    it at once into the hidden-state and weight gradients and backward only scales them by the scalar upstream
    gradient. Each logit block is multiplied out once (fused_output_token_stats: twice, backward recomputes it),
    so the matmul count is the materialised path's plus one student-row block per teacher row.

    Arguments as fused_output_token_stats. Returns (loss 0-d, differentiable w.r.t. hidden and weight;
    TokenStats(logprob [T], entropy [T], kl [K]) without gradient, for metrics). Gradients are computed only when
    grad mode is on and hidden or weight requires grad; they are held ([T, H] + [V/tp, H] in fp32) from forward to
    backward, as the materialised path holds its logits.

    Collectives: two all-reduces per block of student rows (MAX, SUM) and three per block of teacher rows (MAX,
    SUM, SUM), instead of three in all: the price of not storing or recomputing the blocks.
    """
    if not isinstance(row_loss, RowLoss):
        raise ValueError(f"row_loss must be a RowLoss (per-row loss terms + KL weights), got "
                         f"{type(row_loss).__name__}")
    teacher_hidden, teacher_weight, kl_rows, kl_reverse, valid, clip_t = _prepare(
        hidden, weight, target_ids, vocab_start, group, vocab_size, teacher_hidden, teacher_weight, kl_rows,
        kl_reverse, kl_clip, chunk_rows, check_values)
    compiled = _use_compiled(kernels, hidden.device)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, logprob, entropy, kl = _FusedOutputLoss.apply(
        hidden, weight, target_ids.long(), teacher_hidden, teacher_weight, kl_rows, kl_reverse, int(vocab_start),
        valid, clip_t, group, chunk_rows, compiled, row_loss, need_grad, check_values)
    return loss, TokenStats(logprob, entropy, kl)
