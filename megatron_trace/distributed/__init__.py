"""Process groups, megatron parallel_state initialisation, and the CPU compatibility shim."""

from megatron_trace.distributed.cpu_shim import apply_cpu_shim
from megatron_trace.distributed.setup import (
    ParallelLayout,
    current_layout,
    destroy_distributed,
    initialize_distributed,
)

__all__ = ["ParallelLayout", "apply_cpu_shim", "current_layout", "destroy_distributed", "initialize_distributed"]
