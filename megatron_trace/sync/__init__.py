"""Trainer side of weight sync: Megatron shards (any TP/PP) -> HF-named full tensors in buckets (`weight_bridge`),
the same stream written as an HF folder (`hf_export`) for an engine to start from, and streamed node-locally into
colocated servers through shared memory (`shm_push`), or broadcast over an NCCL group to every server's workers
(`nccl_push`, GPU; both imported on use: they need httpx). The engine side (receiving,
checking and loading the buckets) is `megatron_trace.rollout`."""

from megatron_trace.sync.hf_export import save_hf_folder
from megatron_trace.sync.weight_bridge import export_hf_buckets, local_named_params, params_dtype_of, stage_of

__all__ = ["export_hf_buckets", "local_named_params", "params_dtype_of", "save_hf_folder", "stage_of"]
