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
- parameters the kernels read as they are (embedding, norms, an untied head's `weight`): `param.copy_(new)`, one
  copy into the live storage, as vLLM's kernel-format reload does;
- packed linear layers (qkv_proj, o_proj, gate_up_proj, down_proj): once all of a layer's checkpoint tensors
  arrived, the layer's `weight` is set to them (a view when they lie back to back in one mapping, as the
  shared-memory buckets lay them out; else one concatenation) and the layer's own
  `quant_method.process_weights_after_loading` packs it: vLLM's processing, run once, reading the new bytes once;
- the output head: its packed copy is redone once (`process_weights_after_loading` of the head) right after its
  weight was copied (a tied head's is the embedding: the bridge sends it first, so the packing overlaps the rest
  of the stream).

Supported: CPU, unquantized, server tensor-parallel size 1, oneDNN or sgl packing (both keep their own copy of the
weight), models whose fused layers are listed in `packed_modules_mapping` (Qwen3). `refit_plan_problem` says why an
engine does not qualify; the caller then uses vLLM's checkpoint-format reload.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

__all__ = ["refit_plan_problem", "refit_in_place"]


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
    try:
        module.quant_method.process_weights_after_loading(module)
    except BaseException:
        module.weight = empty  # never left holding the sender's buffer; the engine refuses to serve anyway
        raise
    if module.weight.numel() != 0:
        # A kernel that computes from `weight` itself (oneDNN refused the shape: torch's linear): give it memory
        # of its own, never a view of the sender's buffer.
        module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)


def refit_in_place(worker, weights_iterator: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """Copy every (vLLM checkpoint name, tensor) of `weights_iterator` into the engine's live weights (module
    docstring). Runs inside the vLLM worker (`collective_rpc`). The iterator must carry a complete update (the
    caller checks names, shapes and completeness). Returns {"copied_bytes", "merge_bytes", "packed_bytes"}: bytes
    copied into live parameters, bytes concatenated because fused shards were not adjacent, bytes packed."""
    model = _model(worker)
    mapping = model.packed_modules_mapping
    pending: dict[str, list] = {}  # fused module name -> its shards so far (dropped once packed)
    stats = dict(copied_bytes=0, merge_bytes=0, packed_bytes=0)
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
                target.param.data.copy_(tensor)
                stats["copied_bytes"] += tensor.numel() * tensor.element_size()
                if head is not None and target.param.data_ptr() == head.weight.data_ptr():
                    # The head's packed copy (oneDNN) is of the old weights: redo it as soon as its weight (a tied
                    # head's is the embedding, the first tensor the bridge sends) is in, so that it overlaps the
                    # rest of the stream instead of trailing it.
                    method.process_weights_after_loading(head)
                    stats["packed_bytes"] += head.weight.numel() * head.weight.element_size()
                    head_packed = True
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
