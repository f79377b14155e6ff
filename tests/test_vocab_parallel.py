"""token_stats against a float64 full-vocabulary reference written plainly here, at TP = 1, 2, 4 (gloo).

Tolerance: fp32 math is held to 1e-6 relative.
- Values: relative to max(|reference|, 1 nat). A KL of 5e-7 nats between nearly agreeing rows is the difference of
  two O(1) log-normalisers, which fp32 resolves to ~1e-7 nats whatever the algorithm.
- Gradients: 1e-6 of the largest reference entry of the same gradient tensor, plus 4x the input-precision noise:
  how much the float64 reference itself moves when every input logit is perturbed by one fp32 ulp. That noise is
  what fp32 arithmetic cannot avoid (a reverse-KL gradient p (g - RKL) with log-ratios g ~ 30 nats at logit std 10
  carries ~30 ulp of absolute error in g); elsewhere it is far below the 1e-6 term.
NaN never passes (comparisons use `<=`, which is False for NaN).
"""

from __future__ import annotations

import pytest
import torch

import dist_harness
from megatron_trace.loss.vocab_parallel import TokenStats, token_stats

RTOL = 1e-6
OTHER_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "reduce",
                     "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv",
                     "barrier")


# --------------------------------------------------------------------------------------------------------------
# cases and the float64 reference
# --------------------------------------------------------------------------------------------------------------

# (seed, T, V, K, logit std, clip, chunk_rows); V = 1024 is a power of two, 1000 and 12 are not.
CASES = [
    (0, 7, 1000, 5, 1.0, None, 3),
    (1, 7, 1000, 5, 10.0, None, 2),
    (2, 9, 1024, 6, 3.0, 0.05, 4),
    (3, 9, 1024, 6, 10.0, 0.05, 1024),
    (4, 5, 12, 4, 5.0, 0.01, 2),
    (5, 16, 1000, 9, 10.0, 1e-3, 5),
    (6, 3, 151936, 3, 4.0, 0.05, 2),  # the Qwen3 vocabulary: long reductions must stay accurate
]


def make_case(seed, T, V, K, std, clip, chunk_rows):
    """Full-vocabulary inputs: student [T, V], targets [T], teacher [K, V] for rows (unsorted, one duplicate),
    each teacher row either nearly agreeing with its student row (u = z + 1e-3 std noise) or strongly disagreeing
    (independent logits of the same scale); upstream gradients for the three outputs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, V, generator=g) * std
    target = torch.randint(0, V, (T,), generator=g)
    rows = torch.randperm(T, generator=g)[:K]
    rows[-1] = rows[0]  # a student row with two teacher rows
    reverse = torch.rand(K, generator=g) < 0.5
    reverse[0], reverse[1] = False, True
    near = torch.rand(K, generator=g) < 0.5
    near[0], near[1], near[2] = True, True, False
    noise_scale = torch.where(near, 1e-3 * std, 1.0 * std).unsqueeze(1)
    u = torch.where(near.unsqueeze(1), z[rows], torch.zeros(()))
    u = u + torch.randn(K, V, generator=g) * noise_scale
    w = [torch.randn(T, generator=g), torch.randn(T, generator=g), torch.randn(K, generator=g)]
    return dict(z=z, target=target, u=u, rows=rows, reverse=reverse, clip=clip, chunk_rows=chunk_rows, w=w)


def reference(c, ulp_seed=None):
    """float64, full vocabulary, plain torch autograd: returns values (logprob, entropy, kl) and their gradients
    w.r.t. the student logits under upstream weights w (each alone, then all together). With `ulp_seed`, every
    input logit is first moved by one fp32 ulp in a random direction (to measure the input-precision noise)."""
    z, u = c["z"].double(), c["u"].double()
    if ulp_seed is not None:
        g = torch.Generator().manual_seed(ulp_seed)
        for t in (z, u):
            ulp = (torch.nextafter(t.float(), torch.tensor(float("inf"))).double() - t)
            t.add_(ulp * (torch.randint(0, 2, t.shape, generator=g) * 2 - 1))
    z = z.requires_grad_()
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    logprob = log_p.gather(1, c["target"].unsqueeze(1)).squeeze(1)
    entropy = -(p * log_p).sum(-1)
    log_q = torch.log_softmax(u, dim=-1)
    q = log_q.exp()
    lp_k, p_k = log_p[c["rows"]], p[c["rows"]]
    terms = torch.where(c["reverse"].unsqueeze(1), p_k * (lp_k - log_q), q * (log_q - lp_k))
    if c["clip"] is not None:
        terms = torch.clamp(terms, max=c["clip"])
    kl = terms.sum(-1)
    outs = (logprob, entropy, kl)
    grads = [torch.autograd.grad(o, z, w.double(), retain_graph=True)[0] for o, w in zip(outs, c["w"])]
    grads.append(grads[0] + grads[1] + grads[2])
    return [o.detach() for o in outs], grads


# --------------------------------------------------------------------------------------------------------------
# what one rank runs: its vocab shard, counted collectives, snapshots of the inputs
# --------------------------------------------------------------------------------------------------------------

class CollectiveCounter:
    """Wraps torch.distributed.all_reduce (and fails on any other collective) while active."""

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.count, self.saved = dist, 0, {}

    def __enter__(self):
        self.saved["all_reduce"] = self.dist.all_reduce

        def counted(*args, **kwargs):
            self.count += 1
            return self.saved["all_reduce"](*args, **kwargs)

        self.dist.all_reduce = counted
        for name in OTHER_COLLECTIVES:
            if hasattr(self.dist, name):
                self.saved[name] = getattr(self.dist, name)

                def forbidden(*args, _name=name, **kwargs):
                    raise AssertionError(f"token_stats called dist.{_name}")

                setattr(self.dist, name, forbidden)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)


def run_shard(rank, world, c, dtype=torch.float32, group=None, with_teacher=True, kernels="eager"):
    V = c["z"].shape[1]
    W = V // world
    sl = slice(rank * W, (rank + 1) * W)
    z = c["z"][:, sl].to(dtype).clone().requires_grad_()
    u = c["u"][:, sl].to(dtype).clone() if with_teacher else None
    target, rows, reverse = c["target"].clone(), c["rows"].clone(), c["reverse"].clone()
    before = [t.detach().clone() for t in (z, target, rows, reverse)] + ([u.clone()] if with_teacher else [])
    teacher = dict(teacher_logits=u, kl_rows=rows, kl_reverse=reverse, kl_clip=c["clip"]) if with_teacher else {}
    with CollectiveCounter() as fwd_count:
        stats = token_stats(z, target, vocab_start=rank * W, group=group, chunk_rows=c["chunk_rows"], kernels=kernels,
                            **teacher)
    outs = (stats.logprob, stats.entropy, stats.kl)
    grads = []
    with CollectiveCounter() as bwd_count:
        n = 3 if with_teacher else 2
        for o, w in zip(outs[:n], c["w"][:n]):
            grads.append(torch.autograd.grad(o, z, w.to(o.dtype), retain_graph=True)[0])
        total = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs[:n], c["w"][:n]))
        total.backward()
        grads.append(z.grad)
    after = [t.detach() for t in (z, target, rows, reverse)] + ([u] if with_teacher else [])
    unchanged = all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(before, after))
    return dict(outs=[o.detach().double() for o in outs], out_dtypes=[o.dtype for o in outs],
                grads=[g.double() for g in grads], grad_dtype=grads[0].dtype, fwd_collectives=fwd_count.count,
                bwd_collectives=bwd_count.count, unchanged=unchanged)


def _portable(result):
    """Tensors -> numpy arrays, so results survive the rank process exiting (no shared-memory handles)."""
    return {k: [t.numpy() for t in v] if k in ("outs", "grads") else v for k, v in result.items()}


def _tensors(result):
    return {k: [torch.from_numpy(t) for t in v] if k in ("outs", "grads") else v for k, v in result.items()}


def rank_main(rank, world, specs, dtypes, kernels="eager"):
    import torch.distributed as dist
    group = dist.new_group(list(range(world)))
    results = []
    for spec in specs:
        c = make_case(*spec)
        for dtype in dtypes:
            results.append(_portable(run_shard(rank, world, c, dtype, group, kernels=kernels)))
        results.append(_portable(run_shard(rank, world, c, torch.float32, group, with_teacher=False,
                                           kernels=kernels)))
    return results


# --------------------------------------------------------------------------------------------------------------
# checks, shared by every TP size
# --------------------------------------------------------------------------------------------------------------

def assert_values_close(got, ref, what):
    err = (got - ref).abs()
    bound = RTOL * ref.abs().clamp(min=1.0)
    ok = err <= bound
    assert bool(ok.all()), f"{what}: max error {err.max():.3e} (worst relative {(err / bound).max():.2f}x tolerance)"


def assert_grads_close(got, ref, what, rtol=RTOL, noise=0.0):
    err = (got - ref).abs().max()
    bound = rtol * ref.abs().max() + 4 * noise
    assert bool(err <= bound), f"{what}: max error {err:.3e} > {bound:.3e} (1e-6 max|ref| + 4 x {noise:.1e} noise)"


def input_noise(c, ref_grads):
    """Largest change of each reference gradient when the inputs move by one fp32 ulp (two random draws)."""
    noise = [torch.zeros((), dtype=torch.float64)] * len(ref_grads)
    for seed in (11, 12):
        moved = reference(c, ulp_seed=seed)[1]
        noise = [torch.maximum(n, (m - r).abs().max()) for n, m, r in zip(noise, moved, ref_grads)]
    return noise


def check_results(per_rank, world, dtypes):
    idx = 0
    for spec in CASES:
        c = make_case(*spec)
        ref_outs, ref_grads = reference(c)
        noise = input_noise(c, ref_grads)
        for dtype in dtypes + [None]:
            shards = [r[idx] for r in per_rank]
            idx += 1
            tag = f"tp={world} case={spec} dtype={dtype or 'fp32 (no teacher)'}"
            with_teacher = dtype is not None
            n = 3 if with_teacher else 2
            for s in shards:
                assert s["unchanged"], f"{tag}: inputs modified"
                assert s["fwd_collectives"] == (n if world > 1 else 0), f"{tag}: {s['fwd_collectives']} collectives"
                assert s["bwd_collectives"] == 0, f"{tag}: backward communicated"
                assert s["out_dtypes"][0] == torch.float32
            # every rank returns the same statistics
            for s in shards[1:]:
                for a, b in zip(s["outs"], shards[0]["outs"]):
                    assert torch.equal(a, b), f"{tag}: ranks disagree"
            if dtype == torch.bfloat16:
                # Reference from the bf16-rounded inputs: the math is still fp32, only the gradient is stored bf16.
                cb = dict(c, z=c["z"].bfloat16().double(), u=c["u"].bfloat16().double())
                outs_b, grads_b = reference(cb)
                for o, r, name in zip(shards[0]["outs"], outs_b, ("logprob", "entropy", "kl")):
                    assert_values_close(o, r, f"{tag} {name}")
                for i in range(4):
                    g = torch.cat([s["grads"][i] for s in shards], dim=1)
                    assert shards[0]["grad_dtype"] == torch.bfloat16
                    assert_grads_close(g, grads_b[i], f"{tag} grad[{i}]", rtol=2 ** -8)
                continue
            names = ("logprob", "entropy", "kl")[:n]
            for o, r, name in zip(shards[0]["outs"], ref_outs, names):
                assert_values_close(o, r, f"{tag} {name}")
            if not with_teacher:
                assert shards[0]["outs"][2].numel() == 0
            ref_g = ref_grads[:n] + [sum(ref_grads[:n])]
            noise_g = noise[:n] + [sum(noise[:n])]
            for i, (name, r) in enumerate(zip(list(names) + ["all"], ref_g)):
                g = torch.cat([s["grads"][i] for s in shards], dim=1)
                assert_grads_close(g, r, f"{tag} d{name}/dz", noise=noise_g[i])


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("kernels", ["eager", "compiled"])
def test_token_stats_match_float64_reference_at_tp1(kernels):
    """One shard (group=None): values and gradients of logprob, entropy, FKL/RKL (clipped and exact), on the
    eager kernels and on the torch.compile'd ones."""
    torch.manual_seed(0)
    results = rank_main_local(kernels)
    check_results([results], 1, DTYPES)


def rank_main_local(kernels="eager"):
    results = []
    for spec in CASES:
        c = make_case(*spec)
        for dtype in DTYPES:
            results.append(run_shard(0, 1, c, dtype, None, kernels=kernels))
        results.append(run_shard(0, 1, c, torch.float32, None, with_teacher=False, kernels=kernels))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world, dtypes, kernels", [(2, DTYPES, "eager"), (4, [torch.float32], "eager"),
                                                    (2, [torch.float32], "compiled")])
def test_token_stats_match_float64_reference_across_vocab_shards(world, dtypes, kernels):
    """TP = 2 and 4 over gloo: same values on every rank, gradient shards assemble to the full-vocab gradient,
    exactly 3 all-reduces (2 without a teacher) in forward, none in backward, inputs untouched. (bf16 storage is
    checked at TP = 1 and 2; TP = 4 adds nothing dtype-specific; the compiled kernels, checked in full at TP = 1,
    run fp32 at TP = 2.)"""
    assert all(spec[2] % world == 0 for spec in CASES)
    per_rank = dist_harness.run_distributed(rank_main, world, CASES, dtypes, kernels)
    check_results([[_tensors(r) for r in rank] for rank in per_rank], world, dtypes)


def test_clipping_is_exercised_by_the_cases():
    """Guard for the suite itself: the clipped cases really clip some, but not all, vocab terms."""
    for spec in CASES:
        c = make_case(*spec)
        if c["clip"] is None:
            continue
        exact = reference(dict(c, clip=None))[0][2]
        clipped = reference(c)[0][2]
        changed = (exact - clipped).abs() > 1e-6
        assert bool(changed.any()) and not bool(changed.all()), spec


# --------------------------------------------------------------------------------------------------------------
# claims from docs/design.md ("Vocabulary-parallel statistics"), each on its own
# --------------------------------------------------------------------------------------------------------------

def _f64(*shape, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def test_forward_kl_gradient_is_p_minus_q():
    z = _f64(3, 11).requires_grad_()
    u = _f64(3, 11, seed=1)
    stats = token_stats(z, torch.zeros(3, dtype=torch.long), teacher_logits=u)
    (g,) = torch.autograd.grad(stats.kl.sum(), z)
    expected = torch.softmax(z.detach(), -1) - torch.softmax(u, -1)
    assert torch.allclose(g, expected, rtol=0, atol=1e-14)


def test_reverse_kl_gradient_is_p_times_log_ratio_minus_kl():
    z = _f64(3, 11).requires_grad_()
    u = _f64(3, 11, seed=1)
    stats = token_stats(z, torch.zeros(3, dtype=torch.long), teacher_logits=u,
                        kl_reverse=torch.ones(3, dtype=torch.bool))
    (g,) = torch.autograd.grad(stats.kl.sum(), z)
    log_p, log_q = torch.log_softmax(z.detach(), -1), torch.log_softmax(u, -1)
    rkl = (log_p.exp() * (log_p - log_q)).sum(-1, keepdim=True)
    expected = log_p.exp() * (log_p - log_q - rkl)
    assert torch.allclose(g, expected, rtol=0, atol=1e-14)


def test_logprob_gradient_is_onehot_minus_p():
    z = _f64(4, 9).requires_grad_()
    target = torch.tensor([0, 8, 3, 3])
    (g,) = torch.autograd.grad(token_stats(z, target).logprob.sum(), z)
    expected = torch.nn.functional.one_hot(target, 9).double() - torch.softmax(z.detach(), -1)
    assert torch.allclose(g, expected, rtol=0, atol=1e-14)


def test_chunk_size_does_not_change_results():
    c = make_case(*CASES[3])
    a = run_shard(0, 1, dict(c, chunk_rows=1), torch.float32)
    b = run_shard(0, 1, dict(c, chunk_rows=1000), torch.float32)
    for x, y in zip(a["outs"] + a["grads"], b["outs"] + b["grads"]):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("output", ["logprob", "entropy", "kl"])
def test_gradcheck_float64_tp1(output, clip):
    """torch.autograd.gradcheck (finite differences, float64) on each output alone; mixed forward/reverse rows."""
    z = _f64(4, 7, scale=1.5).requires_grad_()
    u = _f64(3, 7, scale=1.5, seed=3)
    target = torch.tensor([6, 0, 2, 2])
    rows = torch.tensor([2, 0, 2])
    reverse = torch.tensor([False, True, True])

    def f(x):
        stats = token_stats(x, target, teacher_logits=u, kl_rows=rows, kl_reverse=reverse, kl_clip=clip,
                            chunk_rows=3)
        return getattr(stats, output)

    if clip is not None:  # the case must clip something for the clipped gradient to be tested
        exact = token_stats(z.detach(), target, teacher_logits=u, kl_rows=rows, kl_reverse=reverse).kl
        clipped = token_stats(z.detach(), target, teacher_logits=u, kl_rows=rows, kl_reverse=reverse,
                              kl_clip=clip).kl
        assert bool((clipped < exact - 1e-3).any())
    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_returns_token_stats_with_empty_kl_without_teacher():
    stats = token_stats(torch.randn(3, 5, requires_grad=True), torch.tensor([0, 1, 4]))
    assert isinstance(stats, TokenStats)
    assert stats.logprob.shape == (3,) and stats.entropy.shape == (3,) and stats.kl.shape == (0,)


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------

def _ok():
    return dict(student_logits=torch.randn(4, 6, requires_grad=True), target_ids=torch.tensor([0, 1, 2, 5]),
                teacher_logits=torch.randn(2, 6), kl_rows=torch.tensor([0, 3]),
                kl_reverse=torch.tensor([False, True]))


@pytest.mark.parametrize("change, message", [
    (dict(student_logits=torch.randn(4, 6, 1)), "student_logits must be \\[T, V/tp\\]"),
    (dict(target_ids=torch.tensor([0, 1, 2])), "target_ids must be \\[T\\] = \\[4\\]"),
    (dict(target_ids=torch.tensor([0.0, 1, 2, 3])), "target_ids must be an integer"),
    (dict(target_ids=torch.tensor([0, 1, 6, 2])), "target_ids\\[2\\] = 6 is outside the vocabulary \\[0, 6\\)"),
    (dict(target_ids=torch.tensor([0, -1, 2, 2])), "target_ids\\[1\\] = -1 is outside the vocabulary"),
    (dict(teacher_logits=torch.randn(2, 5)), "teacher_logits shard width 5 != student shard width 6"),
    (dict(kl_rows=torch.tensor([0, 4])), "kl_rows\\[1\\] = 4 is out of range for T=4"),
    (dict(kl_rows=torch.tensor([0, -1])), "kl_rows\\[1\\] = -1 is out of range"),
    (dict(kl_rows=torch.tensor([0, 1, 2])), "kl_rows must be an integer \\[K\\] = \\[2\\]"),
    (dict(kl_reverse=torch.tensor([0, 1])), "kl_reverse must be a bool \\[K\\] = \\[2\\]"),
    (dict(teacher_logits=torch.randn(2, 6, requires_grad=True)), "teacher_logits must not require grad"),
    (dict(kl_clip=0.0), "kl_clip must be a positive number"),
    (dict(chunk_rows=0), "chunk_rows must be a positive int"),
    (dict(vocab_start=1), "vocab_start=1 is outside"),
    (dict(student_logits=torch.full((4, 6), float("nan"))), "student row 0 has a NaN/inf maximum"),
])
def test_bad_input_raises_a_clear_error(change, message):
    kwargs = _ok()
    kwargs.update(change)
    z, t = kwargs.pop("student_logits"), kwargs.pop("target_ids")
    with pytest.raises(ValueError, match=message):
        token_stats(z, t, check_values=True, **kwargs)


def test_kl_rows_required_when_teacher_rows_differ_from_student_rows():
    with pytest.raises(ValueError, match="kl_rows is required"):
        token_stats(torch.randn(4, 6), torch.zeros(4, dtype=torch.long), teacher_logits=torch.randn(2, 6))


# --------------------------------------------------------------------------------------------------------------
# the hot path: no host syncs, no recompiles
# --------------------------------------------------------------------------------------------------------------

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero")


class HostSyncCounter:
    """Counts calls of the Tensor methods that read a value on the host (a device sync on GPU) while active."""

    def __init__(self):
        self.calls: list[str] = []
        self.saved = {}

    def __enter__(self):
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            self.saved[name] = original

            def counted(t, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        self.saved_nonzero = torch.nonzero

        def nonzero(*args, **kwargs):
            self.calls.append("torch.nonzero")
            return self.saved_nonzero(*args, **kwargs)

        torch.nonzero = nonzero
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = self.saved_nonzero


def _microbatch_loss(kernels, rows, fused, dtype=torch.float32):
    """One micro-batch of the routed loss: statistics with teacher rows, a loss of all three, backward."""
    from megatron_trace.loss.fused_output import fused_output_token_stats

    g = torch.Generator().manual_seed(rows)
    k = rows // 2
    target = torch.randint(0, 96, (rows,), generator=g)
    kl_rows = torch.randperm(rows, generator=g)[:k]
    reverse = torch.rand(k, generator=g) < 0.5
    teacher = dict(kl_rows=kl_rows, kl_reverse=reverse, kl_clip=0.05)
    if fused:
        h = torch.randn(rows, 8, generator=g, dtype=dtype).requires_grad_()
        w = torch.randn(96, 8, generator=g, dtype=dtype).requires_grad_()
        stats = fused_output_token_stats(h, w, target, teacher_hidden=torch.randn(k, 8, generator=g, dtype=dtype),
                                         vocab_size=90, chunk_rows=4, kernels=kernels, **teacher)
    else:
        z = torch.randn(rows, 96, generator=g, dtype=dtype).requires_grad_()
        stats = token_stats(z, target, teacher_logits=torch.randn(k, 96, generator=g, dtype=dtype), chunk_rows=4,
                            kernels=kernels, **teacher)
    (stats.logprob.sum() + stats.kl.sum()).backward()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kernels", ["eager", "compiled"])
def test_no_host_syncs_and_no_recompiles_in_one_microbatch(kernels, fused):
    """Steady state: after one micro-batch (which compiles), a micro-batch of a different row count runs its loss
    forward and backward with zero host reads of tensor values and, on the compiled path, no new compile."""
    from torch._dynamo.utils import counters

    _microbatch_loss(kernels, 10, fused)
    compiles = sum(counters["stats"].values()) if kernels == "compiled" else 0
    with HostSyncCounter() as syncs:
        _microbatch_loss(kernels, 13, fused)
    assert syncs.calls == [], f"host syncs during one micro-batch: {syncs.calls}"
    if kernels == "compiled":
        assert sum(counters["stats"].values()) == compiles, f"recompiled: {dict(counters['stats'])}"


def test_sync_counter_sees_a_sync():
    """Guard for the counter itself."""
    with HostSyncCounter() as syncs:
        bool(torch.ones(()) > 0)
        torch.ones(2).nonzero()
    assert syncs.calls == ["__bool__", "nonzero"]


def _routed_inputs(rows):
    """A micro-batch's routed-loss inputs as the batcher makes them (built before any counting)."""
    from megatron_trace.routes import Route

    g = torch.Generator().manual_seed(rows)
    routes = torch.randint(0, 3, (rows,), generator=g)
    kl_rows = ((routes == int(Route.FKL)) | (routes == int(Route.RKL))).nonzero().squeeze(-1)
    k = kl_rows.shape[0]
    response_index = torch.arange(rows) * 2 // rows
    return dict(g=g, target=torch.randint(0, 96, (rows,), generator=g), routes=routes, kl_rows=kl_rows,
                reverse=routes[kl_rows] == int(Route.RKL), response_index=response_index,
                response_lengths=torch.bincount(response_index, minlength=2), adv=torch.randn(rows, generator=g),
                sampler=-torch.rand(rows, generator=g), h=torch.randn(rows, 8, generator=g).requires_grad_(),
                w=torch.randn(96, 8, generator=g).requires_grad_(), th=torch.randn(k, 8, generator=g),
                z=torch.randn(rows, 96, generator=g).requires_grad_(), u=torch.randn(k, 96, generator=g))


def _routed_microbatch(kernels, x, fused_in_forward):
    """One micro-batch of the trainer's routed TRACE loss as the hot path runs it (TraceLoss.rows without value
    checks, global counts given): statistics (materialised logits, or the fused output layer with its gradient in
    the forward), loss, metrics, backward."""
    from megatron_trace.loss.fused_output import fused_output_loss
    from megatron_trace.loss.trace_loss import LossConfig, TraceLoss

    rows = x["target"].shape[0]
    loss_rows = TraceLoss(LossConfig(kl_clip=0.05)).rows(
        num_rows=rows, old_logprob=None, advantages=x["adv"], routes=x["routes"],
        response_index=x["response_index"], response_lengths=x["response_lengths"], loss_mask=torch.ones(rows),
        kl_rows=x["kl_rows"], kl_weight=0.3, num_tokens=40.0, num_responses=4.0, sampler_logprob=x["sampler"],
        check_values=False)
    teacher = dict(kl_rows=x["kl_rows"], kl_reverse=x["reverse"], kl_clip=0.05)
    if fused_in_forward:
        loss, stats = fused_output_loss(x["h"], x["w"], x["target"], loss_rows.row_loss(), teacher_hidden=x["th"],
                                        vocab_size=90, chunk_rows=4, kernels=kernels, **teacher)
        metrics = loss_rows.loss(stats)[1]
    else:
        stats = token_stats(x["z"], x["target"], teacher_logits=x["u"], chunk_rows=4, kernels=kernels, **teacher)
        loss, metrics = loss_rows.loss(stats)
    loss.backward()
    return metrics


@pytest.mark.parametrize("fused_in_forward", [False, True])
def test_routed_trace_loss_micro_batch_reads_no_tensor_value_on_the_host(fused_in_forward):
    """The trainer's routed loss per micro-batch (value checks off: they run once per step under
    loss.check_values): no host sync in statistics, loss, metrics or backward."""
    _routed_microbatch("eager", _routed_inputs(10), fused_in_forward)
    x = _routed_inputs(13)
    with HostSyncCounter() as syncs:
        metrics = _routed_microbatch("eager", x, fused_in_forward)
    assert syncs.calls == [], f"host syncs during one micro-batch: {syncs.calls}"
    assert float(metrics["span_tokens"]) == x["kl_rows"].numel() > 0
