"""Process groups for training: torch.distributed from torchrun's environment, then megatron's parallel_state.

One call sets up everything a rank needs before building a model: the default process group (gloo on CPU, nccl
on GPU), the CPU shim when CUDA is absent, megatron's TP/PP/CP/DP groups, and the seeds. The returned
`ParallelLayout` says where this rank sits; its methods hand out the process groups for code that takes the
group as a parameter.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_trace.distributed.cpu_shim import apply_cpu_shim

__all__ = ["NodeInfo", "ParallelLayout", "initialize_distributed", "destroy_distributed", "current_layout",
           "node_info"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Whether initialize_distributed created the default process group (then destroy_distributed destroys it; a
# group the caller created stays the caller's).
_OWNS_PROCESS_GROUP = False


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits in the TP x CP x DP x PP grid (megatron's order). Ranks and sizes are plain ints."""

    rank: int
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    is_first_stage: bool
    is_last_stage: bool

    # Process groups are looked up on demand (they are not picklable and die with destroy_distributed()).
    def tp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state as ps
        return ps.get_tensor_model_parallel_group()

    def pp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state as ps
        return ps.get_pipeline_model_parallel_group()

    def cp_group(self) -> dist.ProcessGroup:
        from megatron.core import parallel_state as ps
        return ps.get_context_parallel_group()

    def dp_group(self, with_context_parallel: bool = False) -> dist.ProcessGroup:
        from megatron.core import parallel_state as ps
        return ps.get_data_parallel_group(with_context_parallel=with_context_parallel)

    def mp_group(self) -> dist.ProcessGroup:
        """TP x PP ranks holding one full copy of the model."""
        from megatron.core import parallel_state as ps
        return ps.get_model_parallel_group()

    def embedding_group(self) -> dist.ProcessGroup:
        """First and last pipeline stages (they share tied word embeddings)."""
        from megatron.core import parallel_state as ps
        return ps.get_embedding_group()


def _check_sizes(world_size: int, tp: int, pp: int, cp: int) -> None:
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if world_size % (tp * pp * cp):
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp}; "
            f"launch a multiple of {tp * pp * cp} processes or change the parallel sizes"
        )


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all bound at once while they are picked, so none is handed out
    twice). Closed again on return: nothing listens there until the caller binds them."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _init_process_group(backend: str | None, timeout_s: float) -> None:
    global _OWNS_PROCESS_GROUP
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if not present:  # a plain `python script.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_ports(1)[0]))
    elif len(present) != len(_TORCHRUN_VARS):
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        raise RuntimeError(f"torchrun environment is incomplete: {', '.join(missing)} not set "
                           f"(launch with torchrun / torch.distributed.run)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))
    _OWNS_PROCESS_GROUP = True


@dataclass(frozen=True)
class NodeInfo:
    """Which node this process runs on: node index (torchrun's GROUP_RANK, 0 on one node), node count, this
    process's rank on its node (LOCAL_RANK) and the processes per node (LOCAL_WORLD_SIZE)."""

    node: int
    nnodes: int
    local_rank: int
    local_world_size: int


def node_info() -> NodeInfo:
    """This process's place among the nodes, from torchrun's environment (one node when run without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return NodeInfo(node=int(os.environ.get("GROUP_RANK", "0")), nnodes=max(1, world // max(1, local_world)),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), local_world_size=local_world)


def current_layout() -> ParallelLayout:
    """The layout of the megatron groups already initialised in this process."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is not initialised: call initialize_distributed() first")
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    cp = ps.get_context_parallel_world_size()
    return ParallelLayout(
        rank=dist.get_rank(), world_size=dist.get_world_size(), tp=tp, pp=pp, cp=cp,
        dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        is_first_stage=ps.is_pipeline_first_stage(), is_last_stage=ps.is_pipeline_last_stage(),
    )


def initialize_distributed(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234, backend: str | None = None,
                           timeout_s: float = 600) -> ParallelLayout:
    """Set up torch.distributed (reusing an existing default group) and megatron's TP/PP/CP/DP groups; seed.

    Seeds: torch's generator gets `seed + 100 * pp_rank` (same on every TP and DP rank of a stage, so CPU
    initialisation is identical across TP/DP; different per stage, as in Megatron-LM); megatron's tracked RNG
    streams come from `model_parallel_cuda_manual_seed(seed)` (tensor-parallel stream differs per TP rank).
    Calling again with the same sizes returns the current layout; different sizes need destroy_distributed().
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        _check_sizes(world_size, tp, pp, cp)
        _init_process_group(backend, timeout_s)
    _check_sizes(dist.get_world_size(), tp, pp, cp)
    if not torch.cuda.is_available():
        apply_cpu_shim()

    if ps.model_parallel_is_initialized():
        layout = current_layout()
        if (layout.tp, layout.pp, layout.cp) != (tp, pp, cp):
            raise RuntimeError(
                f"megatron parallel state is already initialised with tp={layout.tp}, pp={layout.pp}, "
                f"cp={layout.cp}; call destroy_distributed() before initialising tp={tp}, pp={pp}, cp={cp}"
            )
        return layout

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp)
    layout = current_layout()
    # megatron's seeding first: on CPU it re-seeds torch's generator (the shim maps its CUDA RNG to the CPU one).
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed + 100 * layout.pp_rank)
    return layout


def destroy_distributed() -> None:
    """Tear down megatron's groups, and the default process group if initialize_distributed created it.
    Safe to call more than once."""
    global _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
