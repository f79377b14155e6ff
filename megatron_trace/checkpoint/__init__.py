"""HF <-> Megatron checkpoints: the Qwen3 weight mapping (names, fusions, vocab padding, TP/PP layout), loading
HF weights into a megatron model, and offline conversion to/from megatron distributed checkpoints."""

from megatron_trace.checkpoint.convert import (
    ConversionError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    load_converted_checkpoint,
    read_conversion_metadata,
)
from megatron_trace.checkpoint.hf_mapping import (
    Qwen3Dims,
    iter_hf_tensors_from_megatron,
    layers_for_stage,
    load_hf_state_into_model,
    merge_tp_shards,
    shard_for_tp,
)

__all__ = ["ConversionError", "Qwen3Dims", "convert_hf_to_megatron", "convert_megatron_to_hf",
           "iter_hf_tensors_from_megatron", "layers_for_stage", "load_converted_checkpoint",
           "load_hf_state_into_model", "merge_tp_shards", "read_conversion_metadata", "shard_for_tp"]
