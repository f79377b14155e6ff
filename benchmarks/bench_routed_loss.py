"""Forward+backward time and peak memory of the routed loss statistics, three ways, on local gloo ranks.

  (a) fused:    megatron_trace.loss.vocab_parallel.token_stats (3 all-reduces, chunked, recompute in backward)
  (b) naive:    all-gather the vocabulary, torch log_softmax / entropy / KL with autograd on the full rows
  (c) separate: three vocab-parallel autograd functions (logprob, entropy, KL), each with its own collectives

Every method computes logprob [T], entropy [T] and the clipped (c = 0.05) forward/reverse KL of K = kl_frac * T rows
and backpropagates a random weighting of all three. Each (method, tp) runs in fresh processes:
- time: median over --repeats of fwd+bwd wall time on rank 0 (after one untimed run);
- memory: per-rank peak RSS during the first fwd+bwd minus RSS just before it (`resource.getrusage` ru_maxrss,
  a fresh process each time, so the peak belongs to that method), max over ranks. The inputs are allocated before
  the baseline; the gradient of the student logits is part of the delta for every method.
- collectives: calls counted through wrappers of torch.distributed's collectives during one fwd+bwd.
A checksum line per method shows they compute the same numbers.

Usage: python benchmarks/bench_routed_loss.py [--rows 4096] [--vocab 151936] [--tp 1 2] [--methods fused naive
separate] [--repeats 3] [--naive-rows N]   (--naive-rows runs (b) and a same-size (a) at N rows where the full
vocabulary does not fit in memory)
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import dist_harness  # noqa: E402

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


def fused_step(z, target, u, rows, reverse, weights, vocab_start, group, chunk_rows=1024):
    stats = token_stats(z, target, vocab_start=vocab_start, group=group, teacher_logits=u, kl_rows=rows,
                        kl_reverse=reverse, kl_clip=CLIP, chunk_rows=chunk_rows)
    loss = (stats.logprob * weights[0]).sum() + (stats.entropy * weights[1]).sum() + (stats.kl * weights[2]).sum()
    loss.backward()
    return (stats.logprob.detach(), stats.entropy.detach(), stats.kl.detach()), z.grad


STEPS = {"fused": fused_step, "naive": naive_step, "separate": separate_step}


# ------------------------------------------------------------------------------------------------------------------
# one (method, tp) measurement on every rank
# ------------------------------------------------------------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(rank, world, method, rows, vocab, kl_frac, repeats, chunk_rows):
    torch.set_num_threads(1)
    group = dist.group.WORLD
    width = vocab // world
    g = torch.Generator().manual_seed(1234)  # same targets / rows on every rank
    target = torch.randint(0, vocab, (rows,), generator=g)
    k = int(rows * kl_frac)
    kl_rows = torch.randperm(rows, generator=g)[:k].sort().values
    reverse = torch.rand(k, generator=g) < 0.5
    weights = [torch.randn(rows, generator=g), torch.randn(rows, generator=g), torch.randn(k, generator=g)]
    gs = torch.Generator().manual_seed(99 + rank)  # each rank its own vocab slice
    z = (torch.randn(rows, width, generator=gs) * 3.0).requires_grad_()
    u = z.detach()[kl_rows] + torch.randn(k, width, generator=gs) * 1.0
    step = STEPS[method]
    kwargs = dict(chunk_rows=chunk_rows) if method == "fused" else {}

    counts = {name: 0 for name in COLLECTIVES}
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name):
        def call(*a, **kw):
            counts[name] += 1
            return saved[name](*a, **kw)
        return call

    dist.barrier()
    base = _rss()
    for name in saved:
        setattr(dist, name, counting(name))
    outs, grad = step(z, target, u, kl_rows, reverse, weights, rank * width, group, **kwargs)
    for name in saved:
        setattr(dist, name, saved[name])
    peak = _peak_rss() - base
    checksum = [float(o.double().sum()) for o in outs] + [float(grad.double().norm())]
    del outs, grad
    z.grad = None
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step(z, target, u, kl_rows, reverse, weights, rank * width, group, **kwargs)
        times.append(time.perf_counter() - t0)
        z.grad = None
    return dict(times=times, peak=peak, counts={k: v for k, v in counts.items() if v}, checksum=checksum)


def measure(method, tp, rows, vocab, kl_frac, repeats, chunk_rows):
    results = dist_harness.run_distributed(worker, tp, method, rows, vocab, kl_frac, repeats, chunk_rows,
                                           timeout=3600)
    return dict(time=statistics.median(results[0]["times"]), times=results[0]["times"],
                peak=max(r["peak"] for r in results), counts=results[0]["counts"], checksum=results[0]["checksum"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--kl-frac", type=float, default=0.25)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=["fused", "naive", "separate"], choices=list(STEPS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--naive-rows", type=int, default=None,
                    help="rows for (b) and a same-size (a) when the full vocabulary does not fit at --rows")
    args = ap.parse_args()

    print(f"T={args.rows} V={args.vocab} K={int(args.rows * args.kl_frac)} ({args.kl_frac:.0%} KL rows, clip {CLIP}),"
          f" fp32, gloo, {args.repeats} timed repeats, chunk_rows={args.chunk_rows}, torch threads/rank=1")
    table = []
    for tp in args.tp:
        plan = []
        for method in args.methods:
            rows = args.rows
            if method == "naive" and args.naive_rows:
                rows = args.naive_rows
            plan.append((method, rows))
        if "naive" in args.methods and args.naive_rows and "fused" in args.methods:
            plan.append(("fused", args.naive_rows))
        seen = {}
        for method, rows in plan:
            r = measure(method, tp, rows, args.vocab, args.kl_frac, args.repeats, args.chunk_rows)
            seen[(method, rows)] = r
            print(f"  tp={tp} {method:8s} T={rows}: times {['%.2f' % t for t in r['times']]} s, "
                  f"checksum {['%.6g' % c for c in r['checksum']]}", flush=True)
        for (method, rows), r in seen.items():
            ref = seen.get(("naive", rows))
            table.append((tp, method, rows, r, ref))

    print()
    print(f"| TP | method | T | fwd+bwd median (s) | peak extra RSS / rank (GiB) | collectives / call "
          f"| time vs naive | memory vs naive |")
    print("|---|---|---|---|---|---|---|---|")
    for tp, method, rows, r, ref in table:
        coll = ", ".join(f"{v} {k}" for k, v in sorted(r["counts"].items())) or "0"
        if ref is not None:
            t_ratio = f"{ref['time'] / r['time']:.2f}x faster" if method != "naive" else "1"
            m_ratio = f"{r['peak'] / ref['peak']:.2f}x" if method != "naive" else "1"
        else:
            t_ratio = m_ratio = "-"
        print(f"| {tp} | {method} | {rows} | {r['time']:.2f} | {r['peak'] / 2**30:.2f} | {coll} | {t_ratio} "
              f"| {m_ratio} |")


if __name__ == "__main__":
    main()
