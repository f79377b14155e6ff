"""fused_output_token_stats against (output layer, then token_stats): values and the gradients of the hidden states
and the output weight agree to 1e-5 (fp32) at TP = 1 and 2 (gloo), with and without teacher rows, with vocabulary
padding, a separate (snapshot) teacher weight, and tied embeddings. The reference materialises the logits with a
plain matmul and runs token_stats (itself checked against float64 in test_vocab_parallel.py)."""

from __future__ import annotations

import pytest
import torch

import dist_harness
from megatron_trace.loss.fused_output import PAD_LOGIT, fused_output_token_stats
from megatron_trace.loss.vocab_parallel import token_stats

TOL = 1e-5
H = 16


def make_case(seed, T=9, V=64, K=5, vocab_size=None, snapshot=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.7
    target = torch.randint(0, vocab_size or V, (T,), generator=g)
    rows = torch.randperm(T, generator=g)[:K]
    if K > 1:
        rows[-1] = rows[0]  # a student row with two teacher rows
    reverse = torch.rand(K, generator=g) < 0.5
    th = h[rows] + 0.3 * torch.randn(K, H, generator=g)
    tw = w + 0.05 * torch.randn(V, H, generator=g) if snapshot else None
    weights = [torch.randn(T, generator=g), torch.randn(T, generator=g), torch.randn(K, generator=g)]
    return dict(h=h, w=w, target=target, rows=rows, reverse=reverse, th=th, tw=tw, vocab_size=vocab_size,
                weights=weights)


def _loss(stats, weights, with_teacher):
    loss = (stats.logprob * weights[0]).sum() + (stats.entropy * weights[1]).sum()
    return loss + (stats.kl * weights[2]).sum() if with_teacher else loss


def run_rank(rank, world, c, *, with_teacher, fused, group=None, chunk_rows=4, clip=0.05, kernels="eager"):
    """This rank's shard of the case: (logprob, entropy, kl, grad of hidden (this shard's partial), grad of its
    weight slice)."""
    V = c["w"].shape[0]
    W = V // world
    sl = slice(rank * W, (rank + 1) * W)
    h = c["h"].clone().requires_grad_()
    w = c["w"][sl].clone().requires_grad_()
    tw = c["tw"][sl] if c["tw"] is not None else w.detach()
    teacher = {}
    if fused:
        if with_teacher:
            teacher = dict(teacher_hidden=c["th"], teacher_weight=c["tw"][sl] if c["tw"] is not None else None,
                           kl_rows=c["rows"], kl_reverse=c["reverse"], kl_clip=clip)
        stats = fused_output_token_stats(h, w, c["target"], vocab_start=rank * W, group=group,
                                         vocab_size=c["vocab_size"], chunk_rows=chunk_rows, kernels=kernels,
                                         **teacher)
    else:
        def logits(hh, ww):
            z = hh @ ww.t()
            if c["vocab_size"] is not None:
                pad = torch.arange(rank * W, (rank + 1) * W) >= c["vocab_size"]
                z = z.masked_fill(pad, PAD_LOGIT)
            return z

        if with_teacher:
            teacher = dict(teacher_logits=logits(c["th"], tw).detach(), kl_rows=c["rows"], kl_reverse=c["reverse"],
                           kl_clip=clip)
        stats = token_stats(logits(h, w), c["target"], vocab_start=rank * W, group=group, chunk_rows=1024,
                            kernels="eager", **teacher)
    _loss(stats, c["weights"], with_teacher).backward()
    return [t.detach().clone() for t in (*stats, h.grad, w.grad)]


def assert_close(got, ref, what):
    names = ("logprob", "entropy", "kl", "d hidden", "d weight")
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape, f"{what} {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if b.numel() == 0:
            continue
        scale = b.abs().max().clamp(min=1.0)
        err = (a - b).abs().max()
        assert bool(err <= TOL * scale), f"{what} {name}: max error {err:.3e} > {TOL} x {scale:.3g}"


CASES = [
    dict(seed=0),
    dict(seed=1, vocab_size=50),  # 14 padded columns (all on the last shard at TP = 2)
    dict(seed=2, snapshot=True),  # a frozen teacher: its own output weight
    dict(seed=3, T=6, K=6),  # every row distilled
]


@pytest.mark.parametrize("with_teacher", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_fused_output_layer_matches_output_layer_then_token_stats_tp1(case, with_teacher):
    c = make_case(**case)
    ref = run_rank(0, 1, c, with_teacher=with_teacher, fused=False)
    got = run_rank(0, 1, c, with_teacher=with_teacher, fused=True)
    assert_close(got, ref, f"tp=1 {case} teacher={with_teacher}")
    # the clip really bites in the teacher cases (else the clipped gradient path is untested)
    if with_teacher:
        exact = run_rank(0, 1, c, with_teacher=True, fused=True, clip=None)
        assert not torch.allclose(exact[2], got[2])


def test_fused_output_layer_compiled_kernels_agree():
    """The torch.compile'd kernels on the fused path (one small case: compiling is the cost)."""
    c = make_case(0)
    ref = run_rank(0, 1, c, with_teacher=True, fused=False)
    got = run_rank(0, 1, c, with_teacher=True, fused=True, kernels="compiled")
    assert_close(got, ref, "tp=1 compiled")


def test_tied_embedding_weight_gets_both_gradients():
    """Tied embeddings: the output layer reads the word-embedding matrix, so its gradient is the sum of the
    embedding lookup's and the fused loss's; autograd must deliver both into the one parameter."""
    c = make_case(4)
    tokens = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(5))

    def run(fused):
        emb = c["w"].clone().requires_grad_()
        h = torch.nn.functional.embedding(tokens, emb) + c["h"]  # a stand-in for the network between the two
        kw = dict(kl_rows=c["rows"], kl_reverse=c["reverse"], kl_clip=0.05)
        if fused:
            stats = fused_output_token_stats(h, emb, c["target"], teacher_hidden=c["th"], chunk_rows=4,
                                             kernels="eager", **kw)
        else:
            stats = token_stats(h @ emb.t(), c["target"], teacher_logits=(c["th"] @ emb.t()).detach(),
                                kernels="eager", **kw)
        _loss(stats, c["weights"], True).backward()
        return emb.grad

    ref, got = run(False), run(True)
    assert bool((got - ref).abs().max() <= TOL * ref.abs().max())


def rank_main(rank, world):
    import torch.distributed as dist
    group = dist.new_group(list(range(world)))
    out = []
    for case in CASES:
        c = make_case(**case)
        for with_teacher in (False, True):
            got = run_rank(rank, world, c, with_teacher=with_teacher, fused=True, group=group)
            dist.all_reduce(got[3], group=group)  # the caller's TP all-reduce of the hidden-state gradient
            out.append([t.numpy() for t in got])
    return out


@pytest.mark.slow
def test_fused_output_layer_matches_across_vocab_shards_tp2():
    """TP = 2: every rank's statistics, the all-reduced hidden-state gradient and each rank's weight-slice
    gradient equal the single-shard (output layer, then token_stats) reference."""
    per_rank = dist_harness.run_distributed(rank_main, 2)
    i = 0
    for case in CASES:
        c = make_case(**case)
        for with_teacher in (False, True):
            ref = run_rank(0, 1, c, with_teacher=with_teacher, fused=False)
            W = c["w"].shape[0] // 2
            for rank in range(2):
                got = [torch.from_numpy(a) for a in per_rank[rank][i]]
                want = ref[:4] + [ref[4][rank * W:(rank + 1) * W]]
                assert_close(got, want, f"tp=2 rank={rank} {case} teacher={with_teacher}")
            i += 1


def test_bad_input_names_the_cause():
    h, w = torch.randn(3, 4), torch.randn(8, 4)
    t = torch.tensor([0, 1, 7])
    with pytest.raises(ValueError, match="hidden size 5 != output weight's 4"):
        fused_output_token_stats(torch.randn(3, 5), w, t)
    with pytest.raises(ValueError, match="teacher_hidden must be \\[K, H=4\\]"):
        fused_output_token_stats(h, w, t, teacher_hidden=torch.randn(2, 3), kl_rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="vocab_size=9 must be in \\(0, 8\\]"):
        fused_output_token_stats(h, w, t, vocab_size=9)
    with pytest.raises(ValueError, match="target_ids\\[2\\] = 7 is outside the vocabulary \\[0, 6\\)"):
        fused_output_token_stats(h, w, t, vocab_size=6, check_values=True)


# --------------------------------------------------------------------------------------------------------------
# fused_output_loss: the gradient formed in the forward pass
# --------------------------------------------------------------------------------------------------------------

def _row_loss(c, entropy_coef=0.0):
    """A PPO-clipped surrogate per row (rows far enough from old to be clipped included), an entropy bonus and
    weighted KL: a sum over rows, as the routed TRACE loss is."""
    from megatron_trace.loss.fused_output import RowLoss
    from megatron_trace.loss.grpo import clipped_surrogate

    g = torch.Generator().manual_seed(11)
    T = c["h"].shape[0]
    old = torch.randn(T, generator=g) * 0.5 - 4.0
    adv = torch.randn(T, generator=g)
    weight = c["weights"][0].abs()

    def student(lp, ent, s, e):
        per_token, _ = clipped_surrogate(lp, old[s:e], adv[s:e])
        return per_token * weight[s:e] - entropy_coef * ent

    return RowLoss(student=student, kl_coef=c["weights"][2])


def run_loss_rank(rank, world, c, *, with_teacher, fused, group=None, chunk_rows=4, entropy_coef=0.0,
                  kernels="eager"):
    """This rank's (loss, logprob, entropy, kl, grad of hidden (partial), grad of its weight slice): the row loss
    through fused_output_loss, or through (output layer, token_stats, the same row loss summed)."""
    from megatron_trace.loss.fused_output import fused_output_loss

    V = c["w"].shape[0]
    W = V // world
    sl = slice(rank * W, (rank + 1) * W)
    h = c["h"].clone().requires_grad_()
    w = c["w"][sl].clone().requires_grad_()
    row_loss = _row_loss(c, entropy_coef)
    if not with_teacher:
        row_loss.kl_coef = None
    teacher = {}
    if fused:
        if with_teacher:
            teacher = dict(teacher_hidden=c["th"], teacher_weight=c["tw"][sl] if c["tw"] is not None else None,
                           kl_rows=c["rows"], kl_reverse=c["reverse"], kl_clip=0.05)
        loss, stats = fused_output_loss(h, w, c["target"], row_loss, vocab_start=rank * W, group=group,
                                        vocab_size=c["vocab_size"], chunk_rows=chunk_rows, kernels=kernels,
                                        **teacher)
    else:
        def logits(hh, ww):
            z = hh @ ww.t()
            if c["vocab_size"] is not None:
                z = z.masked_fill(torch.arange(rank * W, (rank + 1) * W) >= c["vocab_size"], PAD_LOGIT)
            return z

        tw = c["tw"][sl] if c["tw"] is not None else w.detach()
        if with_teacher:
            teacher = dict(teacher_logits=logits(c["th"], tw).detach(), kl_rows=c["rows"], kl_reverse=c["reverse"],
                           kl_clip=0.05)
        stats = token_stats(logits(h, w), c["target"], vocab_start=rank * W, group=group, kernels="eager",
                            **teacher)
        loss = row_loss.student(stats.logprob, stats.entropy, 0, h.shape[0]).sum()
        if with_teacher:
            loss = loss + (stats.kl * row_loss.kl_coef).sum()
    (loss * 0.7).backward()  # a non-unit upstream gradient: backward scales the forward's gradients
    return [t.detach().clone() for t in (loss, *stats, h.grad, w.grad)]


def assert_loss_close(got, ref, what):
    assert bool((got[0] - ref[0]).abs() <= TOL * ref[0].abs().clamp(min=1.0)), f"{what} loss {got[0]} vs {ref[0]}"
    assert not got[1].requires_grad and not got[3].requires_grad
    assert_close(got[1:], ref[1:], what)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
@pytest.mark.parametrize("with_teacher", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_fused_output_loss_matches_output_layer_then_token_stats_then_the_loss_tp1(case, with_teacher,
                                                                                    entropy_coef):
    c = make_case(**case)
    ref = run_loss_rank(0, 1, c, with_teacher=with_teacher, fused=False, entropy_coef=entropy_coef)
    got = run_loss_rank(0, 1, c, with_teacher=with_teacher, fused=True, entropy_coef=entropy_coef)
    assert_loss_close(got, ref, f"tp=1 {case} teacher={with_teacher} entropy={entropy_coef}")


def test_fused_output_loss_compiled_kernels_agree():
    c = make_case(2, snapshot=True)
    ref = run_loss_rank(0, 1, c, with_teacher=True, fused=False, entropy_coef=0.01)
    got = run_loss_rank(0, 1, c, with_teacher=True, fused=True, entropy_coef=0.01, kernels="compiled")
    assert_loss_close(got, ref, "tp=1 compiled")


def loss_rank_main(rank, world):
    import torch.distributed as dist
    group = dist.new_group(list(range(world)))
    out = []
    for case in CASES:
        c = make_case(**case)
        for with_teacher in (False, True):
            got = run_loss_rank(rank, world, c, with_teacher=with_teacher, fused=True, group=group,
                                entropy_coef=0.01)
            dist.all_reduce(got[4], group=group)  # the caller's TP all-reduce of the hidden-state gradient
            out.append([t.numpy() for t in got])
    return out


@pytest.mark.slow
def test_fused_output_loss_matches_across_vocab_shards_tp2():
    per_rank = dist_harness.run_distributed(loss_rank_main, 2)
    i = 0
    for case in CASES:
        c = make_case(**case)
        for with_teacher in (False, True):
            ref = run_loss_rank(0, 1, c, with_teacher=with_teacher, fused=False, entropy_coef=0.01)
            W = c["w"].shape[0] // 2
            for rank in range(2):
                got = [torch.from_numpy(a) for a in per_rank[rank][i]]
                want = ref[:5] + [ref[5][rank * W:(rank + 1) * W]]
                assert_loss_close(got, want, f"tp=2 rank={rank} {case} teacher={with_teacher}")
            i += 1


def test_fused_output_loss_without_grad_mode_computes_no_gradient():
    from megatron_trace.loss.fused_output import fused_output_loss

    c = make_case(0)
    with torch.no_grad():
        loss, stats = fused_output_loss(c["h"], c["w"], c["target"], _row_loss(c), teacher_hidden=c["th"],
                                        kl_rows=c["rows"], kl_reverse=c["reverse"], kl_clip=0.05, kernels="eager")
    ref = run_loss_rank(0, 1, c, with_teacher=True, fused=False)
    assert abs(float(loss) - float(ref[0])) <= TOL * max(1.0, abs(float(ref[0])))
