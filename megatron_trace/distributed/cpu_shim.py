"""Run megatron-core on a CPU-only torch build: the few CUDA calls on our paths, redirected to the CPU.

megatron-core (0.16.1) assumes CUDA in a handful of places on the paths we use (model build, TP/PP forward and
backward through the schedules, DDP, the megatron optimizer with grad clipping, the RNG tracker). On a torch
built without CUDA each of those calls raises `AssertionError: Torch not compiled with CUDA enabled`. Each patch
below redirects exactly one such call to its CPU meaning; all of them are applied together by `apply_cpu_shim()`,
once, only when `torch.cuda.is_available()` is False (on a GPU nothing here is touched).

The patches (name: what is replaced; which megatron path needs it):
- `current_device`: `torch.cuda.current_device()` -> `torch.device("cpu")`; it is the `device=` of DDP grad
  buffers, rotary frequencies, TP gather buffers, PP shape tensors and optimizer constants.
- `synchronize`: `torch.cuda.synchronize()` -> no-op (CPU kernels finish before returning); PP p2p
  `_communicate` calls it after `batch_isend_irecv`.
- `tied_embedding_copy`: `Tensor.cuda()` -> identity, only inside `LanguageModule.setup_embeddings_and_output_layer`;
  with PP>1 and tied embeddings the last stage's copy of the word embeddings is moved with `.cuda()` before its
  all-reduce.
- `cuda_literals`: tensor factories called with `device="cuda"` build on the CPU, only through the `torch` name of
  the modules in CUDA_LITERAL_MODULES: the causal mask (`transformer.utils`), token counters
  (`pipeline_parallel.schedules`), grad-norm buffers (`optimizer.clip_grads`, `utils.local_multi_tensor_l2_norm`),
  loss-scale constants (`optimizer.optimizer`).
- `clip_grad_cpu`: `clip_grad_by_total_norm_fp32` as bound in `optimizer.optimizer`; megatron's asserts
  `grad.type() == "torch.cuda.FloatTensor"` before scaling the grads.
- `rng_tracker_cpu`: the CUDA RNG get/set/seed of `tensor_parallel.random`; used by
  `model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()` (attention dropout) and activation recompute.

On CPU the tracked "CUDA" RNG streams of megatron become states of torch's CPU generator, which is the generator
that CPU dropout actually draws from: forking the tensor-parallel stream therefore has the same meaning as on GPU.

Every patch counts the calls it intercepted (`shim_hits()`, `shim_hits_by_site()`). `tests/test_cpu_shim.py`
runs a train step at TP=2 and at PP=2 while recording every other attempt to reach CUDA (there must be none),
asserts that each patch (and each module of `cuda_literals`) was used, and removes each patch alone to assert
that the same path then breaks: a newer megatron-core that no longer needs a patch, or needs a new one, fails it.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["CPU_SHIM_PATCHES", "CUDA_LITERAL_MODULES", "PATCHES", "apply_cpu_shim", "is_cpu_shim_applied",
           "remove_cpu_shim", "shim_hits", "shim_hits_by_site"]


@dataclass
class Patch:
    """One redirected CUDA call: `apply()` installs it, `revert()` restores megatron's original."""

    name: str
    why: str
    _apply: Callable[["Patch"], None]
    hits: int = 0
    hits_by_site: dict[str, int] = field(default_factory=dict)  # where a multi-site patch was used
    applied: bool = False
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def hit(self, site: str | None = None) -> None:
        self.hits += 1
        if site is not None:
            self.hits_by_site[site] = self.hits_by_site.get(site, 0) + 1

    def apply(self) -> None:
        if not self.applied:
            self._apply(self)
            self.applied = True

    def revert(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.applied = False

    def set_attr(self, owner: Any, attr: str, value: Any) -> None:
        """setattr that remembers the previous value for `revert()`."""
        old = getattr(owner, attr)
        setattr(owner, attr, value)
        self._undo.append(lambda: setattr(owner, attr, old))


# ---------------------------------------------------------------------------------------------------------------
# A `torch` stand-in for single megatron modules: the same module, except that tensor factories asked for
# device="cuda" build on the CPU, and (for the RNG module) `torch.cuda`'s RNG calls act on the CPU generator.

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
              "full_like", "rand", "randn", "randint")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


class _CpuRngCuda(types.ModuleType):
    """`torch.cuda` for `tensor_parallel.random`: its RNG state calls address torch's CPU generator."""

    def __init__(self, patch: Patch):
        super().__init__("torch.cuda")
        self._patch = patch

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        self._patch.hit()
        return torch.get_rng_state()

    def manual_seed(self, seed: int) -> None:
        self._patch.hit()
        torch.manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """Forwards everything to `torch`; factories with device="cuda" build on the CPU (counted as hits)."""

    def __init__(self, patch: Patch, site: str, cuda: types.ModuleType | None = None):
        super().__init__("torch")
        self._patch = patch
        self._site = site
        self._cuda = cuda

    def __getattr__(self, name: str) -> Any:
        if name == "cuda" and self._cuda is not None:
            return self._cuda
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr
        patch, site = self._patch, self._site

        def factory(*args, **kwargs):
            if _is_cuda_device(kwargs.get("device")):
                patch.hit(site)
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


# ---------------------------------------------------------------------------------------------------------------
# The patches.

def _patch_current_device(p: Patch) -> None:
    def current_device() -> torch.device:
        p.hit()
        return torch.device("cpu")

    p.set_attr(torch.cuda, "current_device", current_device)


def _patch_synchronize(p: Patch) -> None:
    def synchronize(device: Any = None) -> None:
        p.hit()  # CPU kernels complete before they return: nothing to wait for

    p.set_attr(torch.cuda, "synchronize", synchronize)


@contextlib.contextmanager
def _tensor_cuda_is_identity(p: Patch):
    original = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        p.hit()
        return self

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _patch_tied_embedding_copy(p: Patch) -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self) -> None:
        with _tensor_cuda_is_identity(p):
            return original(self)

    p.set_attr(LanguageModule, "setup_embeddings_and_output_layer", setup_embeddings_and_output_layer)


# Modules whose own code builds tensors with a literal device="cuda" on our paths.
CUDA_LITERAL_MODULES = (
    "megatron.core.transformer.utils",  # get_default_causal_mask
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens counters
    "megatron.core.optimizer.clip_grads",  # grad-norm and zero-count buffers
    "megatron.core.optimizer.optimizer",  # FP32Optimizer / MixedPrecision loss-scale constants
    "megatron.core.utils",  # local_multi_tensor_l2_norm (the grad-norm fallback without apex/TE)
)


def _patch_cuda_literals(p: Patch) -> None:
    for name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        p.set_attr(module, "torch", _TorchOnCpu(p, name))


def _patch_clip_grad_cpu(p: Patch) -> None:
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.utils import to_local_if_dtensor

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        """megatron's clip (scale every fp32 grad by max_norm / (total_norm + 1e-6) when that is < 1),
        without its assertion that the grads are CUDA tensors."""
        p.hit()
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [to_local_if_dtensor(getattr(q, attr)).detach() for q in parameters
                 if getattr(q, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)

    p.set_attr(megatron_optimizer, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)


def _patch_rng_tracker_cpu(p: Patch) -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        p.hit()
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        p.hit()
        torch.set_rng_state(new_state)

    p.set_attr(megatron_random, "_get_cuda_rng_state", get_state)
    p.set_attr(megatron_random, "_set_cuda_rng_state", set_state)
    p.set_attr(megatron_random, "torch", _TorchOnCpu(p, megatron_random.__name__, cuda=_CpuRngCuda(p)))


PATCHES: dict[str, Patch] = {
    p.name: p for p in (
        Patch("current_device", "torch.cuda.current_device() used as a device= argument", _patch_current_device),
        Patch("synchronize", "torch.cuda.synchronize() after PP p2p batch_isend_irecv", _patch_synchronize),
        Patch("tied_embedding_copy", "Tensor.cuda() on the last stage's tied word embeddings (PP>1)",
              _patch_tied_embedding_copy),
        Patch("cuda_literals", "device='cuda' literals in " + ", ".join(CUDA_LITERAL_MODULES), _patch_cuda_literals),
        Patch("clip_grad_cpu", "clip_grad_by_total_norm_fp32 asserts CUDA float grads", _patch_clip_grad_cpu),
        Patch("rng_tracker_cpu", "CUDA RNG state get/set/seed in tensor_parallel.random", _patch_rng_tracker_cpu),
    )
}
CPU_SHIM_PATCHES: tuple[str, ...] = tuple(PATCHES)


def apply_cpu_shim() -> bool:
    """Install every patch (idempotent). Returns True when the shim is in place, False when CUDA is available
    (then nothing is patched)."""
    if torch.cuda.is_available():
        return False
    for patch in PATCHES.values():
        patch.apply()
    return True


def remove_cpu_shim() -> None:
    """Restore megatron-core's and torch's originals (idempotent)."""
    for patch in reversed(list(PATCHES.values())):
        patch.revert()


def is_cpu_shim_applied() -> bool:
    return all(p.applied for p in PATCHES.values())


def shim_hits() -> dict[str, int]:
    """Calls intercepted by each patch since the process started."""
    return {name: p.hits for name, p in PATCHES.items()}


def shim_hits_by_site() -> dict[str, dict[str, int]]:
    """For multi-site patches (`cuda_literals`): calls intercepted per megatron module."""
    return {name: dict(p.hits_by_site) for name, p in PATCHES.items() if p.hits_by_site}
