"""Colocated generation (`rollout.placement: colocated`): every node runs its own generation servers, every GPU
generates, and every node refreshes its servers from the model replica it holds.

Per node, local rank 0 starts one server per group of `rollout.tensor_parallel_size` local GPUs (that group's
`CUDA_VISIBLE_DEVICES`, `rollout.gpu_memory_utilization` of its memory, vLLM sleep mode on; on CPU one server per
node, whose sleep/wake are accepted no-ops that say so in its log) and owns them: it stops them when the run ends.
Start-up is collective: rank 0 writes the current policy as the servers' initial HF folder (under
`logging.output_dir`, which every node must see), picks the run's bearer token and broadcasts it, each node leader
starts its servers, and one all_gather tells every rank every node's URLs, so the driver (global rank 0) knows
them without a config list. The driver drives all servers as one `EnginePool` (errors name "node N <URL>"):
it wakes them before rollout and puts them to sleep before training.

Weight sync (`sync`, collective, after each optimizer step): the weight bridge exports the model once per node,
to that node's local rank 0, from the data-parallel replica that rank belongs to, so a replica inside one node
moves nothing across nodes (when PP spans nodes, the stages on other nodes send their tensors to the node leader
over the network: one model's worth per node per update). The node leader streams the buckets into its servers
through /dev/shm (`ShmPusher`: one copy into the segment, one load by each server; on GPU the same protocol would
carry CUDA IPC handles, see cuda_ipc.py). Then one all_gather of every node's outcome: only if every node loaded
the update does the driver commit every server to the new version, so the version flips everywhere or nowhere.
A failure anywhere (a dead server, a refused bucket) is raised on every rank with the same message naming the
node and URL, so the run stops cleanly instead of leaving ranks waiting in a collective.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from megatron_trace.distributed import collectives

logger = logging.getLogger(__name__)

__all__ = ["ColocatedServers", "server_gpu_groups", "ColocatedError"]


class ColocatedError(RuntimeError):
    """A colocated server failed (start, sync, generate); the message names the node and URL. Raised on every
    rank alike."""


def server_gpu_groups(local_world_size: int, tp: int, visible: str | None) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each server of a node: consecutive groups of `tp` of the node's GPUs (the trainer
    process on local rank i uses GPU i; `visible` is the trainer's own CUDA_VISIBLE_DEVICES, if set)."""
    if local_world_size % tp:
        raise ValueError(f"rollout.tensor_parallel_size={tp} does not divide the {local_world_size} GPUs of a "
                         "node (one trainer process per GPU)")
    devices = visible.split(",") if visible else [str(i) for i in range(local_world_size)]
    if len(devices) < local_world_size:
        raise ValueError(f"CUDA_VISIBLE_DEVICES={visible!r} lists {len(devices)} GPUs for {local_world_size} "
                         "local trainer processes")
    return [",".join(devices[g * tp:(g + 1) * tp]) for g in range(local_world_size // tp)]


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    collectives.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    box = [obj]
    collectives.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class ColocatedServers:
    """This rank's part of the colocated servers. Node leaders: `local` (the ManagedServers it owns) and `pusher`;
    the driver: `pool` over every server of the run; every rank: `leaders` (global rank of each node's local rank
    0, in node order), `urls` (each node's server URLs) and `version` (the weight version every server serves)."""

    cfg: Any
    leaders: list[int]
    urls: list[list[str]]
    local: list = field(default_factory=list)
    pusher: Any = None
    pool: Any = None
    version: int = 0
    asleep: bool = False

    # ---------------------------------------------------------------- start
    @classmethod
    def start(cls, cfg, export_fn: Callable[[str], None]) -> "ColocatedServers":
        """Collective: export the initial folder, start each node's servers, discover every URL."""
        from megatron_trace.distributed import node_info
        from megatron_trace.rollout.launch import ManagedServer

        r = cfg.rollout
        info = node_info()
        rank = dist.get_rank()
        model_dir = os.path.join(cfg.logging.output_dir, "rollout_model")
        export_fn(model_dir)  # collective; rank 0 writes (every node reads it: output_dir is shared)
        token = _broadcast(os.environ.get(r.server_token_env) or secrets.token_hex(16) if rank == 0 else None)
        os.environ[r.server_token_env] = token  # the children inherit it, the clients read it
        local, error = [], None
        if info.local_rank == 0:
            several = info.nnodes > 1
            advertise = r.advertise_host or (socket.gethostname() if several else "127.0.0.1")
            host = "0.0.0.0" if advertise not in ("127.0.0.1", "localhost") else "127.0.0.1"
            cuda = torch.cuda.is_available()
            try:
                groups = (server_gpu_groups(info.local_world_size, r.tensor_parallel_size,
                                            os.environ.get("CUDA_VISIBLE_DEVICES")) if cuda else [None])
                from megatron_trace.rollout.platform import engine_platform_settings

                # Sleep mode always: on GPU vLLM's, on CPU accepted no-ops the server log reports.
                plat = engine_platform_settings(cuda=cuda, bf16=cfg.model.bf16,
                                                kv_cache_memory_bytes=r.kv_cache_memory_bytes, enable_sleep_mode=True)
                for g, devices in enumerate(groups):
                    log = os.path.join(cfg.logging.output_dir, f"rollout_server.node{info.node}.{g}.log")
                    args = ["--tensor-parallel-size", str(r.tensor_parallel_size)]
                    local.append(ManagedServer(
                        model_dir, log_path=log, token_env=r.server_token_env, token=token, dtype=plat.dtype,
                        max_model_len=r.max_model_len, kv_cache_memory_bytes=plat.kv_cache_memory_bytes,
                        enable_sleep_mode=plat.enable_sleep_mode,
                        gpu_memory_utilization=r.gpu_memory_utilization, seed=cfg.train.seed,
                        start_timeout_s=r.server_start_timeout_s, extra_args=args, wait=False, host=host,
                        advertise_host=advertise, die_with_parent=True,
                        extra_env={"CUDA_VISIBLE_DEVICES": devices} if devices is not None else None))
                for s in local:
                    s.wait_ready()
            except Exception as e:  # noqa: BLE001 - every rank raises it below, naming the node
                error = f"node {info.node}: starting its generation servers failed: {type(e).__name__}: {e}"
        rows = _gather((info.node, info.local_rank, [s.url for s in local], error))
        errors = [row[3] for row in rows if row[3]]
        if errors:
            for s in local:
                s.close()
            raise ColocatedError("; ".join(errors))
        leaders_by_node = {row[0]: (rank_, row[2]) for rank_, row in enumerate(rows) if row[1] == 0}
        nodes = sorted(leaders_by_node)
        self = cls(cfg=cfg, leaders=[leaders_by_node[n][0] for n in nodes],
                   urls=[leaders_by_node[n][1] for n in nodes], local=local)
        from megatron_trace.rollout.client import ClientConfig, RolloutClient

        if local:
            from megatron_trace.sync.shm_push import ShmPusher

            self.pusher = ShmPusher([s.client for s in local], node=info.node)
        if rank == 0:
            from megatron_trace.rollout.pool import EnginePool

            names, clients = [], []
            for n, urls in zip(nodes, self.urls):
                for url in urls:
                    clients.append(RolloutClient(ClientConfig(base_url=url, token_env=r.server_token_env)))
                    names.append(f"node {n} {url}")
            self.pool = EnginePool(clients, names=names)
            logger.info("colocated generation servers: %s", ", ".join(names))
        return self

    # ---------------------------------------------------------------- driver: sleep / wake
    def sleep(self) -> None:
        """Driver: free the servers' memory for training (rollout.sleep_level; 0 = never)."""
        level = self.cfg.rollout.sleep_level
        if self.pool is not None and level and not self.asleep:
            self.pool.sleep(level)
            self.asleep = True

    def wake_up(self) -> None:
        """Driver: re-allocate the servers' memory (before a weight sync or a rollout)."""
        if self.pool is not None and self.asleep:
            self.pool.wake_up()
            self.asleep = False

    # ---------------------------------------------------------------- weight sync
    def sync(self, export: Callable[[list[int]], Iterable], tensors: list[list], written: bool = False) -> int:
        """Collective: every node refreshes its servers from its replica, then the driver commits all of them.

        export(dsts): the weight bridge's collective generator of buckets, yielding on each rank in `dsts`; with
        `written`, of descriptors of segments the node's ranks wrote themselves (sync/shm_direct.py: they call
        `self.pusher.acquire` on the node's leader).
        tensors: the update's announcement (`shm_push.announce_model`). Returns the new version; raises
        ColocatedError on every rank if any node or server failed (no server serves the new version then)."""
        from megatron_trace.rollout.client import drain

        target = self.version + 1
        error = None
        if self.pool is not None:
            try:
                self.wake_up()  # vLLM loads weights into awake engines only
            except Exception as e:  # noqa: BLE001
                error = f"waking the servers before the update to version {target} failed: {e}"
        error = _broadcast(error)
        if error:
            raise ColocatedError(error)
        buckets = export(self.leaders)
        if self.pusher is not None:
            try:
                self.pusher.load(buckets, target, tensors, written=written)
            except Exception as e:  # noqa: BLE001 - every rank raises it below
                error = f"node {self.pusher.node}: weight update to version {target}: {e}"
        else:
            drain(iter(buckets))
        errors = [e for e in _gather(error) if e]
        if not errors and self.pool is not None:
            from megatron_trace.sync.shm_push import commit_all

            try:
                commit_all(self.pool.clients, target, self.pool.names)
            except Exception as e:  # noqa: BLE001
                errors = [str(e)]
        errors = _broadcast(errors)
        if errors:
            if self.pusher is not None:
                self.pusher.abort("the update failed on another node")
            raise ColocatedError("; ".join(errors) + "; the run stops (no server serves the new version)")
        self.version = target
        return target

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.pusher is not None:
            self.pusher.close()
            self.pusher = None
        for s in self.local:
            try:
                s.close()
            except Exception:  # noqa: BLE001
                logger.exception("stopping the generation server at %s", s.url)
        self.local = []
