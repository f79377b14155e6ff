"""Per-token statistics of vocabulary-parallel logits: log-prob of the target, entropy, and (clipped) KL to a teacher.

Under tensor parallelism every rank holds the logits of a contiguous slice of the vocabulary, `[rows, V/tp]`. This
module computes, without ever gathering the vocabulary (docs/design.md, "Vocabulary-parallel statistics"):

    logprob[t] = log p_t(y_t)                                              [T]  nats
    entropy[t] = -sum_v p_t(v) log p_t(v)                                   [T]  nats
    kl[k]      = sum_v min(c, q(v) (log q(v) - log p(v)))   forward rows   [K]  nats   (KL(teacher || student))
               = sum_v min(c, p(v) (log p(v) - log q(v)))   reverse rows                (KL(student || teacher))

with p = softmax(student row), q = softmax(teacher row), c the per-vocab-entry clip (c = None: exact KL).

Communication: exactly three all-reduces per call whatever is requested (two when no teacher is given), none in
backward:
  1. MAX of the stacked row maxima of student and teacher rows;
  2. SUM of the stacked sum-exp of student and teacher rows, the shifted target logit, the first moment
     sum_v exp(z_v - m)(z_v - m) (which gives the entropy: H = log Z - moment / Z), and a target-ownership count;
  3. SUM of the stacked partial KL sums and the per-row clip-correction scalars (teacher rows only).

Gradients (g = upstream gradient; a_v = 1 where the vocab term is below the clip, else 0):
  d logprob / dz_j = onehot_j - p_j
  d entropy / dz_j = -p_j (log p_j + H)
  d FKL / dz_j     = -a_j q_j + p_j S,            S = sum_v a_v q_v                  (= 1 when unclipped: p - q)
  d RKL / dz_j     =  a_j p_j (g_j + 1) - p_j S,  S = sum_v a_v p_v (g_v + 1), g = log p - log q
                                                                                   (unclipped: p (g - RKL))
S is a global per-row scalar, so it is reduced in the forward's third all-reduce and backward is local.

Math runs in fp32 on bf16/fp16/fp32 inputs (fp64 on fp64 inputs, for gradcheck), over chunks of `chunk_rows` rows,
and backward recomputes the softmax chunk by chunk. Extra memory is a fixed set of `chunk_rows x V/tp` fp32 buffers
(2 for the student pass, up to 8 more while teacher rows are processed), reused by every chunk of a call, on top of
the gradient itself; nothing of size `V/tp` is kept between forward and backward. Inputs are never modified.

Precision: log q - log p is formed from the raw logit difference (u - z) minus one per-row constant, so nearly
agreeing rows keep their small KL; probabilities are exp(z - max) / Z; every vocabulary reduction is torch's
pairwise sum.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_trace.distributed import collectives

__all__ = ["TokenStats", "token_stats"]


class TokenStats(NamedTuple):
    """Per-token statistics, all differentiable w.r.t. the student logits.

    logprob: [T] log p(target) (nats); entropy: [T] student entropy (nats); kl: [K] (clipped) KL of the teacher
    rows (nats), empty when no teacher was given.
    """

    logprob: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 stays fp64 (gradcheck); everything else is computed in fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        collectives.all_reduce(tensor, op=op, group=group)


class _Workspace:
    """Named `[rows, V/tp]` scratch buffers, allocated on first use and reused by every chunk of one call.

    A fresh multi-hundred-MB tensor per chunk costs more in page faults than the arithmetic done in it; reusing a
    few buffers keeps extra memory at a fixed multiple of `chunk x V/tp` and the time in the math."""

    def __init__(self, rows: int, width: int, device: torch.device):
        self.rows, self.width, self.device = max(rows, 1), width, device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty((self.rows, self.width), dtype=dtype, device=self.device)
        return buf[:rows]


class VocabParallelTokenStats:
    """Pure per-chunk helpers on local shards; each returns partial (pre-reduction) quantities or local gradients.

    Buffers come from a _Workspace; results named in a docstring live in those buffers until the next call."""

    @staticmethod
    def sum_exp_and_moment(ws: _Workspace, logits: torch.Tensor, row_max: torch.Tensor,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial sum_v e^s and sum_v e^s s of s = logits - row_max, logits [rows, V/tp] -> ([rows], [rows])."""
        shifted = torch.sub(logits, row_max.unsqueeze(-1), out=ws.get("a", logits.shape[0], dtype))
        e = torch.exp(shifted, out=ws.get("b", logits.shape[0], dtype))
        # torch's sum reduces pairwise; a BLAS dot (bmm) accumulates sequentially in fp32 and loses ~1e-4 relative
        # over a 150k-entry vocabulary row.
        return e.sum(dim=-1), shifted.mul_(e).sum(dim=-1)

    @staticmethod
    def sum_exp(ws: _Workspace, logits: torch.Tensor, row_max: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Partial sum_v exp(logits - row_max) [rows]."""
        e = torch.sub(logits, row_max.unsqueeze(-1), out=ws.get("a", logits.shape[0], dtype)).exp_()
        return e.sum(dim=-1)

    @staticmethod
    def kl_terms(ws: _Workspace, z: torch.Tensor, z_rows: torch.Tensor, u: torch.Tensor, z_max: torch.Tensor,
                 z_sum: torch.Tensor, u_max: torch.Tensor, u_sum: torch.Tensor, reverse: torch.Tensor,
                 clip: float | None, dtype: torch.dtype):
        """Per-vocab KL terms of student rows z[z_rows] and teacher rows u [n, V/tp] (raw logits).

        Returns (terms, p, weight, ratio_log, clipped), each [n, V/tp]: p = softmax of the student rows;
        weight = q (forward rows) or p (reverse rows); ratio_log = log q - log p (forward) or log p - log q
        (reverse); terms = weight * ratio_log clamped at `clip` from above; clipped = bool, terms at or above the
        clip, whose gradient is zero (None when clip is None). Forward and backward both call this, so the clip
        decisions agree bit for bit.
        """
        n = z_rows.shape[0]
        zk = torch.index_select(z, 0, z_rows, out=ws.get("zk", n, z.dtype))
        if zk.dtype != dtype:  # u - z must be formed in fp32, not in bf16
            zk = ws.get("zk32", n, dtype).copy_(zk)
        if u.dtype != dtype:
            u = ws.get("u32", n, dtype).copy_(u)
        # log q - log p = (u - z) - [(u_max - z_max) + (log Z_u - log Z_z)]: subtracting raw logits first keeps
        # the precision when teacher and student nearly agree (the large row offsets cancel in one constant).
        offset = (u_max - z_max) + (torch.log(u_sum) - torch.log(z_sum))
        ratio_log = torch.sub(u, zk, out=ws.get("ratio", n, dtype)).sub_(offset.unsqueeze(-1))
        # exp(z - max) / Z rather than exp(z - log-sum-exp): large probabilities keep ~1 ulp of relative precision
        # instead of inheriting the rounding of a log-prob of magnitude log V.
        p = torch.sub(zk, z_max.unsqueeze(-1), out=ws.get("p", n, dtype)).exp_().div_(z_sum.unsqueeze(-1))
        q = torch.sub(u, u_max.unsqueeze(-1), out=ws.get("q", n, dtype)).exp_().div_(u_sum.unsqueeze(-1))
        rev = reverse.unsqueeze(-1)
        weight = torch.where(rev, p, q, out=ws.get("w", n, dtype))
        ratio_log.mul_(torch.where(rev, -1.0, 1.0).to(dtype))  # reverse rows: log p - log q
        terms = torch.mul(weight, ratio_log, out=q)  # q is no longer needed
        clipped = None
        if clip is not None:
            clipped = torch.ge(terms, clip, out=ws.get("clipped", n, torch.bool))
            terms.clamp_(max=clip)
        return terms, p, weight, ratio_log, clipped

    @staticmethod
    def weighted_factor(ws: _Workspace, weight: torch.Tensor, ratio_log: torch.Tensor, clipped: torch.Tensor | None,
                        reverse: torch.Tensor, name: str) -> torch.Tensor:
        """[n, V/tp] a_v q_v on forward rows, a_v p_v (g_v + 1) on reverse rows (g = log p - log q; a = not
        clipped)."""
        rev = reverse.to(ratio_log.dtype).unsqueeze(-1)
        out = torch.mul(ratio_log, rev, out=ws.get(name, ratio_log.shape[0], ratio_log.dtype)).add_(1.0)
        out.mul_(weight)
        if clipped is not None:
            out.masked_fill_(clipped, 0.0)
        return out

    @staticmethod
    def clip_correction(ws, weight, ratio_log, clipped, reverse) -> torch.Tensor:
        """Partial S [n]: sum_v a_v q_v (forward rows) or sum_v a_v p_v (g_v + 1) (reverse rows)."""
        return VocabParallelTokenStats.weighted_factor(ws, weight, ratio_log, clipped, reverse, "f").sum(dim=-1)

    @staticmethod
    def kl_grad(ws, p, weight, ratio_log, clipped, reverse, correction, upstream) -> torch.Tensor:
        """upstream * d kl / d z  [n, V/tp]: forward -(a q - p S); reverse a p (g + 1) - p S."""
        grad = VocabParallelTokenStats.weighted_factor(ws, weight, ratio_log, clipped, reverse, "f")
        grad.sub_(p.mul_(correction.unsqueeze(-1)))  # p is not needed afterwards
        sign = torch.where(reverse, 1.0, -1.0).to(grad.dtype)
        return grad.mul_((sign * upstream.to(grad.dtype)).unsqueeze(-1))


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, target, u, kl_rows, kl_reverse, vocab_start, clip, group, chunk_rows):
        helpers = VocabParallelTokenStats
        dtype = _math_dtype(z.dtype)
        rows, width = z.shape
        k_rows = kl_rows.numel()
        device = z.device
        ws = _Workspace(min(chunk_rows, max(rows, k_rows)), width, device)

        # 1. MAX: row maxima of student and teacher rows (max is exact in the input dtype; no buffer).
        maxima = torch.cat([z.amax(dim=-1).to(dtype), u.amax(dim=-1).to(dtype)])
        _all_reduce(maxima, dist.ReduceOp.MAX, group)
        if not bool(torch.isfinite(maxima).all()):
            bad = int((~torch.isfinite(maxima)).nonzero()[0])
            which = f"student row {bad}" if bad < rows else f"teacher row {bad - rows}"
            raise ValueError(f"token_stats: logits must be finite; {which} has a NaN/inf maximum")
        z_max, u_max = maxima[:rows], maxima[rows:]

        # 2. SUM: [sum-exp z | moment z | shifted target logit | target owners | sum-exp u]
        sums = torch.zeros(4 * rows + k_rows, dtype=dtype, device=device)
        z_sum, z_moment, target_logit, owners, u_sum = sums.split([rows, rows, rows, rows, k_rows])
        local_target = target - vocab_start
        owned = (local_target >= 0) & (local_target < width)
        picked = z.gather(1, local_target.clamp(0, width - 1).unsqueeze(1)).squeeze(1).to(dtype)
        target_logit.copy_(torch.where(owned, picked - z_max, torch.zeros_like(picked)))
        owners.copy_(owned.to(dtype))
        for s in range(0, rows, chunk_rows):
            e = min(s + chunk_rows, rows)
            z_sum[s:e], z_moment[s:e] = helpers.sum_exp_and_moment(ws, z[s:e], z_max[s:e], dtype)
        for s in range(0, k_rows, chunk_rows):
            e = min(s + chunk_rows, k_rows)
            u_sum[s:e] = helpers.sum_exp(ws, u[s:e], u_max[s:e], dtype)
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        if rows and not bool((owners == 1).all()):
            bad = int((owners != 1).nonzero()[0])
            raise ValueError(
                f"token_stats: target id {int(target[bad])} of row {bad} is owned by {int(owners[bad])} vocab "
                f"shards (expected 1); check vocab_start on every rank")
        z_log_sum = torch.log(z_sum)
        logprob = target_logit - z_log_sum
        entropy = z_log_sum - z_moment / z_sum  # H = log Z - E_p[z - max]: two non-negative terms, no cancellation

        # 3. SUM (teacher rows only): [partial KL | clip correction S]
        kl_parts = torch.zeros(2 * k_rows, dtype=dtype, device=device)
        kl, correction = kl_parts.split([k_rows, k_rows])
        for s in range(0, k_rows, chunk_rows):
            e = min(s + chunk_rows, k_rows)
            idx = kl_rows[s:e]
            terms, _, weight, ratio_log, clipped = helpers.kl_terms(
                ws, z, idx, u[s:e], z_max[idx], z_sum[idx], u_max[s:e], u_sum[s:e], kl_reverse[s:e], clip, dtype)
            kl[s:e] = terms.sum(dim=-1)
            correction[s:e] = helpers.clip_correction(ws, weight, ratio_log, clipped, kl_reverse[s:e])
        del ws
        if k_rows:
            _all_reduce(kl_parts, dist.ReduceOp.SUM, group)

        ctx.save_for_backward(z, target, u, kl_rows, kl_reverse, z_max, z_sum, entropy, u_max, u_sum, correction)
        ctx.vocab_start, ctx.clip, ctx.chunk_rows = vocab_start, clip, chunk_rows
        ctx.set_materialize_grads(False)
        return logprob, entropy, kl.clone()

    @staticmethod
    def backward(ctx, g_logprob, g_entropy, g_kl):
        z, target, u, kl_rows, kl_reverse, z_max, z_sum, entropy, u_max, u_sum, correction = ctx.saved_tensors
        helpers = VocabParallelTokenStats
        use_kl = g_kl is not None and kl_rows.numel() > 0
        if g_logprob is None and g_entropy is None and not use_kl:
            return (None,) * 9
        dtype = _math_dtype(z.dtype)
        rows, width = z.shape
        chunk_rows = ctx.chunk_rows
        ws = _Workspace(min(chunk_rows, rows), width, z.device)
        grad = torch.empty_like(z)
        z_log_sum = torch.log(z_sum)

        # Per row, the logprob/entropy gradient is e_j * (alpha s_j + beta) (+ g_lp at the target), with
        # e = exp(s), s = z - max: p_j (-g_lp - g_H (log p_j + H)) folded into two row constants.
        g_lp = g_logprob.to(dtype) if g_logprob is not None else None
        if g_entropy is not None:
            g_h = g_entropy.to(dtype)
            alpha = -g_h / z_sum
            beta = g_h * (z_log_sum - entropy)
            beta = (beta - g_lp if g_lp is not None else beta) / z_sum
        elif g_lp is not None:
            alpha, beta = None, -g_lp / z_sum
        local_target = target - ctx.vocab_start
        owned = (local_target >= 0) & (local_target < width)
        # Teacher rows grouped by the student chunk they fall in, so each chunk's gradient is summed in fp32.
        if use_kl:
            order = torch.argsort(kl_rows, stable=True)
            bounds = torch.searchsorted(kl_rows[order], torch.arange(0, rows + chunk_rows, chunk_rows,
                                                                     device=z.device)).tolist()

        for ci, s in enumerate(range(0, rows, chunk_rows)):
            e = min(s + chunk_rows, rows)
            n = e - s
            direct = grad.dtype == dtype  # else sum in an fp32 buffer and round once into the bf16/fp16 gradient
            out = grad[s:e] if direct else ws.get("g", n, dtype)
            if g_lp is None and g_entropy is None:
                out.zero_()
            else:
                shifted = torch.sub(z[s:e], z_max[s:e].unsqueeze(-1), out=ws.get("a", n, dtype))
                if alpha is None:
                    torch.mul(shifted.exp_(), beta[s:e].unsqueeze(-1), out=out)
                else:
                    exp = torch.exp(shifted, out=ws.get("b", n, dtype))
                    coef = shifted.mul_(alpha[s:e].unsqueeze(-1)).add_(beta[s:e].unsqueeze(-1))
                    torch.mul(exp, coef, out=out)
            if g_lp is not None:
                hit = owned[s:e].nonzero().squeeze(-1)
                out.index_put_((hit, local_target[s:e][hit]), g_lp[s:e][hit], accumulate=True)
            if use_kl:
                lo, hi = bounds[ci], bounds[ci + 1]
                for a in range(lo, hi, chunk_rows):
                    idx = order[a:min(a + chunk_rows, hi)]
                    src = kl_rows[idx]
                    uk = torch.index_select(u, 0, idx, out=ws.get("u", idx.numel(), u.dtype))
                    _, pk, weight, ratio_log, clipped = helpers.kl_terms(
                        ws, z, src, uk, z_max[src], z_sum[src], u_max[idx], u_sum[idx], kl_reverse[idx], ctx.clip,
                        dtype)
                    gk = helpers.kl_grad(ws, pk, weight, ratio_log, clipped, kl_reverse[idx], correction[idx],
                                         g_kl[idx])
                    out.index_add_(0, src - s, gk)
            if not direct:
                grad[s:e].copy_(out)
        return grad, None, None, None, None, None, None, None, None


def _check_inputs(z, target, u, kl_rows, kl_reverse, vocab_start, group, chunk_rows):
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"student_logits must be [T, V/tp], got {getattr(z, 'shape', type(z))}")
    if not z.is_floating_point():
        raise ValueError(f"student_logits must be floating point, got {z.dtype}")
    rows, width = z.shape
    if width == 0:
        raise ValueError("student_logits has an empty vocabulary shard (V/tp = 0)")
    if not isinstance(target, torch.Tensor) or target.shape != (rows,):
        raise ValueError(f"target_ids must be [T] = [{rows}], got {tuple(getattr(target, 'shape', ()))}")
    if target.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"target_ids must be an integer tensor, got {target.dtype}")
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    world = dist.get_world_size(group) if group is not None else 1
    vocab = width * world  # Megatron shards the (padded) vocabulary in equal slices
    if not 0 <= vocab_start <= vocab - width:
        raise ValueError(f"vocab_start={vocab_start} is outside [0, {vocab - width}] for shards of width {width} "
                         f"and tp={world}")
    if rows and bool(((target < 0) | (target >= vocab)).any()):
        bad = int(((target < 0) | (target >= vocab)).nonzero()[0])
        raise ValueError(f"target_ids[{bad}] = {int(target[bad])} is outside the vocabulary [0, {vocab}) "
                         f"(V/tp={width}, tp={world})")
    if u is None:
        if kl_rows is not None or kl_reverse is not None:
            raise ValueError("kl_rows/kl_reverse given without teacher_logits")
        return
    if not isinstance(u, torch.Tensor) or u.dim() != 2 or not u.is_floating_point():
        raise ValueError(f"teacher_logits must be a floating [K, V/tp] tensor, got {getattr(u, 'shape', type(u))}")
    if u.shape[1] != width:
        raise ValueError(f"teacher_logits shard width {u.shape[1]} != student shard width {width}; both must hold "
                         f"the same vocab slice")
    if u.requires_grad:
        raise ValueError("teacher_logits must not require grad (the teacher is a constant); pass .detach()")
    if u.device != z.device:
        raise ValueError(f"teacher_logits on {u.device}, student_logits on {z.device}")
    k_rows = u.shape[0]
    if kl_rows.shape != (k_rows,) or kl_rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kl_rows must be an integer [K] = [{k_rows}] tensor (one per teacher row), got "
                         f"{kl_rows.dtype} {tuple(kl_rows.shape)}")
    if k_rows and bool(((kl_rows < 0) | (kl_rows >= rows)).any()):
        bad = int(((kl_rows < 0) | (kl_rows >= rows)).nonzero()[0])
        raise ValueError(f"kl_rows[{bad}] = {int(kl_rows[bad])} is out of range for T={rows} student rows")
    if kl_reverse.shape != (k_rows,) or kl_reverse.dtype != torch.bool:
        raise ValueError(f"kl_reverse must be a bool [K] = [{k_rows}] tensor, got {kl_reverse.dtype} "
                         f"{tuple(kl_reverse.shape)}")


def token_stats(student_logits: torch.Tensor, target_ids: torch.Tensor, *, vocab_start: int = 0, group=None,
                teacher_logits: torch.Tensor | None = None, kl_rows: torch.Tensor | None = None,
                kl_reverse: torch.Tensor | None = None, kl_clip: float | None = None,
                chunk_rows: int = 1024) -> TokenStats:
    """Log-prob of the targets, entropy and (clipped) KL to a teacher, from vocabulary-parallel logits.

    student_logits: [T, V/tp] this rank's vocab slice (bf16/fp16/fp32; fp64 computes in fp64), requires grad.
    target_ids: [T] global token ids (the same on every rank of `group`).
    vocab_start: global id of this shard's first column; shards are equal width, so the vocabulary is V/tp * tp.
    group: the tensor-parallel process group (None = a single shard, no communication).
    teacher_logits: [K, V/tp] teacher logits (no grad) for the student rows `kl_rows` [K] (indices into T;
        default arange(T) when K == T); `kl_reverse` [K] bool: False = forward KL(teacher || student), True =
        reverse KL(student || teacher) (default all False).
    kl_clip: clamp every per-vocab-entry KL term from above at this value (nats); None = exact KL.
    chunk_rows: rows processed at a time; extra memory is a few chunk_rows x V/tp fp32 buffers.

    Returns TokenStats(logprob [T], entropy [T], kl [K]) in fp32 (fp64 for fp64 input); kl is empty without a
    teacher. All collectives are issued in forward (3 with a teacher, 2 without); every rank of `group` must call
    with the same T, K, targets, kl_rows and kl_reverse.
    """
    if teacher_logits is not None:
        if kl_rows is None:
            if teacher_logits.dim() != 2 or teacher_logits.shape[0] != student_logits.shape[0]:
                raise ValueError(f"kl_rows is required unless teacher_logits has one row per student row "
                                 f"(teacher {tuple(teacher_logits.shape)}, student {tuple(student_logits.shape)})")
            kl_rows = torch.arange(student_logits.shape[0], device=student_logits.device)
        if kl_reverse is None and teacher_logits.dim() == 2:
            kl_reverse = torch.zeros(teacher_logits.shape[0], dtype=torch.bool, device=student_logits.device)
    if kl_clip is not None and not kl_clip > 0:
        raise ValueError(f"kl_clip must be a positive number of nats or None, got {kl_clip!r}")
    _check_inputs(student_logits, target_ids, teacher_logits, kl_rows, kl_reverse, vocab_start, group, chunk_rows)
    if teacher_logits is None:
        teacher_logits = student_logits.new_empty((0, student_logits.shape[1])).detach()
        kl_rows = torch.zeros(0, dtype=torch.long, device=student_logits.device)
        kl_reverse = torch.zeros(0, dtype=torch.bool, device=student_logits.device)
    clip = None if kl_clip is None else float(kl_clip)
    logprob, entropy, kl = _TokenStats.apply(student_logits, target_ids, teacher_logits, kl_rows.long(), kl_reverse,
                                             int(vocab_start), clip, group, chunk_rows)
    return TokenStats(logprob, entropy, kl)
