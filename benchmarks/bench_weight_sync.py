#!/usr/bin/env python
"""How long does a whole node-local weight refresh take, against one memcpy of the same bytes?

A synthetic Qwen3 (Qwen3-0.6B widths, --layers deep, tied embedding, fp32, random weights) is built by Megatron at
TP=2 on two local ranks (gloo), as a colocated trainer holds it. Colocated generation server(s)
(`tools/serve_rollout.py`, vLLM CPU, --servers of them) are started from a constant initial folder. Each refresh,
timed from the first rank entering the bridge to the last server serving the new version:
    export (--export direct, the trainer's colocated path: every TP rank writes its own shards into the bucket's
       /dev/shm segment at their HF offsets, sync/shm_direct.py; --export gather: the weight bridge's TP gather +
       merge + HF layout onto rank 0)
    -> hand-off (gather: rank 0 writes each bucket once into a /dev/shm segment; direct: that write is the export;
       every server maps the same segment)
    -> load (each server copies the mapped tensors into its live weights and re-packs its linear layers:
       rollout/cpu_refit.py; vLLM's checkpoint-format reload where that path does not apply)
    -> commit (every server flips to the new version together).
With --export gather, bucket k+1 is exported while the servers load bucket k (direct waits for their answer on k
before writing k+1, so a segment is reused only once released); the stage times are measured on rank 0 as: export =
waiting for the bridge's next bucket, hand-off = writing segments, load = waiting for the servers beyond that,
finish = the servers' last layers after the last bucket, commit = the version flip. Their sum is the whole refresh.

Reference, same run: memcpy = the fastest plain copy of one flat buffer holding as many bytes as the export, both
preallocated and faulted in (the floor for any refresh that moves the bytes once): copy_yardstick.py's three plain
copies, each printed, the fastest the yardstick. Medians of --repeats; ratios are each median over the
yardstick's median. The last line counts every copy a refresh makes, in units of the exported bytes (trainer side
from the bridge's rules, server side from the engine's own byte counters).
On a loaded machine the ratios are skewed (memcpy most of all): read the absolute stage times.

    .venv/bin/python benchmarks/bench_weight_sync.py --layers 1 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from bench_weight_bridge import hf_config, write_initial_folder  # noqa: E402
from copy_yardstick import copy_references, fastest  # noqa: E402
from dist_harness import run_distributed  # noqa: E402

TOKEN_ENV = "BENCH_WEIGHT_SYNC_TOKEN"
STAGES = ("export", "handoff", "load", "finish", "commit")


def trainer_ranks(rank: int, world_size: int, cfg: dict, bucket_bytes: int, repeats: int, urls: list[str],
                  token: str, export: str = "direct") -> dict:
    import torch.distributed as dist

    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models import build_qwen3_model
    from megatron_trace.rollout.client import ClientConfig, RolloutClient
    from megatron_trace.sync.shm_push import ShmPusher, announce_model, commit_all
    from megatron_trace.sync.weight_bridge import export_hf_buckets

    initialize_distributed(tp=2, pp=1, seed=0)
    os.environ[TOKEN_ENV] = token
    try:
        model = build_qwen3_model(cfg)
        out: dict = {"total": [], "memcpy": [], **{s: [] for s in STAGES}, "server_load": []}
        pusher = None
        if rank == 0:
            clients = [RolloutClient(ClientConfig(base_url=u, token_env=TOKEN_ENV, retries=0)) for u in urls]
            pusher = ShmPusher(clients)
            version = max(c.version() for c in clients)
        tensors = announce_model(cfg, torch.float32)
        nbytes = 0
        mappings: dict = {}  # segment mappings kept across refreshes, as the trainer keeps them
        for r in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            if export == "direct":  # each rank writes its own shards into the segments (the trainer's path)
                from megatron.core import parallel_state as ps

                from megatron_trace.sync.shm_direct import write_buckets

                buckets = write_buckets(model, cfg, bucket_bytes=bucket_bytes,
                                        group=ps.get_tensor_model_parallel_group(), leader=0,
                                        acquire=pusher.acquire if rank == 0 else None,
                                        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=2, mappings=mappings)
            else:
                buckets = export_hf_buckets(model, cfg, bucket_bytes=bucket_bytes)
            if rank == 0:
                version += 1
                pusher.load(buckets, version, tensors, written=export == "direct")
                t1 = time.perf_counter()
                commit_all(clients, version)
                commit_s = time.perf_counter() - t1
            else:
                for _ in buckets:
                    pass
            dist.barrier()
            total = time.perf_counter() - t0
            if rank == 0:
                out["total"].append(total)
                for s in STAGES[:-1]:
                    out[s].append(pusher.stats[s])
                out["commit"].append(commit_s)
                out["server_load"].append(pusher.stats["server_load"])
                out["refit"] = pusher.refit
        if rank == 0:
            nbytes = sum(int(torch.Size(s).numel()) * 4 for _, _, s in tensors)
            src = torch.ones(nbytes, dtype=torch.uint8)
            dst = torch.zeros(nbytes, dtype=torch.uint8)
            out["memcpy_refs"] = copy_references([(dst, src)], repeats)
            out["memcpy"] = fastest(out["memcpy_refs"])[1]  # the yardstick
            out["nbytes"] = nbytes
            out["segments"] = pusher.writer.max_segments
            out["versions"] = [c.version() for c in clients]
            out["final_version"] = version
            pusher.close()
            for c in clients:
                c.close()
        if rank == 0:
            out["trainer_copies"] = trainer_copy_bytes(model, cfg) if export == "gather" else \
                dict(gather=0, merge=0, layout=0)  # direct: the one write into the segment is the hand-off
        return out
    finally:
        destroy_distributed()


def trainer_copy_bytes(model, cfg: dict) -> dict[str, int]:
    """Bytes each trainer-side copy moves in one export at this TP (from the bridge's rules, not timed): the TP
    gather (every sharded parameter once), the merge's concatenation (row-split and gate/up parameters; row-stacked
    ones are gathered straight into place), the HF layout (un-fusing QKV copies q, k, v out of the interleaved
    query groups; gate/up and the vocabulary unpadding are views)."""
    from megatron.core import parallel_state as ps

    from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, tp_rule
    from megatron_trace.sync.weight_bridge import local_named_params

    tp = ps.get_tensor_model_parallel_world_size()
    dims = Qwen3Dims.from_hf_config(cfg)
    out = dict(gather=0, merge=0, layout=0)
    for name, p in local_named_params(model, dims, 1, 0).items():
        rule = tp_rule(name)
        full = p.numel() * p.element_size() * (1 if rule == "replicated" else tp)
        out["layout"] += full if name.endswith("linear_qkv.weight") else 0
        if tp > 1 and rule != "replicated":
            out["gather"] += full
            out["merge"] += full if rule not in ("vocab", "column") else 0
    return out


def copies_line(trainer: dict[str, int], refit: list, nbytes: int) -> str:
    """One line: every copy of the refresh, in units of the exported bytes (1.00 = one memcpy of the model)."""
    parts = [("TP gather", trainer["gather"]), ("TP merge", trainer["merge"]), ("QKV un-fuse", trainer["layout"]),
             ("hand-off to /dev/shm", nbytes)]
    server = refit[0] if refit else None
    if server is None:
        tail = "server: vLLM checkpoint-format reload (allocate + copy + pack + copy back per layer; not counted)"
    else:
        parts += [("server copy into live weights", server["copied_bytes"]),
                  ("server fused-shard merge", server["merge_bytes"]),
                  ("server kernel packing (oneDNN, incl. head)", server["packed_bytes"])]
        tail = f"= {sum(b for _, b in parts) / nbytes:.2f} x the exported bytes"
    return "copies per refresh (x exported bytes): " + " + ".join(f"{n} {b / nbytes:.2f}" for n, b in parts) + \
        f" {tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help="depth at Qwen3-0.6B width (1 = 0.17 B params, 0.69 GB)")
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--servers", type=int, default=1, help="colocated servers on this node (all get every bucket)")
    ap.add_argument("--export", choices=["direct", "gather"], default="direct",
                    help="direct (the trainer's colocated path): every TP rank writes its own shards into the "
                         "segments; gather: the bridge gathers onto rank 0, which writes them")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = hf_config(args.layers)
    work = tempfile.mkdtemp(prefix="bench_weight_sync_")
    servers = []
    try:
        from megatron_trace.rollout.launch import ManagedServer

        initial = os.path.join(work, "initial")
        write_initial_folder(initial, cfg)
        token = os.urandom(16).hex()
        for i in range(args.servers):
            servers.append(ManagedServer(initial, log_path=os.path.join(work, f"server.{i}.log"), token_env=TOKEN_ENV,
                                         token=token, max_model_len=128, kv_cache_memory_bytes=64 << 20,
                                         extra_env={"OMP_NUM_THREADS": "1"}, die_with_parent=True, wait=False))
        for s in servers:
            s.wait_ready()
        t0 = time.perf_counter()
        res = run_distributed(trainer_ranks, 2, cfg, args.bucket_mb << 20, args.repeats, [s.url for s in servers],
                              token, args.export, timeout=3600)[0]
        launch_s = time.perf_counter() - t0
        assert res["versions"] == [res["final_version"]] * args.servers, res["versions"]
        nbytes = res["nbytes"]
        base = statistics.median(res["memcpy"])
        total = statistics.median(res["total"])
        print(f"\nweights: {nbytes / 4e9:.3f} B params, {nbytes / 1e9:.2f} GB fp32; buckets <= {args.bucket_mb} MiB; "
              f"{args.servers} colocated server(s); export {args.export}; {args.repeats} repeats; 1 torch thread "
              f"per process; host CPUs {os.cpu_count()}; load average at end {os.getloadavg()[0]:.1f}; trainer launch {launch_s:.0f} s; "
              f"trainer /dev/shm segments alive at most: {res['segments']}")
        print(f"{'row':<52} {'median s':>9} {'min s':>8} {'GB/s':>7} {'x memcpy':>9} {'share':>6}")
        rows = [(f"memcpy: {label}{' (yardstick)' if times is res['memcpy'] or times == res['memcpy'] else ''}",
                 times, None) for label, times in res["memcpy_refs"].items()]
        rows += [("whole refresh (export+handoff+load+commit)", res["total"], None)]
        rows += [(f"  stage: {s}", res[s], statistics.median(res[s]) / total) for s in STAGES]
        rows += [("  (server: load time, overlapped)", res["server_load"], None)]
        for name, times, share in rows:
            med = statistics.median(times)
            rate = f"{nbytes / med / 1e9:.2f}" if med > 0 else "-"  # direct: no separate hand-off
            print(f"{name:<52} {med:>9.3f} {min(times):>8.3f} {rate:>7} {med / base:>9.1f} "
                  f"{'' if share is None else f'{100 * share:.0f}%':>6}")
        print("runs (s): " + "; ".join(f"{k} {', '.join(f'{x:.3f}' for x in res[k])}"
                                       for k in ("memcpy", "total", *STAGES)))
        print(copies_line(res["trainer_copies"], res["refit"], nbytes))
    finally:
        for s in servers:
            s.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
