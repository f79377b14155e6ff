"""Run a function on N local ranks (torch.multiprocessing) the way torchrun would, and collect results.

Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on top of the
caller's current environment, one intra-op thread (the machine has 2 cores), and optionally a gloo process group.
The function must be defined at module level (it is pickled by name). A failing rank's traceback is re-raised in
the test process.

Ranks are forked from a forkserver that imported torch, megatron-core and transformers once per session
(`PRELOAD`): a fresh interpreter pays ~2 s (torch) + ~5 s (megatron-core) of imports per rank, which on 2 cores
made every 4-rank launch cost ~14 s before its first line ran. The forkserver never runs anything but imports,
so each rank still starts from a clean interpreter state (no process group, no model, nothing patched); only
import-time work is shared. `fresh_interpreter=True` spawns instead, for a check whose subject includes what
happens while those modules are imported (CUDA calls traced from the first import, resident memory measured
from before megatron-core is loaded).
"""

from __future__ import annotations

import os
import queue as _q
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_trace.distributed.setup import free_ports

# Imported once by the forkserver (ImportError ignored), inherited by every rank it forks. Only imports: nothing
# here may start threads, touch CUDA or initialise a process group.
PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
           "megatron.core.dist_checkpointing", "megatron.core.pipeline_parallel", "megatron.core.tensor_parallel",
           "transformers", "safetensors.torch", "megatron_trace.config", "megatron_trace.train.trainer",
           "megatron_trace.sync.weight_bridge"]


def _context(fresh_interpreter: bool):
    if fresh_interpreter:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the forkserver starts (first forkserver launch)
    return ctx


def _worker(rank: int, world_size: int, port: int, init_gloo: bool, env: dict, fn, args, kwargs, queue) -> None:
    # A forkserver child inherits the forkserver's environment (the test process's when the server started):
    # take the caller's environment as of this launch, as a spawned process would.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init_gloo:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args, **kwargs)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - the traceback travels to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn: Callable[..., Any], world_size: int, *args, init_gloo: bool = True,
                    timeout: float = 600.0, fresh_interpreter: bool = False, **kwargs) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` processes; return results by rank."""
    ctx = _context(fresh_interpreter)
    queue = ctx.Queue()
    port = free_ports(1)[0]
    env = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, init_gloo, env, fn, args, kwargs, queue),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, ok, payload = queue.get(timeout=1.0)
            except _q.Empty:
                # A rank that died without reporting (os._exit, a signal, a segfault) fails the run at once.
                dead = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results}
                if dead:
                    errors.append(f"rank(s) died without a result: {dead} (rank: exit code)")
                    break
                if time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout}s waiting for ranks "
                                  f"{sorted(set(range(world_size)) - set(results))}")
                    break
                continue
            if ok:
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the other ranks are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
