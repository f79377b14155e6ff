"""The CPU shim is exactly what megatron-core needs on a CUDA-less torch: every patch is used, each one is needed
(the path breaks without it), and nothing else on the path touches CUDA.

The tested path is the product's: initialize_distributed, build a tied-embedding Qwen3, DDP + megatron
optimizer, forward/backward through the schedules, optimizer step with gradient clipping, at TP=2 and at PP=2
(two processes, one launch).
"""

from __future__ import annotations

import traceback

import pytest
import torch

from dist_harness import run_distributed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is only applied without CUDA"),
]

NOT_COMPILED = "Torch not compiled with CUDA enabled"


def _train_step_path(tp: int, pp: int) -> None:
    """init -> build (tied embeddings) -> forward/backward (2 microbatches) -> clipped optimizer step -> teardown."""
    from megatron.core import tensor_parallel

    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models import load_hf_config, qwen3_transformer_config
    from megatron_trace.train.step import build_model_and_optimizer, forward_backward, optimizer_step, zero_grad

    try:
        initialize_distributed(tp=tp, pp=pp, seed=7)
        hf = dict(load_hf_config("tiny-tied"), vocab_size=512)
        tcfg = qwen3_transformer_config(hf, tp=tp, pp=pp)
        chunks, optimizer = build_model_and_optimizer(hf, tcfg, lr=1e-3, clip_grad=1e-3)  # clip always applies
        g = torch.Generator().manual_seed(0)
        microbatches = []
        for _ in range(2):
            tokens = torch.randint(0, 512, (1, 8), generator=g)
            microbatches.append(dict(tokens=tokens, position_ids=torch.arange(8)[None], labels=tokens.roll(-1, 1)))

        def loss_fn(logits, mb):
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), mb["labels"]).sum() / 16
            return loss, {}

        zero_grad(chunks, optimizer)
        forward_backward(chunks, microbatches, loss_fn, seq_length=8, micro_batch_size=1)
        ok, grad_norm, _ = optimizer_step(optimizer)
        assert ok and grad_norm > 1e-3
    finally:
        destroy_distributed()


class _CudaTracer:
    """Records every attempt to reach CUDA: torch's lazy CUDA init (which every CUDA tensor, `.cuda()` and CUDA
    runtime query goes through) and every torch.cuda function that raises. Megatron code that swallowed the error
    would still be caught here."""

    def __init__(self):
        self.calls: list[str] = []
        self._saved: dict[str, object] = {}

    def _wrap(self, name, fn):
        def traced(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                stack = "".join(traceback.format_stack(limit=8)[:-1])
                self.calls.append(f"torch.cuda.{name} raised {e!r} at\n{stack}")
                raise
        return traced

    def __enter__(self):
        for name in dir(torch.cuda):
            fn = getattr(torch.cuda, name)
            if callable(fn) and not isinstance(fn, type) and name not in ("is_available",):
                self._saved[name] = fn
                setattr(torch.cuda, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.cuda, name, fn)


def _shim_ranks(rank: int, world_size: int) -> dict:
    from megatron_trace.distributed import cpu_shim

    out: dict = {}
    # 1. The full path with the shim, every other CUDA entry point traced.
    cpu_shim.apply_cpu_shim()
    before = cpu_shim.shim_hits()
    sites_before = cpu_shim.shim_hits_by_site().get("cuda_literals", {})
    with _CudaTracer() as tracer:
        for tp, pp in ((2, 1), (1, 2)):
            _train_step_path(tp, pp)
    out["unexpected_cuda_calls"] = tracer.calls
    out["hits"] = {k: v - before[k] for k, v in cpu_shim.shim_hits().items()}
    out["literal_sites"] = {k: v - sites_before.get(k, 0)
                            for k, v in cpu_shim.shim_hits_by_site().get("cuda_literals", {}).items()}

    # 2. Each patch removed alone: the same path must break with megatron's CUDA assumption. The failures are
    # symmetric across ranks (same call on both), so no rank is left waiting in a collective.
    # initialize_distributed must not re-apply the removed patch.
    from megatron_trace.distributed import setup

    setup.apply_cpu_shim = lambda: True
    out["without"] = {}
    for name, patch in cpu_shim.PATCHES.items():
        patch.revert()
        try:
            for tp, pp in ((2, 1), (1, 2)):
                _train_step_path(tp, pp)
            out["without"][name] = None
        except Exception as e:  # noqa: BLE001 - we report what broke
            frames = traceback.extract_tb(e.__traceback__)
            where = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in frames
                     if "megatron/core" in f.filename]
            out["without"][name] = (type(e).__name__, str(e), where[-1] if where else "")
        finally:
            patch.apply()
    out["applied_at_end"] = cpu_shim.is_cpu_shim_applied()
    return out


@pytest.fixture(scope="module")
def shim_results():
    # A fresh interpreter: the traced path includes the megatron modules it imports first (not preloaded).
    return run_distributed(_shim_ranks, 2, timeout=400, fresh_interpreter=True)


def test_nothing_on_the_training_path_reaches_cuda_except_through_the_shim(shim_results):
    for rank, res in enumerate(shim_results):
        assert res["unexpected_cuda_calls"] == [], f"rank {rank}:\n" + "\n".join(res["unexpected_cuda_calls"])


@pytest.mark.parametrize("name", ["current_device", "synchronize", "tied_embedding_copy", "cuda_literals",
                                  "clip_grad_cpu", "rng_tracker_cpu"])
def test_every_patch_is_used_and_the_path_breaks_without_it(shim_results, name):
    from megatron_trace.distributed.cpu_shim import CPU_SHIM_PATCHES

    assert name in CPU_SHIM_PATCHES
    for rank, res in enumerate(shim_results):
        assert res["hits"][name] > 0, f"rank {rank}: patch {name} was never used: megatron no longer needs it?"
        broke = res["without"][name]
        assert broke is not None, f"rank {rank}: the path ran without patch {name}: remove it from the shim"
        exc_type, message, where = broke
        assert exc_type == "AssertionError", broke
        if name == "clip_grad_cpu":  # megatron's own check that grads are CUDA tensors
            assert where.startswith("megatron/core/optimizer/clip_grads.py"), broke
        else:
            assert message == NOT_COMPILED and where.startswith("megatron/core/"), broke
        assert res["applied_at_end"]


def test_every_module_listed_for_cuda_literals_builds_a_cuda_tensor_on_the_path(shim_results):
    from megatron_trace.distributed.cpu_shim import CUDA_LITERAL_MODULES

    for rank, res in enumerate(shim_results):
        unused = [m for m in CUDA_LITERAL_MODULES if res["literal_sites"].get(m, 0) == 0]
        assert not unused, f"rank {rank}: no device='cuda' factory call from {unused}: drop them from the shim"


def test_the_shim_list_is_exactly_the_tested_patches():
    from megatron_trace.distributed.cpu_shim import CPU_SHIM_PATCHES

    assert set(CPU_SHIM_PATCHES) == {"current_device", "synchronize", "tied_embedding_copy", "cuda_literals",
                                     "clip_grad_cpu", "rng_tracker_cpu"}


def test_apply_is_idempotent_and_remove_restores_the_originals():
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.tensor_parallel import random as megatron_random

    from megatron_trace.distributed import cpu_shim

    originals = (torch.cuda.current_device, torch.cuda.synchronize, megatron_optimizer.torch,
                 megatron_optimizer.clip_grad_by_total_norm_fp32, megatron_random._get_cuda_rng_state)
    was_applied = cpu_shim.is_cpu_shim_applied()
    try:
        assert cpu_shim.apply_cpu_shim() and cpu_shim.apply_cpu_shim()
        patched_device = torch.cuda.current_device
        assert cpu_shim.apply_cpu_shim() and torch.cuda.current_device is patched_device  # not wrapped twice
        assert torch.cuda.current_device() == torch.device("cpu")
        cpu_shim.remove_cpu_shim()
        cpu_shim.remove_cpu_shim()
        if not was_applied:
            assert (torch.cuda.current_device, torch.cuda.synchronize, megatron_optimizer.torch,
                    megatron_optimizer.clip_grad_by_total_norm_fp32, megatron_random._get_cuda_rng_state) == originals
            with pytest.raises(AssertionError, match=NOT_COMPILED):
                torch.cuda.current_device()
    finally:
        if was_applied:
            cpu_shim.apply_cpu_shim()
