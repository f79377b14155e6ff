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
One pass over the local logits gives the local maximum m_r and the sums relative to it ("online" max); after the
MAX all-reduce they are rescaled to the global maximum M on [T]-sized vectors (s = s_r e^(m_r - M),
moment = e^(m_r - M) (moment_r + (m_r - M) s_r)), so the logits are read once in forward, not twice.

Gradients (g = upstream gradient; a_v = 1 where the vocab term is below the clip, else 0):
  d logprob / dz_j = onehot_j - p_j
  d entropy / dz_j = -p_j (log p_j + H)
  d FKL / dz_j     = -a_j q_j + p_j S,            S = sum_v a_v q_v                  (= 1 when unclipped: p - q)
  d RKL / dz_j     =  a_j p_j (g_j + 1) - p_j S,  S = sum_v a_v p_v (g_v + 1), g = log p - log q
                                                                                   (unclipped: p (g - RKL))
S is a global per-row scalar, so it is reduced in the forward's third all-reduce and backward is local. Without an
entropy gradient (the usual case: entropy is a metric) backward runs the log-prob-only kernel, so entropy costs one
multiply-add per entry in the forward pass and nothing else.

Kernels: the per-chunk math lives in plain functions on tensors (`_row_stats`, `_kl_terms`, `_student_grad`,
`_kl_grad`). `kernels="compiled"` runs them through torch.compile (inductor: fused C++ loops on CPU, Triton on GPU;
shapes dynamic, so any row count or shard width reuses the same compiled code; compiled once per process and
dtype; the student rows of the teacher rows are gathered inside the KL kernels, not copied out first);
`kernels="eager"` runs the very same functions op by op; "auto" (default) compiles on CUDA and stays eager
on CPU, where a compile costs tens of seconds and the tests' vocabularies are tiny.

Host syncs: none. Value checks that need one (targets inside the vocabulary, kl_rows in range, finite logits, one
owner per target) run only with `check_values=True` (or call `check_token_stats_values` once per step, outside the
micro-batch loop); shapes, dtypes and devices are always checked (no sync).

Memory: forward and backward run over chunks of `chunk_rows` rows; the kernels' temporaries are `chunk_rows x V/tp`
and nothing of size `V/tp` is kept between forward and backward (backward recomputes the softmax). bf16/fp16 inputs
with teacher rows take one extra fp32 `[K, V/tp]` buffer in backward, so a row's log-prob/entropy and KL gradients
are summed in fp32 and rounded once. Inputs are never modified.

Precision: math in fp32 (fp64 on fp64 inputs); vocabulary sums accumulate in fp64 on CPU (inductor's vectorised
fp32 sums lose ~1e-5 relative over a 150k-entry row) and in the math dtype on GPU (tree reductions).
log q - log p is formed from the raw logit difference (u - z) minus one per-row constant, so nearly agreeing rows
keep their small KL; probabilities are exp(z - max) / Z.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.fx.experimental._config  # noqa: F401 (use_duck_shape, patched around compiled calls)

from megatron_trace.distributed import collectives

__all__ = ["TokenStats", "token_stats", "check_token_stats_values", "Kernels"]

Kernels = Literal["auto", "compiled", "eager"]


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


# ------------------------------------------------------------------------------------------------------------------
# per-chunk kernels: pure functions of tensors, run eagerly or through torch.compile
# ------------------------------------------------------------------------------------------------------------------

def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # Vocabulary sums: fp64 accumulation on CPU (see the module docstring), the math dtype on GPU.
    return torch.float64 if x.device.type == "cpu" else x.dtype


def _row_stats(z: torch.Tensor, local_target: torch.Tensor):
    """Local (this shard's) row statistics of logits z [n, W] relative to the local row maximum m:
    (m, sum_v e^s, sum_v e^s s, z[target]) with s = z - m, each [n] in the math dtype; z[target] is taken at
    clamp(local_target, 0, W - 1) (the caller masks rows whose target this shard does not own)."""
    x = z.to(_math_dtype(z.dtype))
    m = x.amax(dim=-1)
    s = x - m.unsqueeze(-1)
    e = torch.exp(s)
    acc = _acc_dtype(x)
    sum_exp = e.sum(dim=-1, dtype=acc).to(x.dtype)
    moment = (e * s).sum(dim=-1, dtype=acc).to(x.dtype)
    picked = x.gather(1, local_target.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return m, sum_exp, moment, picked


def _kl_parts(zk, u, z_max, z_sum, u_max, u_sum, reverse, clip):
    """Per-vocab pieces of the KL of student rows zk and teacher rows u [n, W] (raw logits): (p, weight, ratio_log,
    terms, kept) -- p the student softmax; weight q (forward rows) / p (reverse rows); ratio_log log q - log p
    (forward) / log p - log q (reverse); terms = weight * ratio_log (unclipped); kept = terms < clip (the entries
    whose gradient is not zeroed by the clip). Forward and backward both call this, so the clip decisions agree."""
    dtype = _math_dtype(zk.dtype)
    x, y = zk.to(dtype), u.to(dtype)  # u - z in fp32, not in bf16
    # log q - log p = (u - z) - [(u_max - z_max) + (log Z_u - log Z_z)]: subtracting raw logits first keeps the
    # precision when teacher and student nearly agree (the large row offsets cancel in one constant).
    offset = (u_max - z_max) + (torch.log(u_sum) - torch.log(z_sum))
    log_ratio = (y - x) - offset.unsqueeze(-1)
    # exp(z - max) / Z rather than exp(z - log-sum-exp): large probabilities keep ~1 ulp of relative precision.
    p = torch.exp(x - z_max.unsqueeze(-1)) / z_sum.unsqueeze(-1)
    q = torch.exp(y - u_max.unsqueeze(-1)) / u_sum.unsqueeze(-1)
    rev = reverse.unsqueeze(-1)
    weight = torch.where(rev, p, q)
    ratio_log = torch.where(rev, -log_ratio, log_ratio)
    terms = weight * ratio_log
    kept = terms < clip
    return p, weight, ratio_log, terms, kept


def _student_rows(z, idx):
    # rows idx of z (idx None: z itself). Inside a compiled kernel the gather is an indirect load fused into the
    # loop, so the [n, W] student rows of the teacher rows are never copied out of the stored logits.
    return z if idx is None else z.index_select(0, idx)


def _kl_terms(z, idx, u, z_max, z_sum, u_max, u_sum, reverse, clip):
    """Partial (clipped) KL and clip correction S of n teacher rows u [n, W] against student rows z[idx] (idx None:
    z is [n, W] already): ([n], [n]). clip: 0-d tensor (inf = none)."""
    zk = _student_rows(z, idx)
    p, weight, ratio_log, terms, kept = _kl_parts(zk, u, z_max, z_sum, u_max, u_sum, reverse, clip)
    acc = _acc_dtype(p)
    kl = torch.minimum(terms, clip).sum(dim=-1, dtype=acc).to(p.dtype)
    factor = torch.where(reverse.unsqueeze(-1), ratio_log + 1.0, torch.ones_like(ratio_log))
    correction = torch.where(kept, weight * factor, torch.zeros_like(weight)).sum(dim=-1, dtype=acc).to(p.dtype)
    return kl, correction


def _kl_grad(z, idx, u, z_max, z_sum, u_max, u_sum, reverse, clip, correction, upstream):
    """upstream * d kl / d z of n teacher rows (student rows z[idx] as in _kl_terms), [n, W] in the math dtype:
    forward rows -(a q - p S), reverse rows a p (g + 1) - p S."""
    zk = _student_rows(z, idx)
    p, weight, ratio_log, _, kept = _kl_parts(zk, u, z_max, z_sum, u_max, u_sum, reverse, clip)
    rev = reverse.unsqueeze(-1)
    factor = torch.where(rev, ratio_log + 1.0, torch.ones_like(ratio_log))
    grad = torch.where(kept, weight * factor, torch.zeros_like(weight)) - p * correction.unsqueeze(-1)
    sign = torch.where(reverse, 1.0, -1.0).to(p.dtype)
    return grad * (sign * upstream.to(p.dtype)).unsqueeze(-1)


def _student_grad(out, z, z_max, alpha, beta, local_target, g_lp, extra, extra_rows):
    """Writes upstream * d(logprob, entropy) / dz of rows z [n, W] into `out` [n, W] (any float dtype):
    e_j (alpha s_j + beta) + g_lp [j == target], e = exp(s), s = z - max (alpha None: no entropy gradient, the
    log-prob-only kernel). extra [R, W] fp32 and extra_rows [n] (or None): rows of extra added before the single
    rounding into `out` (the KL gradient of bf16/fp16 inputs)."""
    x = z.to(_math_dtype(z.dtype))
    s = x - z_max.unsqueeze(-1)
    e = torch.exp(s)
    if alpha is None:
        g = e * beta.unsqueeze(-1)
    else:
        g = e * (alpha.unsqueeze(-1) * s + beta.unsqueeze(-1))
    cols = torch.arange(z.shape[1], device=z.device)
    # local_target outside [0, W) (another shard's target) never matches a column
    g = g + torch.where(cols.unsqueeze(0) == local_target.unsqueeze(-1), g_lp.unsqueeze(-1), torch.zeros_like(g))
    if extra is not None:
        g = g + extra.index_select(0, extra_rows)
    out.copy_(g)


_KERNELS = {f.__name__: f for f in (_row_stats, _kl_terms, _kl_grad, _student_grad)}
_COMPILED: dict[str, Callable] = {}


def _kernel(name: str, compiled: bool) -> Callable:
    """The kernel `name`, compiled once per process (torch.compile caches the code per dtype; dynamic=True so row
    counts and shard widths do not recompile)."""
    fn = _KERNELS[name]
    if not compiled:
        return fn
    c = _COMPILED.get(name)
    if c is None:
        c = _COMPILED[name] = _compile(fn)
    return c


def _compile(fn: Callable) -> Callable:
    compiled = torch.compile(fn, dynamic=True)

    def run(*args):
        # Detached arguments: no autograd graph is traced (backward is ours), requires_grad and a view's base
        # shape are not guarded on. No duck sizing: two sizes that happen to be equal at the first call (K + 1
        # and a chunk's rows) must not become a guard that recompiles at the next call.
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled(*args)

    return run


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] covering range(n) in pieces of `size` rows; a single trailing row joins the piece before it,
    so no piece has one row unless n == 1 or size == 1 (a compiled kernel specialises on size 1: a second
    compile)."""
    bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
    if size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _use_compiled(kernels: str, device: torch.device) -> bool:
    if kernels == "auto":
        return device.type == "cuda"
    if kernels not in ("compiled", "eager"):
        raise ValueError(f"kernels must be 'auto', 'compiled' or 'eager', got {kernels!r}")
    return kernels == "compiled"


# ------------------------------------------------------------------------------------------------------------------
# the chunked forward and backward, shared with the fused output layer (loss/fused_output.py)
# ------------------------------------------------------------------------------------------------------------------

class LogitSource:
    """Where the chunked math reads its logits. The plain version slices stored logits; the fused output layer
    (loss/fused_output.py) computes them chunk by chunk from hidden states and sinks gradients into matmuls.

    rows: T student rows; k_rows: K teacher rows; width: V/tp; dtype: the logits' dtype; device.
    """

    rows: int
    k_rows: int
    width: int
    dtype: torch.dtype
    device: torch.device

    def student(self, s: int, e: int) -> torch.Tensor:
        """Student logits of rows s:e, [e - s, W]."""
        raise NotImplementedError

    def student_at(self, idx: torch.Tensor) -> torch.Tensor:
        """Student logits of rows idx [n], [n, W]."""
        raise NotImplementedError

    def student_rows(self, idx: torch.Tensor):
        """(z, rows) with z[rows] the student logits of rows idx (rows None: z is [n, W]) -- the kernels' gather."""
        return self.student_at(idx), None

    def teacher(self, s: int, e: int) -> torch.Tensor:
        """Teacher logits of teacher rows s:e, [e - s, W] (no grad)."""
        raise NotImplementedError


class StoredLogits(LogitSource):
    def __init__(self, z: torch.Tensor, u: torch.Tensor):
        self.z, self.u = z, u
        self.rows, self.width = z.shape
        self.k_rows = u.shape[0]
        self.dtype, self.device = z.dtype, z.device

    def student(self, s, e):
        return self.z[s:e]

    def student_at(self, idx):
        return self.z.index_select(0, idx)

    def student_rows(self, idx):
        return self.z, idx  # gathered inside the kernel, not copied

    def teacher(self, s, e):
        return self.u[s:e]


def stats_forward(src: LogitSource, target, kl_rows, kl_reverse, vocab_start: int, clip: torch.Tensor, group,
                  chunk_rows: int, compiled: bool, check_values: bool = False):
    """The three-all-reduce forward. Returns (logprob [T], entropy [T], kl [K], saved) where saved holds the
    [T]/[K] row statistics backward needs (z_max, z_sum, entropy, u_max, u_sum, correction)."""
    dtype = _math_dtype(src.dtype)
    rows, k_rows, width, device = src.rows, src.k_rows, src.width, src.device
    row_stats = _kernel("_row_stats", compiled)

    # one pass over every row: local max, and sums relative to it
    local = torch.empty(4, rows + k_rows, dtype=dtype, device=device)  # [max | sum-exp | moment | target logit]
    local_target = target - vocab_start
    no_target = torch.full((min(chunk_rows, k_rows),), -1, dtype=torch.long, device=device)
    for s, e in chunks(rows, chunk_rows):
        for i, v in enumerate(row_stats(src.student(s, e), local_target[s:e])):
            local[i, s:e] = v
    for s, e in chunks(k_rows, chunk_rows):
        m, sum_exp, _, _ = row_stats(src.teacher(s, e), no_target[:e - s])
        local[0, rows + s:rows + e], local[1, rows + s:rows + e] = m, sum_exp

    # 1. MAX
    maxima = local[0].clone()
    _all_reduce(maxima, dist.ReduceOp.MAX, group)
    if check_values:
        _check_finite(maxima, rows)
    # 2. SUM: [sum-exp z | moment z | shifted target logit | target owners | sum-exp u], rescaled to the global max
    scale = torch.exp(local[0] - maxima)
    sums = torch.empty(4 * rows + k_rows, dtype=dtype, device=device)
    z_sum, z_moment, target_logit, owners, u_sum = sums.split([rows, rows, rows, rows, k_rows])
    torch.mul(local[1, :rows], scale[:rows], out=z_sum)
    torch.mul(scale[:rows], local[2, :rows] + (local[0, :rows] - maxima[:rows]) * local[1, :rows], out=z_moment)
    owned = (local_target >= 0) & (local_target < width)
    torch.where(owned, local[3, :rows] - maxima[:rows], torch.zeros((), dtype=dtype, device=device),
                out=target_logit)
    owners.copy_(owned)
    torch.mul(local[1, rows:], scale[rows:], out=u_sum)
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    if check_values:
        _check_owners(owners, target)
    z_max, u_max = maxima[:rows], maxima[rows:]
    z_log_sum = torch.log(z_sum)
    logprob = target_logit - z_log_sum
    entropy = z_log_sum - z_moment / z_sum  # H = log Z - E_p[z - max]: two non-negative terms, no cancellation

    # 3. SUM (teacher rows only): [partial KL | clip correction S]
    kl_parts = torch.zeros(2, k_rows, dtype=dtype, device=device)
    kl_terms = _kernel("_kl_terms", compiled)
    for s, e in chunks(k_rows, chunk_rows):
        idx = kl_rows[s:e]
        kl_parts[0, s:e], kl_parts[1, s:e] = kl_terms(
            *src.student_rows(idx), src.teacher(s, e), z_max.index_select(0, idx), z_sum.index_select(0, idx),
            u_max[s:e], u_sum[s:e], kl_reverse[s:e], clip)
    if k_rows:
        _all_reduce(kl_parts, dist.ReduceOp.SUM, group)
    saved = (z_max, z_sum, entropy, u_max, u_sum, kl_parts[1])
    return logprob, entropy, kl_parts[0].clone(), saved


def student_grad_coefficients(saved, g_logprob, g_entropy, rows, dtype, device):
    """Per-row (alpha, beta, g_lp) of the log-prob/entropy gradient e_j (alpha s_j + beta) + g_lp [j == target]:
    p_j (-g_lp - g_H (log p_j + H)) folded into two row constants. alpha is None without an entropy gradient."""
    z_max, z_sum, entropy = saved[:3]
    g_lp = g_logprob.to(dtype) if g_logprob is not None else torch.zeros(rows, dtype=dtype, device=device)
    if g_entropy is not None:
        g_h = g_entropy.to(dtype)
        alpha = -g_h / z_sum
        beta = (g_h * (torch.log(z_sum) - entropy) - g_lp) / z_sum
    else:
        alpha, beta = None, -g_lp / z_sum
    return alpha, beta, g_lp


def student_chunk_grad(out, z, saved, coeffs, local_target, s, e, compiled, extra=None, extra_rows=None):
    """Writes the log-prob/entropy gradient (+ extra rows) of student rows s:e, logits z [e - s, W], into out."""
    z_max = saved[0]
    alpha, beta, g_lp = coeffs
    _kernel("_student_grad", compiled)(out, z, z_max[s:e], None if alpha is None else alpha[s:e], beta[s:e],
                                       local_target[s:e], g_lp[s:e], extra, extra_rows)


def teacher_chunk_grad(src: LogitSource, saved, kl_rows, kl_reverse, clip, g_kl, s, e, compiled):
    """upstream * d kl / d z of teacher rows s:e: [e - s, W] in the math dtype, for student rows kl_rows[s:e]."""
    z_max, z_sum, _, u_max, u_sum, correction = saved
    idx = kl_rows[s:e]
    return _kernel("_kl_grad", compiled)(
        *src.student_rows(idx), src.teacher(s, e), z_max.index_select(0, idx), z_sum.index_select(0, idx), u_max[s:e],
        u_sum[s:e], kl_reverse[s:e], clip, correction[s:e], g_kl[s:e])


def _check_finite(maxima: torch.Tensor, rows: int) -> None:
    if not bool(torch.isfinite(maxima).all()):
        bad = int((~torch.isfinite(maxima)).nonzero()[0])
        which = f"student row {bad}" if bad < rows else f"teacher row {bad - rows}"
        raise ValueError(f"token_stats: logits must be finite; {which} has a NaN/inf maximum")


def _check_owners(owners: torch.Tensor, target: torch.Tensor) -> None:
    if owners.numel() and not bool((owners == 1).all()):
        bad = int((owners != 1).nonzero()[0])
        raise ValueError(
            f"token_stats: target id {int(target[bad])} of row {bad} is owned by {int(owners[bad])} vocab "
            f"shards (expected 1); check vocab_start on every rank")


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, target, u, kl_rows, kl_reverse, vocab_start, clip, group, chunk_rows, compiled,
                check_values):
        src = StoredLogits(z, u)
        logprob, entropy, kl, saved = stats_forward(src, target, kl_rows, kl_reverse, vocab_start, clip, group,
                                                    chunk_rows, compiled, check_values)
        ctx.save_for_backward(z, target, u, kl_rows, kl_reverse, clip, *saved)
        ctx.vocab_start, ctx.chunk_rows, ctx.compiled = vocab_start, chunk_rows, compiled
        ctx.set_materialize_grads(False)
        return logprob, entropy, kl

    @staticmethod
    def backward(ctx, g_logprob, g_entropy, g_kl):
        z, target, u, kl_rows, kl_reverse, clip, *saved = ctx.saved_tensors
        use_kl = g_kl is not None and kl_rows.numel() > 0
        nones = (None,) * 10
        if g_logprob is None and g_entropy is None and not use_kl:
            return (None,) + nones
        dtype = _math_dtype(z.dtype)
        rows, width = z.shape
        k_rows = kl_rows.numel()
        chunk, compiled = ctx.chunk_rows, ctx.compiled
        src = StoredLogits(z, u)
        grad = torch.empty_like(z)
        local_target = target - ctx.vocab_start
        need_student = g_logprob is not None or g_entropy is not None
        coeffs = student_grad_coefficients(saved, g_logprob, g_entropy, rows, dtype, z.device)
        direct = grad.dtype == dtype  # else the KL rows are summed in fp32 and rounded once with the rest
        acc = acc_rows = None
        if use_kl and not direct:
            # slot[k]: the first teacher row of student row kl_rows[k] (rows with two teacher rows share a slot);
            # acc_rows[t]: student row t's slot, K (a zero row) when it has none. No host sync.
            order = torch.arange(k_rows, device=z.device)
            first = torch.full((rows,), k_rows, dtype=torch.long, device=z.device)
            first.scatter_reduce_(0, kl_rows, order, reduce="amin")
            slot = first.index_select(0, kl_rows)
            acc = torch.zeros(k_rows + 1, width, dtype=dtype, device=z.device)
            for s, e in chunks(k_rows, chunk):
                acc.index_add_(0, slot[s:e], teacher_chunk_grad(src, saved, kl_rows, kl_reverse, clip, g_kl, s,
                                                                e, compiled))
            acc_rows = first
        for s, e in chunks(rows, chunk):
            if need_student:
                student_chunk_grad(grad[s:e], z[s:e], saved, coeffs, local_target, s, e, compiled, acc,
                                   None if acc_rows is None else acc_rows[s:e])
            elif acc is not None:  # KL gradient only
                grad[s:e].copy_(acc.index_select(0, acc_rows[s:e]))
            else:
                grad[s:e].zero_()
        if use_kl and direct:
            for s, e in chunks(k_rows, chunk):
                grad.index_add_(0, kl_rows[s:e], teacher_chunk_grad(src, saved, kl_rows, kl_reverse, clip, g_kl,
                                                                    s, e, compiled))
        return (grad,) + nones


def check_shapes(z, target, u, kl_rows, kl_reverse, vocab_start, group, chunk_rows, what="student_logits"):
    """Shape, dtype and device checks of token_stats' inputs (no host sync). z may be any [T, W] tensor."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"{what} must be [T, V/tp], got {getattr(z, 'shape', type(z))}")
    if not z.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {z.dtype}")
    rows, width = z.shape
    if width == 0:
        raise ValueError(f"{what} has an empty vocabulary shard (V/tp = 0)")
    if not isinstance(target, torch.Tensor) or target.shape != (rows,):
        raise ValueError(f"target_ids must be [T] = [{rows}], got {tuple(getattr(target, 'shape', ()))}")
    if target.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"target_ids must be an integer tensor, got {target.dtype}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    world = dist.get_world_size(group) if group is not None else 1
    vocab = width * world  # Megatron shards the (padded) vocabulary in equal slices
    if not 0 <= vocab_start <= vocab - width:
        raise ValueError(f"vocab_start={vocab_start} is outside [0, {vocab - width}] for shards of width {width} "
                         f"and tp={world}")
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
    if kl_reverse.shape != (k_rows,) or kl_reverse.dtype != torch.bool:
        raise ValueError(f"kl_reverse must be a bool [K] = [{k_rows}] tensor, got {kl_reverse.dtype} "
                         f"{tuple(kl_reverse.shape)}")


def check_token_stats_values(target_ids: torch.Tensor, vocab: int, kl_rows: torch.Tensor | None = None,
                             rows: int | None = None) -> None:
    """The checks that read tensor values (host syncs): every target id in [0, vocab), every kl_rows entry in
    [0, rows). Run once per step outside the micro-batch loop, or via token_stats(check_values=True)."""
    if target_ids.numel() and bool(((target_ids < 0) | (target_ids >= vocab)).any()):
        bad = int(((target_ids < 0) | (target_ids >= vocab)).nonzero()[0])
        raise ValueError(f"target_ids[{bad}] = {int(target_ids[bad])} is outside the vocabulary [0, {vocab})")
    if kl_rows is not None and kl_rows.numel():
        rows = target_ids.shape[0] if rows is None else rows
        if bool(((kl_rows < 0) | (kl_rows >= rows)).any()):
            bad = int(((kl_rows < 0) | (kl_rows >= rows)).nonzero()[0])
            raise ValueError(f"kl_rows[{bad}] = {int(kl_rows[bad])} is out of range for T={rows} student rows")


def prepare_teacher_args(rows: int, teacher, kl_rows, kl_reverse, kl_clip, device, teacher_name="teacher_logits"):
    """Defaults of kl_rows (arange(T) when K == T) / kl_reverse (all forward) and the clip as a 0-d tensor
    (inf = exact KL). Returns (kl_rows, kl_reverse, clip)."""
    if teacher is not None:
        if kl_rows is None:
            if teacher.dim() != 2 or teacher.shape[0] != rows:
                raise ValueError(f"kl_rows is required unless {teacher_name} has one row per student row "
                                 f"({teacher_name} {tuple(teacher.shape)}, {rows} student rows)")
            kl_rows = torch.arange(rows, device=device)
        if kl_reverse is None and teacher.dim() == 2:
            kl_reverse = torch.zeros(teacher.shape[0], dtype=torch.bool, device=device)
    if kl_clip is not None and not kl_clip > 0:
        raise ValueError(f"kl_clip must be a positive number of nats or None, got {kl_clip!r}")
    return kl_rows, kl_reverse, float("inf") if kl_clip is None else float(kl_clip)


def token_stats(student_logits: torch.Tensor, target_ids: torch.Tensor, *, vocab_start: int = 0, group=None,
                teacher_logits: torch.Tensor | None = None, kl_rows: torch.Tensor | None = None,
                kl_reverse: torch.Tensor | None = None, kl_clip: float | None = None,
                chunk_rows: int = 1024, kernels: Kernels = "auto", check_values: bool = False) -> TokenStats:
    """Log-prob of the targets, entropy and (clipped) KL to a teacher, from vocabulary-parallel logits.

    student_logits: [T, V/tp] this rank's vocab slice (bf16/fp16/fp32; fp64 computes in fp64), requires grad.
    target_ids: [T] global token ids (the same on every rank of `group`).
    vocab_start: global id of this shard's first column; shards are equal width, so the vocabulary is V/tp * tp.
    group: the tensor-parallel process group (None = a single shard, no communication).
    teacher_logits: [K, V/tp] teacher logits (no grad) for the student rows `kl_rows` [K] (indices into T;
        default arange(T) when K == T); `kl_reverse` [K] bool: False = forward KL(teacher || student), True =
        reverse KL(student || teacher) (default all False).
    kl_clip: clamp every per-vocab-entry KL term from above at this value (nats); None = exact KL.
    chunk_rows: rows processed at a time; the kernels' temporaries are a few chunk_rows x V/tp buffers.
    kernels: "compiled" (torch.compile), "eager" (the same functions op by op), "auto" (compiled on CUDA).
    check_values: also check the values (targets in the vocabulary, kl_rows in range, finite logits, one owner
        per target); costs host syncs, so the hot path leaves it off (see check_token_stats_values).

    Returns TokenStats(logprob [T], entropy [T], kl [K]) in fp32 (fp64 for fp64 input); kl is empty without a
    teacher. All collectives are issued in forward (3 with a teacher, 2 without); every rank of `group` must call
    with the same T, K, targets, kl_rows and kl_reverse.
    """
    z = student_logits
    kl_rows, kl_reverse, clip = prepare_teacher_args(z.shape[0] if z.dim() else 0, teacher_logits, kl_rows,
                                                     kl_reverse, kl_clip, z.device)
    check_shapes(z, target_ids, teacher_logits, kl_rows, kl_reverse, vocab_start, group, chunk_rows)
    compiled = _use_compiled(kernels, z.device)
    if check_values:
        world = dist.get_world_size(group) if group is not None else 1
        check_token_stats_values(target_ids, z.shape[1] * world, kl_rows, z.shape[0])
    if teacher_logits is None:
        teacher_logits = z.new_empty((0, z.shape[1])).detach()
        kl_rows = torch.zeros(0, dtype=torch.long, device=z.device)
        kl_reverse = torch.zeros(0, dtype=torch.bool, device=z.device)
    clip_t = torch.full((), clip, dtype=_math_dtype(z.dtype), device=z.device)  # a fill, not a host copy
    logprob, entropy, kl = _TokenStats.apply(z, target_ids.long(), teacher_logits, kl_rows.long(), kl_reverse,
                                             int(vocab_start), clip_t, group, chunk_rows, compiled, check_values)
    return TokenStats(logprob, entropy, kl)
