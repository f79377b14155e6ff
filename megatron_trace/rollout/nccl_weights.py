"""GPU fast path for weight updates: trainer rank 0 broadcasts HF-named tensors to the vLLM workers over NCCL.

This is the pattern of vLLM's RLHF examples: a process group outside torch.distributed's global state
(`StatelessProcessGroup` + `PyNcclCommunicator`) joins the trainer's sender (rank 0) and the vLLM workers
(ranks 1..world_size-1, one per vLLM TP rank). Each update is announced first (names, dtypes, shapes, target
version: validated against the checkpoint before any byte moves), then every worker receives the tensors in
announced order and feeds them, as a stream, into vLLM's supported reload path (the same one the HTTP path
uses), so the layer-wise processing, tied-head repack and prefix-cache reset are shared.

UNTESTED: no GPU was available when this was written; the CPU build of vLLM has no NCCL. The HTTP path
(`server.py` POST /weights) is the portable, tested one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TensorMeta:
    """What one broadcast carries: HF name, dtype name (a key of DTYPES), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @staticmethod
    def of(name: str, t: torch.Tensor) -> "TensorMeta":
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"weight {name!r}: dtype {t.dtype} cannot be sent (expected one of {sorted(DTYPES)})")
        return TensorMeta(name, dtype, tuple(t.shape))


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs CUDA and NCCL; on CPU push weights over HTTP (POST /weights)")


class WeightReceiverExtension:
    """Methods added to every vLLM worker (`worker_extension_cls`), called through `collective_rpc`.

    `self` is the vLLM worker (it has `device`, `rank` (its TP rank), `model_runner`).
    """

    def weight_receiver_ready(self) -> bool:
        """True: the extension is installed (lets callers check before choosing the NCCL path)."""
        return True

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int):
        """Join the trainer's weight group as rank `rank_offset + tp_rank` (blocks until all ranks joined)."""
        _require_cuda("init_weight_update_group")
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        pg = StatelessProcessGroup.create(host=master_address, port=master_port,
                                          rank=rank_offset + self.rank, world_size=world_size)
        self._weight_group = PyNcclCommunicator(pg, device=self.device)

    def receive_weights_nccl(self, metas: list[tuple[str, str, tuple[int, ...]]]) -> None:
        """Receive the announced tensors from rank 0, streaming them into vLLM's reload (one reload per update)."""
        group = getattr(self, "_weight_group", None)
        if group is None:
            raise RuntimeError("receive_weights_nccl before init_weight_update_group")

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for name, dtype, shape in metas:
                buf = torch.empty(shape, dtype=DTYPES[dtype], device=self.device)
                group.broadcast(buf, src=0, stream=torch.cuda.current_stream())
                yield name, buf

        self.model_runner.reload_weights(weights_iterator=stream(), is_checkpoint_format=True)
        torch.cuda.synchronize()

    def close_weight_update_group(self) -> None:
        self._weight_group = None


class NcclWeightSender:
    """Trainer side (rank 0 of the weight group): broadcasts each announced tensor from this GPU.

    world_size = 1 + the vLLM engine's tensor-parallel size. Create it at the same time as the server runs
    `init_weight_update_group` (both block until everyone joined), e.g. through `RolloutClient.init_nccl_weights`.
    """

    def __init__(self, master_address: str, master_port: int, world_size: int, device: torch.device | int = 0):
        _require_cuda("NcclWeightSender")
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.device = torch.device("cuda", device) if isinstance(device, int) else device
        pg = StatelessProcessGroup.create(host=master_address, port=master_port, rank=0, world_size=world_size)
        self.group = PyNcclCommunicator(pg, device=self.device)

    @staticmethod
    def announce(buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> list[TensorMeta]:
        return [TensorMeta.of(n, t) for b in buckets for n, t in b]

    def send(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Broadcast every tensor, in the order `announce` listed them (the receivers allocate from that list)."""
        stream = torch.cuda.current_stream(self.device)
        for bucket in buckets:
            for _, t in bucket:
                self.group.broadcast(t.to(self.device, non_blocking=True).contiguous(), src=0, stream=stream)
        torch.cuda.synchronize(self.device)
