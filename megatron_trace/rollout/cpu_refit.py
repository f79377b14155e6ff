"""In-place weight refresh of a CPU vLLM engine: each new tensor is copied once into the engine's live memory, and
only the processing that the CPU kernels need is redone.

Why not vLLM's `reload_weights(is_checkpoint_format=True)` (its checkpoint-format reload, which the HTTP and
in-process paths use)? On CPU it costs, per layer: a fresh allocation of the layer's weights (`materialize_layer`),
the loader's copy of the checkpoint tensors into it, `process_weights_after_loading` (the linear layers' weights are
packed by `dispatch_cpu_unquantized_gemm` into a oneDNN handler that owns its own copy), and a copy back into the
original storage. For a tied embedding it is worse: the embedding is packed as if it were a linear layer (a oneDNN
copy of the whole vocab x hidden matrix that nothing reads: the embedding lookup reads `weight` itself), and the
head then has to be packed again. vLLM's kernel-format path (`is_checkpoint_format=False`, `param.copy_` into the
live parameters) cannot serve the linear layers either: on CPU their live `weight` is an empty tensor, the weights
live only inside the packed handler.

What this module does instead (the minimum the CPU kernels allow):
- parameters the kernels read as they are (embedding, norms, an untied head's `weight`): one copy into the live
  storage (`fast_copy.copy_into`: memcpy speed), as vLLM's kernel-format reload does with `param.copy_`;
- packed linear layers (qkv_proj, o_proj, gate_up_proj, down_proj): once all of a layer's checkpoint tensors
  arrived, the layer's `weight` is set to them (a view when they lie back to back in one mapping, as the
  shared-memory buckets lay them out; else one concatenation) and the layer's own
  `quant_method.process_weights_after_loading` packs it: vLLM's processing, run once, reading the new bytes once;
- the output head: its packed copy is redone once by the head's own `process_weights_after_loading`, from the
  new tensor, on a second thread while the same tensor is copied into the live weight (a tied head's is the
  embedding: the bridge sends it first).

Re-packing allocates: each layer's kernel builds a new packed copy. glibc serves every allocation above 32 MiB
(the head: vocab x hidden) with fresh pages from the kernel, and faulting them in cost 3x a memcpy of the bytes
(measured: 0.30 s for the 0.62 GB head, memcpy 0.10 s). So the old kernel is dropped before its layer is packed
again, and the CPU server keeps what it frees for reuse (`keep_freed_memory`, called at its start): the new
packed copy lands in the pages the old one left, and the head's packing costs 1.2x a memcpy (0.12 s), the
process's peak memory unchanged.

Supported: CPU, unquantized, server tensor-parallel size 1, oneDNN or sgl packing (both keep their own copy of the
weight), models whose fused layers are listed in `packed_modules_mapping` (Qwen3). `refit_plan_problem` says why an
engine does not qualify; the caller then uses vLLM's checkpoint-format reload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import types
from typing import Iterable

import torch

from megatron_trace.fast_copy import copy_into

logger = logging.getLogger(__name__)

__all__ = ["refit_plan_problem", "refit_in_place", "keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
_kept_freed_memory = False  # whether keep_freed_memory() took effect in this process


def keep_freed_memory() -> bool:
    """Make glibc keep the memory this process frees for its later allocations instead of returning it to the
    kernel, so that a refit re-packs its layers into pages already faulted in (module docstring):
    - M_MMAP_MAX 0: big blocks come from the heap, not from a fresh mmap each (glibc still falls back to mmap
      when the heap cannot grow);
    - M_TRIM_THRESHOLD at its maximum: the heap's top is never handed back;
    - M_ARENA_MAX 1: every thread allocates from the main heap. The refit runs on a request thread, and a
      thread's own arena serves blocks over 64 MiB with mmap whatever M_MMAP_MAX says.
    Call it at the start of a CPU generation server, before threads allocate (arenas already made stay). The
    cost: resident memory does not shrink after a free (it stays at its peak, which the server reaches at every
    refit anyway), and threads share one heap lock. False where the C library is not glibc (nothing changed)."""
    global _kept_freed_memory
    if not _kept_freed_memory:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _kept_freed_memory = all(mallopt(param, value) == 1 for param, value in (
            (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    return _kept_freed_memory


def _drop_kernel(module) -> None:
    """Free the layer's packed copy before it is packed again, so that the new one can take its pages."""
    module.__dict__.pop("cpu_linear", None)


def _model(worker):
    return worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model


def _packed_linear(module) -> bool:
    """A linear layer whose CPU kernel packed the weight away (live `weight` empty, `cpu_linear` set)."""
    return hasattr(module, "cpu_linear") and hasattr(module, "input_size_per_partition") \
        and getattr(module, "weight", None) is not None and module.weight.numel() == 0


def refit_plan_problem(worker) -> str | None:
    """Why this engine cannot be refreshed in place (None: it can). Runs inside the vLLM worker."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "not a CPU engine (on GPU vLLM's reload copies into live tensors already)"
    if current_platform.is_zen_cpu():
        return "zentorch kernels may keep a view of the loaded weight instead of a packed copy"
    model = _model(worker)
    if getattr(worker.model_runner.model_config, "quantization", None) is not None:
        return "quantized model"
    mapping = getattr(model, "packed_modules_mapping", None)
    if not isinstance(mapping, dict):
        return f"{type(model).__name__} has no packed_modules_mapping"
    for name, module in model.named_modules():
        if hasattr(module, "cpu_linear") and getattr(module, "tp_size", 1) != 1:
            return f"{name}: tensor-parallel size {module.tp_size} (supported: 1)"
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__name__ not in (
                "UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"):
            return f"{name}: quant method {type(method).__name__}"
    return None


class _Target:
    """Where one checkpoint tensor goes: a live parameter (`param`) or shard `shard` of packed linear `module`."""

    __slots__ = ("param", "module", "module_name", "shard", "shards")

    def __init__(self, param=None, module=None, module_name="", shard=0, shards=1):
        self.param, self.module, self.module_name, self.shard, self.shards = param, module, module_name, shard, shards


def _resolve(model, mapping: dict[str, list[str]], name: str) -> _Target:
    """The target of checkpoint tensor `name`: renamed by the model's own `hf_to_vllm_mapper` (q_proj ->
    qkv_proj, ...), its shard index the position of the checkpoint module in `packed_modules_mapping`."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    mapped = mapper.map_name(name) if mapper is not None else name
    if mapped is None:
        raise ValueError(f"weight {name!r}: the model drops it on loading (hf_to_vllm_mapper)")
    module_name, _, pname = mapped.rpartition(".")
    module = model.get_submodule(module_name)
    leaf = module_name.rpartition(".")[2]
    source_leaf = name.rpartition(".")[0].rpartition(".")[2]
    if leaf in mapping and source_leaf != leaf:  # one shard of a fused layer
        if source_leaf not in mapping[leaf] or pname != "weight" or not _packed_linear(module):
            raise ValueError(f"weight {name!r}: {mapped} is not a shard of a packed linear weight")
        return _Target(module=module, module_name=module_name, shard=mapping[leaf].index(source_leaf),
                       shards=len(mapping[leaf]))
    if pname == "weight" and _packed_linear(module):
        return _Target(module=module, module_name=module_name)
    param = module.get_parameter(pname)
    if param.numel() == 0:
        raise ValueError(f"weight {name!r}: the live parameter is empty and {module_name} is not a packed linear")
    return _Target(param=param)


def _adjacent(shards: list[torch.Tensor]) -> bool:
    """True if the shards are contiguous and lie back to back in one storage (so one view covers them)."""
    first = shards[0]
    if any(not s.is_contiguous() or s.dtype != first.dtype or s.shape[1:] != first.shape[1:]
           or s.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for s in shards):
        return False
    for a, b in zip(shards, shards[1:]):
        if a.data_ptr() + a.numel() * a.element_size() != b.data_ptr():
            return False
    return True


def _merged(shards: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(the fused [sum rows, K] weight, bytes copied to build it): a view when the shards are adjacent."""
    if len(shards) == 1:
        return shards[0], 0
    if _adjacent(shards):
        first = shards[0]
        rows = sum(s.shape[0] for s in shards)
        view = torch.empty(0, dtype=first.dtype).set_(first.untyped_storage(), first.storage_offset(),
                                                      (rows, *first.shape[1:]))
        return view, 0
    out = torch.cat(shards, dim=0)
    return out, out.numel() * out.element_size()


def _pack(module, module_name: str, weight: torch.Tensor) -> None:
    """Pack `weight` into `module` with its own quant method (vLLM's processing); the kernel keeps its own copy."""
    rows = sum(getattr(module, "output_partition_sizes", [module.output_size_per_partition]))
    want = (rows, module.input_size_per_partition)
    if tuple(weight.shape) != want:
        raise ValueError(f"{module_name}: new weight {tuple(weight.shape)}, the layer computes with {want}")
    empty = module.weight
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    _drop_kernel(module)  # a failure below leaves the layer without a kernel: the engine refuses to serve anyway
    try:
        module.quant_method.process_weights_after_loading(module)
    except BaseException:
        module.weight = empty  # never left holding the sender's buffer; the engine refuses to serve anyway
        raise
    if module.weight.numel() != 0:
        # A kernel that computes from `weight` itself (oneDNN refused the shape: torch's linear): give it memory
        # of its own, never a view of the sender's buffer.
        module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)


def _copy_and_repack_head(head, method, live: torch.Tensor, new: torch.Tensor) -> None:
    """live[...] = new, and the output head's kernel packed again from `new`, side by side: both only read `new`,
    so the packing (oneDNN's blocked reorder, about twice a memcpy) runs on a second thread while this one copies.
    The C++ packing op and numpy's copy both release the GIL. The head's method packs a stand-in layer whose
    `weight` is `new` (the method reads nothing else of it), and the head takes the kernel it made."""
    _drop_kernel(head)
    stand_in = types.SimpleNamespace(weight=new)
    failed: list[BaseException] = []

    def pack() -> None:
        try:
            with torch.no_grad():
                method.process_weights_after_loading(stand_in)
        except BaseException as e:  # re-raised on the calling thread
            failed.append(e)

    packer = threading.Thread(target=pack, name="refit-head-pack", daemon=True)
    packer.start()
    try:
        copy_into(live, new)
    finally:
        packer.join()
    if failed:
        raise failed[0]
    if not hasattr(stand_in, "cpu_linear"):
        raise RuntimeError(f"{type(method).__name__}.process_weights_after_loading made no CPU kernel for the head")
    head.cpu_linear = stand_in.cpu_linear


def refit_in_place(worker, weights_iterator: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """Copy every (vLLM checkpoint name, tensor) of `weights_iterator` into the engine's live weights (module
    docstring). Runs inside the vLLM worker (`collective_rpc`). The iterator must carry a complete update (the
    caller checks names, shapes and completeness). Returns {"copied_bytes", "merge_bytes", "packed_bytes",
    "reuses_freed_memory"}: bytes copied into live parameters, bytes concatenated because fused shards were not
    adjacent, bytes packed, and whether the packing reuses freed pages (`keep_freed_memory`)."""
    model = _model(worker)
    mapping = model.packed_modules_mapping
    pending: dict[str, list] = {}  # fused module name -> its shards so far (dropped once packed)
    stats = dict(copied_bytes=0, merge_bytes=0, packed_bytes=0, reuses_freed_memory=_kept_freed_memory)
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is None or not hasattr(method, "process_weights_after_loading") or not head.weight.numel():
        head = None
    head_packed = False
    with torch.no_grad():
        for name, tensor in weights_iterator:
            target = _resolve(model, mapping, name)
            if target.param is not None:
                if target.param.shape != tensor.shape or target.param.dtype != tensor.dtype:
                    raise ValueError(f"weight {name!r}: {tensor.dtype} {tuple(tensor.shape)}, the live parameter "
                                     f"is {target.param.dtype} {tuple(target.param.shape)}")
                if head is not None and target.param.data_ptr() == head.weight.data_ptr():
                    # The head's packed copy (oneDNN) is of the old weights: redo it from the new ones while they
                    # are copied into the live weight (a tied head's is the embedding, the bridge's first tensor).
                    _copy_and_repack_head(head, method, target.param.data, tensor)
                    stats["packed_bytes"] += tensor.numel() * tensor.element_size()
                    head_packed = True
                else:
                    copy_into(target.param.data, tensor)
                stats["copied_bytes"] += tensor.numel() * tensor.element_size()
                del tensor, target
                continue
            shards = pending.setdefault(target.module_name, [None] * target.shards)
            if shards[target.shard] is not None:
                raise ValueError(f"weight {name!r} arrived twice")
            shards[target.shard] = tensor
            del tensor
            if all(s is not None for s in shards):
                del pending[target.module_name]
                weight, merge_bytes = _merged(shards)
                del shards
                _pack(target.module, target.module_name, weight)
                stats["merge_bytes"] += merge_bytes
                stats["packed_bytes"] += weight.numel() * weight.element_size()
                del weight
            del target
        if pending:
            raise ValueError(f"fused layers missing shards: {sorted(pending)[:3]}")
        if head is not None and not head_packed:
            raise ValueError("the update did not carry the output head's weight (lm_head, or the tied embedding)")
    return stats
