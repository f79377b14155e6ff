"""Forward+backward time and peak memory of the routed loss, against Megatron-Core's own vocab-parallel
cross-entropy, all methods in the same processes on the same inputs (local gloo ranks, fp32, one thread per rank).

Methods (each computes, then backpropagates, a random weighting of its outputs):
  megatron      megatron.core.tensor_parallel.vocab_parallel_cross_entropy: the log-prob only (the reference)
  lp            token_stats, log-prob gradient only (entropy computed for metrics, no gradient)   compiled kernels
  lp_eager      the same, eager kernels (the fallback)
  full          token_stats: log-prob + entropy + clipped (c = 0.05) forward/reverse KL on --kl-frac of the rows
  full_eager    the same, eager kernels
  separate      three vocab-parallel autograd functions (logprob, entropy, KL), each with its own collectives
  naive         all-gather the vocabulary, torch log_softmax / entropy / KL with autograd on the full rows
  out_stored    output layer (hidden [T, H] x weight [V/tp, H], and the teacher's on its K rows) then `full`
  out_fused     loss.fused_output.fused_output_loss: the same loss (a sum over rows), logits never stored, the
                gradient formed in the forward pass (loss.fused_output_grad: in_forward, the trainer's default)
  out_fused_recompute  loss.fused_output.fused_output_token_stats: the same, backward recomputes every logit block
                (loss.fused_output_grad: recompute)

- time: median over --repeats of fwd+bwd wall time on rank 0, after one untimed run (which compiles);
- memory: per-rank peak RSS during the untimed run minus RSS just before it (the peak is reset per method via
  /proc/self/clear_refs), max over ranks; inputs are allocated before, outputs and gradients are part of it;
- collectives: calls counted through wrappers of torch.distributed's collectives during one fwd+bwd.
The `|d lp|` column is the largest difference of the method's log-prob from Megatron's (-loss).

Usage: python benchmarks/bench_routed_loss.py [--rows 1024 4096] [--vocab 151936] [--tp 2] [--hidden 128]
       [--methods megatron lp full out_stored out_fused [out_fused_recompute]] [--repeats 5]
       [--fused-chunk-rows 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import dist_harness  # noqa: E402

from megatron_trace.loss.fused_output import RowLoss, fused_output_loss, fused_output_token_stats  # noqa: E402
from megatron_trace.loss.vocab_parallel import token_stats  # noqa: E402

CLIP = 0.05
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
               "broadcast")


# ------------------------------------------------------------------------------------------------------------------
# (b) the naive method
# ------------------------------------------------------------------------------------------------------------------

def _gather_vocab(shard: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return shard.detach().clone()
    rows, width = shard.shape
    out = torch.empty((world * rows, width), dtype=shard.dtype)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, shard.detach().contiguous(), group=group)
    return out.view(world, rows, width).permute(1, 0, 2).reshape(rows, world * width)


def naive_step(z, target, u, rows, reverse, weights, vocab_start, group):
    full = _gather_vocab(z, group).requires_grad_()
    log_p = torch.log_softmax(full, dim=-1)
    logprob = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    log_q = torch.log_softmax(_gather_vocab(u, group), dim=-1)
    lp_k = log_p[rows]
    terms = torch.where(reverse.unsqueeze(1), lp_k.exp() * (lp_k - log_q), log_q.exp() * (log_q - lp_k))
    kl = terms.clamp(max=CLIP).sum(-1)
    loss = (logprob * weights[0]).sum() + (entropy * weights[1]).sum() + (kl * weights[2]).sum()
    loss.backward()
    grad = full.grad[:, vocab_start:vocab_start + z.shape[1]].contiguous()
    return (logprob.detach(), entropy.detach(), kl.detach()), grad


# ------------------------------------------------------------------------------------------------------------------
# (c) three separate vocab-parallel functions, each with its own collectives
# ------------------------------------------------------------------------------------------------------------------

def _ar(t, op, group):
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class SeparateLogprob(torch.autograd.Function):
    """Megatron-style: MAX, then SUM of [sum-exp, target logit]; saves the softmax."""

    @staticmethod
    def forward(ctx, z, target, vocab_start, group):
        zf = z.float()
        m = _ar(zf.amax(-1), dist.ReduceOp.MAX, group)
        e = (zf - m.unsqueeze(1)).exp_()
        local = target - vocab_start
        owned = (local >= 0) & (local < z.shape[1])
        picked = torch.where(owned, zf.gather(1, local.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1) - m, 0.0)
        sums = _ar(torch.stack([e.sum(-1), picked]), dist.ReduceOp.SUM, group)
        softmax = e.div_(sums[0].unsqueeze(1))
        ctx.save_for_backward(softmax, local, owned)
        return sums[1] - sums[0].log()

    @staticmethod
    def backward(ctx, g):
        softmax, local, owned = ctx.saved_tensors
        grad = softmax.mul(-g.unsqueeze(1))
        idx = owned.nonzero().squeeze(1)
        grad[idx, local[idx]] += g[idx]
        return grad, None, None, None


class SeparateEntropy(torch.autograd.Function):
    """MAX, SUM of sum-exp, SUM of sum p log p; saves p and log p."""

    @staticmethod
    def forward(ctx, z, group):
        zf = z.float()
        m = _ar(zf.amax(-1), dist.ReduceOp.MAX, group)
        shifted = zf - m.unsqueeze(1)
        s = _ar(shifted.exp().sum(-1), dist.ReduceOp.SUM, group)
        log_p = shifted.sub_(s.log().unsqueeze(1))
        p = log_p.exp()
        h = -_ar((p * log_p).sum(-1), dist.ReduceOp.SUM, group)
        ctx.save_for_backward(p, log_p, h)
        return h

    @staticmethod
    def backward(ctx, g):
        p, log_p, h = ctx.saved_tensors
        return -(p * (log_p + h.unsqueeze(1))) * g.unsqueeze(1), None


class SeparateKL(torch.autograd.Function):
    """Clipped forward/reverse KL of K rows: MAX of both maxima, SUM of both sum-exps, SUM of [KL, S]."""

    @staticmethod
    def forward(ctx, z, u, rows, reverse, clip, group):
        zk = z[rows].float()
        uf = u.float()
        m = _ar(torch.cat([zk.amax(-1), uf.amax(-1)]), dist.ReduceOp.MAX, group)
        mz, mu = m.chunk(2)
        sz, su = _ar(torch.cat([(zk - mz.unsqueeze(1)).exp().sum(-1), (uf - mu.unsqueeze(1)).exp().sum(-1)]),
                     dist.ReduceOp.SUM, group).chunk(2)
        log_p = zk - mz.unsqueeze(1) - sz.log().unsqueeze(1)
        log_q = uf - mu.unsqueeze(1) - su.log().unsqueeze(1)
        p, q = log_p.exp(), log_q.exp()
        rev = reverse.unsqueeze(1)
        w = torch.where(rev, p, q)
        g = torch.where(rev, log_p - log_q, log_q - log_p)
        terms = w * g
        a = terms < clip
        factor = torch.where(rev, g + 1, torch.ones_like(g))
        parts = _ar(torch.cat([terms.clamp(max=clip).sum(-1), (w * factor * a).sum(-1)]), dist.ReduceOp.SUM, group)
        kl, s = parts.chunk(2)
        ctx.save_for_backward(p, w, factor, a, reverse, s, rows)
        ctx.rows_total = z.shape
        return kl

    @staticmethod
    def backward(ctx, g_kl):
        p, w, factor, a, reverse, s, rows = ctx.saved_tensors
        gk = w * factor * a - p * s.unsqueeze(1)
        gk = torch.where(reverse.unsqueeze(1), gk, -gk) * g_kl.unsqueeze(1)
        grad = torch.zeros(ctx.rows_total, dtype=gk.dtype)
        grad.index_add_(0, rows, gk)
        return grad, None, None, None, None, None


def separate_step(z, target, u, rows, reverse, weights, vocab_start, group):
    logprob = SeparateLogprob.apply(z, target, vocab_start, group)
    entropy = SeparateEntropy.apply(z, group)
    kl = SeparateKL.apply(z, u, rows, reverse, CLIP, group)
    loss = (logprob * weights[0]).sum() + (entropy * weights[1]).sum() + (kl * weights[2]).sum()
    loss.backward()
    return (logprob.detach(), entropy.detach(), kl.detach()), z.grad


def megatron_step(z, target, u, rows, reverse, weights, vocab_start, group, **_):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    x = z.detach().clone().requires_grad_()  # megatron works in place on fp32 logits
    loss = vocab_parallel_cross_entropy(x.unsqueeze(1), target.unsqueeze(1)).squeeze(1)
    (-(loss * weights[0]).sum()).backward()
    return (-loss.detach(),), x.grad


def token_stats_step(z, target, u, rows, reverse, weights, vocab_start, group, *, teacher, entropy_grad,
                     kernels, chunk_rows):
    kw = dict(teacher_logits=u, kl_rows=rows, kl_reverse=reverse, kl_clip=CLIP) if teacher else {}
    stats = token_stats(z, target, vocab_start=vocab_start, group=group, chunk_rows=chunk_rows, kernels=kernels,
                        **kw)
    loss = (stats.logprob * weights[0]).sum()
    if entropy_grad:
        loss = loss + (stats.entropy * weights[1]).sum()
    if teacher:
        loss = loss + (stats.kl * weights[2]).sum()
    loss.backward()
    return (stats.logprob.detach(), stats.entropy.detach(), stats.kl.detach()), z.grad


def out_stored_step(h, w, th, target, rows, reverse, weights, vocab_start, group, *, chunk_rows,
                    kernels="compiled", **_):
    z = h @ w.t()
    with torch.no_grad():
        u = th @ w.t()
    stats = token_stats(z, target, vocab_start=vocab_start, group=group, teacher_logits=u, kl_rows=rows,
                        kl_reverse=reverse, kl_clip=CLIP, chunk_rows=chunk_rows, kernels=kernels)
    loss = (stats.logprob * weights[0]).sum() + (stats.entropy * weights[1]).sum() + (stats.kl * weights[2]).sum()
    loss.backward()
    return (stats.logprob.detach(), stats.entropy.detach(), stats.kl.detach()), w.grad


def out_fused_step(h, w, th, target, rows, reverse, weights, vocab_start, group, *, fused_chunk_rows,
                   kernels="compiled", **_):
    row_loss = RowLoss(student=lambda lp, ent, s, e: lp * weights[0][s:e] + ent * weights[1][s:e],
                       kl_coef=weights[2])
    loss, stats = fused_output_loss(h, w, target, row_loss, vocab_start=vocab_start, group=group,
                                    teacher_hidden=th, kl_rows=rows, kl_reverse=reverse, kl_clip=CLIP,
                                    chunk_rows=fused_chunk_rows, kernels=kernels)
    loss.backward()
    return (stats.logprob, stats.entropy, stats.kl), w.grad


def out_fused_recompute_step(h, w, th, target, rows, reverse, weights, vocab_start, group, *, fused_chunk_rows,
                             kernels="compiled", **_):
    stats = fused_output_token_stats(h, w, target, vocab_start=vocab_start, group=group, teacher_hidden=th,
                                     kl_rows=rows, kl_reverse=reverse, kl_clip=CLIP, chunk_rows=fused_chunk_rows,
                                     kernels=kernels)
    loss = (stats.logprob * weights[0]).sum() + (stats.entropy * weights[1]).sum() + (stats.kl * weights[2]).sum()
    loss.backward()
    return (stats.logprob.detach(), stats.entropy.detach(), stats.kl.detach()), w.grad


def _plain(step):
    def run(z, target, u, rows, reverse, weights, vocab_start, group, **_):
        return step(z, target, u, rows, reverse, weights, vocab_start, group)
    return run


def _ts(**fixed):
    def run(z, target, u, rows, reverse, weights, vocab_start, group, *, chunk_rows, **_):
        return token_stats_step(z, target, u, rows, reverse, weights, vocab_start, group, chunk_rows=chunk_rows,
                                **fixed)
    return run


STEPS = {
    "megatron": megatron_step,
    "lp": _ts(teacher=False, entropy_grad=False, kernels="compiled"),
    "lp_eager": _ts(teacher=False, entropy_grad=False, kernels="eager"),
    "full": _ts(teacher=True, entropy_grad=True, kernels="compiled"),
    "full_eager": _ts(teacher=True, entropy_grad=True, kernels="eager"),
    "separate": _plain(separate_step),
    "naive": _plain(naive_step),
}
OUTPUT_STEPS = {"out_stored": out_stored_step, "out_fused": out_fused_step,
                "out_fused_recompute": out_fused_recompute_step}


# ------------------------------------------------------------------------------------------------------------------
# every method on every rank, in one process per rank
# ------------------------------------------------------------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(rank, world, methods, rows, vocab, hidden, kl_frac, repeats, chunk_rows, fused_chunk_rows):
    from megatron_trace.distributed import initialize_distributed

    torch.set_num_threads(1)
    initialize_distributed(tp=world)
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    width = vocab // world
    g = torch.Generator().manual_seed(1234)  # same targets / rows / hidden states on every rank
    target = torch.randint(0, vocab, (rows,), generator=g)
    k = int(rows * kl_frac)
    kl_rows = torch.randperm(rows, generator=g)[:k].sort().values
    reverse = torch.rand(k, generator=g) < 0.5
    weights = [torch.randn(rows, generator=g), torch.randn(rows, generator=g), torch.randn(k, generator=g)]
    gs = torch.Generator().manual_seed(99 + rank)  # each rank its own vocab slice
    inputs = {}
    if any(m in STEPS for m in methods):
        z = (torch.randn(rows, width, generator=gs) * 3.0).requires_grad_()
        u = z.detach()[kl_rows] + torch.randn(k, width, generator=gs) * 1.0
        inputs["logits"] = (z, u)
    if any(m in OUTPUT_STEPS for m in methods):
        h = torch.randn(rows, hidden, generator=g).requires_grad_()
        w = (torch.randn(width, hidden, generator=gs) * (3.0 / hidden ** 0.5)).requires_grad_()
        th = h.detach()[kl_rows] + torch.randn(k, hidden, generator=g) * 0.3
        inputs["hidden"] = (h, w, th)
    kw = dict(chunk_rows=chunk_rows, fused_chunk_rows=fused_chunk_rows)

    def call(method):
        if method in STEPS:
            z, u = inputs["logits"]
            out = STEPS[method](z, target, u, kl_rows, reverse, weights, rank * width, group, **kw)
            z.grad = None
        else:
            h, w, th = inputs["hidden"]
            out = OUTPUT_STEPS[method](h, w, th, target, kl_rows, reverse, weights, rank * width, group, **kw)
            h.grad = w.grad = None
        return out

    counts = {name: 0 for name in COLLECTIVES}
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name):
        def fn(*a, **kwargs):
            counts[name] += 1
            return saved[name](*a, **kwargs)
        return fn

    results = {}
    for method in methods:
        for name in counts:
            counts[name] = 0
        dist.barrier()
        base = _rss()
        _reset_peak()
        for name in saved:
            setattr(dist, name, counting(name))
        outs, _ = call(method)
        for name in saved:
            setattr(dist, name, saved[name])
        peak = _peak() - base
        logprob = outs[0].clone()
        del outs
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            call(method)
            times.append(time.perf_counter() - t0)
        results[method] = dict(times=times, peak=peak, counts={k: v for k, v in counts.items() if v},
                               logprob=logprob)
        if rank == 0:  # progress, in case a later method fails
            print(f"    [rank 0] T={rows} {method}: times {['%.3f' % t for t in times]} s, peak extra RSS "
                  f"{peak / 2**30:.2f} GiB", flush=True)
    # agreement with megatron's log-prob (same logits) and between the two output-layer methods
    ref = {"megatron": [m for m in methods if m in STEPS], "out_stored": [m for m in methods if m in OUTPUT_STEPS]}
    for base_name, members in ref.items():
        if base_name in results:
            for m in members:
                results[m]["diff"] = float((results[m]["logprob"] - results[base_name]["logprob"]).abs().max())
    for r in results.values():
        del r["logprob"]
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=128, help="H of the output-layer methods")
    ap.add_argument("--kl-frac", type=float, default=0.25)
    ap.add_argument("--tp", type=int, nargs="+", default=[2])
    ap.add_argument("--methods", nargs="+", default=["megatron", "lp", "full", "out_stored", "out_fused"],
                    choices=list(STEPS) + list(OUTPUT_STEPS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--fused-chunk-rows", type=int, default=512,
                    help="chunk_rows of the fused output layer (512: the library default the trainer runs)")
    args = ap.parse_args()

    print(f"V={args.vocab}, KL rows {args.kl_frac:.0%} (clip {CLIP}), H={args.hidden} (output-layer methods), "
          f"fp32, gloo, median of {args.repeats}, chunk_rows={args.chunk_rows} "
          f"(fused output: {args.fused_chunk_rows}), torch threads/rank=1", flush=True)
    table = []
    for tp in args.tp:
        for rows in args.rows:
            per_rank = dist_harness.run_distributed(worker, tp, args.methods, rows, args.vocab, args.hidden,
                                                    args.kl_frac, args.repeats, args.chunk_rows,
                                                    args.fused_chunk_rows, timeout=7200)
            for method in args.methods:
                r0 = per_rank[0][method]
                r = dict(time=statistics.median(r0["times"]), times=r0["times"], counts=r0["counts"],
                         peak=max(pr[method]["peak"] for pr in per_rank), diff=r0.get("diff"))
                print(f"  tp={tp} T={rows} {method:10s} times {['%.3f' % t for t in r['times']]} s", flush=True)
                table.append((tp, rows, method, r))

    print()
    print("| TP | T | method | fwd+bwd median (s) | vs megatron | peak extra RSS / rank (GiB) | vs out_stored "
          "| collectives / call | max abs d logprob vs reference |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_key = {(tp, rows, m): r for tp, rows, m, r in table}
    for tp, rows, method, r in table:
        meg = by_key.get((tp, rows, "megatron"))
        stored = by_key.get((tp, rows, "out_stored"))
        vs_meg = f"{r['time'] / meg['time']:.2f}x" if meg is not None and method in STEPS else "-"
        if stored is not None and method in OUTPUT_STEPS:
            vs_stored = f"time {r['time'] / stored['time']:.2f}x, memory {r['peak'] / max(stored['peak'], 1):.2f}x"
        else:
            vs_stored = "-"
        coll = ", ".join(f"{v} {k}" for k, v in sorted(r["counts"].items())) or "0"
        diff = "-" if r["diff"] is None else f"{r['diff']:.1e}"
        print(f"| {tp} | {rows} | {method} | {r['time']:.3f} | {vs_meg} | {r['peak'] / 2**30:.2f} | {vs_stored} "
              f"| {coll} | {diff} |")


if __name__ == "__main__":
    main()
