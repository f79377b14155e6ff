"""Process groups, megatron parallel_state initialisation, and the CPU compatibility shim."""

from megatron_trace.distributed.cpu_shim import apply_cpu_shim
from megatron_trace.distributed.setup import (
    NodeInfo,
    ParallelLayout,
    current_layout,
    destroy_distributed,
    initialize_distributed,
    node_info,
)

__all__ = ["NodeInfo", "node_info", "ParallelLayout", "apply_cpu_shim", "current_layout", "destroy_distributed", "initialize_distributed"]
