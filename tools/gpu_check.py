#!/usr/bin/env python
"""The first GPU check (issue 18, "## GPU"), in one call of at most ~10 minutes on one GPU (an H200).

NOT RUN YET: written on a CPU-only machine. Each section runs on its own (a failure is recorded with its
traceback and the next section still runs) and everything lands in one JSON report:

1. env       torch / CUDA / NCCL / megatron-core / Transformer Engine / vLLM versions, the device.
2. update    a TRACE `Trainer.update` at TP=1 on the GPU, default process group NCCL, bf16 (no rollout engine):
             a synthetic batch (32 responses, 25% of tokens in forward-KL spans, privileged prompts), one
             warm-up then timed updates; metrics must be finite.
3. export    the weight bridge (`export_hf_buckets`) from the bf16 CUDA model: names/dtypes/shapes equal the
             NCCL announcement (`export_announcement`), every tensor on the GPU and finite; seconds and GB/s.
4. loss      `token_stats` (log-prob, entropy, forward + backward) against Megatron's
             `vocab_parallel_cross_entropy` (log-prob only) on the same bf16 logits: times and max |diff| of
             the log-probs.
5. nccl      the trainer's NCCL weight sync (`rollout.weight_sync: nccl`, `sync/nccl_push.py`). NCCL cannot hold
             two ranks on one GPU, so with one GPU only rank 0's end runs: a weight group of world size 1
             (vLLM's StatelessProcessGroup + PyNcclCommunicator), the export streamed through
             `NcclWeightSender.send` (CUDA tensors, status word), then close. With two or more GPUs and vLLM
             installed, the full path: a generation server (tools/serve_rollout.py) on GPU 1 started from the
             exported model, the Trainer forms the group (`_build_weight_sync`), syncs twice (versions 1 and 2,
             all-or-nothing commit), the server's /version is checked, close() leaves the group.
6. ipc       issue 11's GPU check: a bucket's CUDA IPC handles (rollout/cuda_ipc.py) made here and loaded in a
             second process on the same GPU, bitwise (sha256 per tensor), the consumer's copy timed.

    # on the device machine (repo root), with the megatron-core wheel for its Python carried in wheels/:
    python tools/gpu_check.py --install-wheels wheels --out "$OUT" --budget-s 540

Needs on the device: torch with CUDA, the project's requirements (megatron-core from the carried wheel, the
tokenizer package); vLLM only for section 5. Output: $OUT/gpu_check.json ({"sections": {name: {"ok", "seconds", ...}}}) and the same summary on stdout.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def _install_wheels(folder: str) -> list[str]:
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *wheels], check=True)
    return [os.path.basename(w) for w in wheels]


def section_env(ctx: dict) -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpus": torch.cuda.device_count(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}
    for mod in ("megatron.core", "transformer_engine", "vllm", "apex"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "installed")
        except Exception as e:  # noqa: BLE001 - recorded
            out[mod] = f"missing ({type(e).__name__})"
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False: this check needs a GPU")
    return out


def _trainer(ctx: dict, *overrides):
    """A Trainer at TP=1, bf16, on the default (NCCL) group; `tiny` model (Qwen3's vocabulary), random init."""
    from megatron_trace.config import load_config
    from megatron_trace.train.trainer import Trainer

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    cfg = load_config(None, ["model.bf16=true", "parallel.tp=1", "annotate.annotator=reference_match",
                             "data.path=megatron_trace/data/assets/arith_test.jsonl", "checkpoint.resume=none",
                             "checkpoint.overwrite=true", f"logging.output_dir={ctx['work']}/run",
                             "logging.tensorboard=false", "logging.progress=false", "loss.w0=0.5",
                             "optim.micro_batch_size=8", *overrides])
    return Trainer(cfg, start_rollout=False)


def section_update(ctx: dict) -> dict:
    return _update(ctx, _samples)


def _update(ctx: dict, samples) -> dict:
    import math
    import statistics

    import torch
    import torch.distributed as dist

    trainer = ctx.get("trainer") or _trainer(ctx)
    ctx["trainer"] = trainer
    backend = str(dist.get_backend())
    if backend != "nccl":
        raise RuntimeError(f"the default process group is {backend}, not nccl")
    batch = samples(vocab=int(trainer.hf_config["vocab_size"]))
    times, metrics = [], {}
    for i in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = trainer.update(batch, 0.3)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise RuntimeError(f"non-finite metrics: {bad}")
    dtype = str(next(trainer.model[0].parameters()).dtype)
    return {"backend": backend, "param_dtype": dtype, "update_s_median": statistics.median(times),
            "update_s": times, "tokens": metrics.get("tokens"), "loss": metrics.get("loss"),
            "grad_norm": metrics.get("grad_norm"), "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


def _samples(n=32, prompt=60, length=40, teacher_prompt=120, coverage=0.25, vocab=151_000, seed=0):
    """The synthetic batch of benchmarks/bench_step.py."""
    import random

    from megatron_trace.routes import Route
    from megatron_trace.train.batching import Sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = int(coverage * length)
        start = rng.randrange(length - k)
        routes = [int(Route.FKL) if start <= t < start + k else int(Route.PG) for t in range(length)]
        out.append(Sample(prompt_ids=[rng.randrange(vocab) for _ in range(prompt)],
                          response_ids=[rng.randrange(vocab) for _ in range(length)],
                          sampler_logprobs=[-5.0] * length, routes=routes, advantage=rng.uniform(-1, 1),
                          reward=float(i % 2), group=i // 4,
                          teacher_prompt_ids=[rng.randrange(vocab) for _ in range(teacher_prompt)]))
    return out


def section_export(ctx: dict) -> dict:
    import torch

    from megatron_trace.sync.weight_bridge import export_announcement, export_hf_buckets, params_dtype_of

    trainer = ctx.get("trainer") or _trainer(ctx)
    ctx["trainer"] = trainer
    model = trainer.model[0]
    metas = export_announcement(trainer.hf_config, params_dtype_of(model))
    got, nbytes = [], 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for bucket in export_hf_buckets(model, trainer.hf_config, bucket_bytes=64 << 20):
        for name, t in bucket:
            if not t.is_cuda:
                raise RuntimeError(f"{name} exported on {t.device}, not the GPU")
            if not bool(torch.isfinite(t).all()):
                raise RuntimeError(f"{name} holds non-finite values")
            got.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
            nbytes += t.numel() * t.element_size()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    want = [(m.name, m.dtype, m.shape) for m in metas]
    if got != want:
        diff = [(g, w) for g, w in zip(got, want) if g != w][:3]
        raise RuntimeError(f"the export ({len(got)} tensors) differs from the announcement ({len(want)}): {diff}")
    return {"tensors": len(got), "gb": nbytes / 1e9, "seconds": seconds, "gb_per_s": nbytes / 1e9 / seconds}


def section_loss(ctx: dict) -> dict:
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_trace.loss.vocab_parallel import token_stats

    torch.manual_seed(0)
    rows, vocab = 8192, 151_936
    logits = (torch.randn(rows, vocab, device="cuda") * 3).to(torch.bfloat16)
    target = torch.randint(0, vocab, (rows,), device="cuda")

    def timed(fn, repeats=5):
        out = fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / repeats, out

    def ours():
        z = logits.detach().requires_grad_(True)
        stats = token_stats(z, target, vocab_start=0, group=None)
        (stats.logprob.sum() + stats.entropy.sum()).backward()
        return stats.logprob.detach().float()

    def megatron():
        z = logits.detach().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(z.unsqueeze(1), target.unsqueeze(1)).squeeze(1)
        loss.sum().backward()
        return -loss.detach().float()

    t_ours, lp_ours = timed(ours)
    t_meg, lp_meg = timed(megatron)
    return {"rows": rows, "vocab": vocab, "token_stats_s": t_ours, "megatron_ce_s": t_meg,
            "ratio": t_ours / t_meg, "max_abs_logprob_diff": float((lp_ours - lp_meg).abs().max())}


def section_nccl(ctx: dict) -> dict:
    import torch

    trainer = ctx.get("trainer") or _trainer(ctx)
    ctx["trainer"] = trainer
    if torch.cuda.device_count() >= 2 and _has_vllm_cuda():
        return _nccl_full(ctx)
    return _nccl_sender_only(ctx, trainer)


def _has_vllm_cuda() -> bool:
    try:
        import vllm  # noqa: F401
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _nccl_sender_only(ctx: dict, trainer) -> dict:
    """Rank 0's end alone (one GPU): a group of world size 1, the bf16 export streamed through it, closed."""
    import torch

    from megatron_trace.distributed.setup import free_ports
    from megatron_trace.rollout.nccl_weights import NcclWeightSender
    from megatron_trace.sync.weight_bridge import export_announcement, export_hf_buckets, params_dtype_of

    model = trainer.model[0]
    metas = export_announcement(trainer.hf_config, params_dtype_of(model))
    t0 = time.perf_counter()
    sender = NcclWeightSender("127.0.0.1", free_ports(1)[0], 1, torch.cuda.current_device())
    formed = time.perf_counter() - t0
    t0 = time.perf_counter()
    sender.send(export_hf_buckets(model, trainer.hf_config, bucket_bytes=64 << 20), metas)
    sent = time.perf_counter() - t0
    sender.close()
    return {"mode": "sender only (one GPU: NCCL cannot hold two ranks on one device)", "group_s": formed,
            "send_s": sent, "tensors": len(metas)}


def _nccl_full(ctx: dict) -> dict:
    """A server on GPU 1 started from the current weights; the trainer (GPU 0) syncs twice over NCCL."""
    from megatron_trace.config import load_config
    from megatron_trace.rollout.launch import ManagedServer
    from megatron_trace.rollout.pool import EnginePool

    trainer = ctx["trainer"]
    model_dir = os.path.join(ctx["work"], "rollout_model")
    trainer._export_rollout_model(model_dir)
    with ManagedServer(model_dir, log_path=os.path.join(ctx["work"], "server.log"), dtype="bfloat16",
                       max_model_len=1024, gpu_memory_utilization=0.5, enable_sleep_mode=False,
                       extra_env={"CUDA_VISIBLE_DEVICES": "1"}) as server:
        # The config the run would load: servers on GPU 1, weight_sync nccl (refused at load if it could not work).
        cfg = load_config(None, ["rollout.weight_sync=nccl", 'rollout.server_gpus=["1"]',
                                 f"logging.output_dir={ctx['work']}/run"])
        trainer.cfg.rollout = cfg.rollout
        pool = EnginePool([server])
        t0 = time.perf_counter()
        trainer._build_weight_sync(pool)
        formed = time.perf_counter() - t0
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            trainer.sync_weights()
            times.append(time.perf_counter() - t0)
        version = server.client.version()
        if version != 2:
            raise RuntimeError(f"the server serves version {version} after two syncs, not 2")
        trainer.nccl.close()
        trainer.nccl = None
    return {"mode": "full (server on GPU 1)", "group_s": formed, "sync_s": times, "server_version": version}


_IPC_CHILD = r"""
import hashlib, json, sys, time
import torch
from megatron_trace.rollout.cuda_ipc import IpcBucketMapping

desc = json.loads(sys.stdin.read())
torch.cuda.set_device(0)
mapped = IpcBucketMapping(desc, 0)
torch.cuda.synchronize()
t0 = time.perf_counter()
own = [(n, t.clone()) for n, t in mapped.tensors]  # the load: one copy into this process's memory
torch.cuda.synchronize()
load_s = time.perf_counter() - t0
digest = {n: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
          for n, t in own}
print(json.dumps({"sha256": digest, "load_s": load_s}))
"""


def section_ipc(ctx: dict) -> dict:
    """Issue 11's GPU check: a bucket's CUDA IPC handles (rollout/cuda_ipc.py, the colocated GPU refit) made in
    this process and loaded in another process on the same GPU, bitwise (sha256 of every tensor's bytes), with
    the consumer's copy timed."""
    import hashlib

    import torch

    from megatron_trace.rollout.cuda_ipc import IpcBucketWriter

    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    g = torch.Generator(device="cuda").manual_seed(0)
    bucket = [("model.embed_tokens.weight", torch.randn(32768, 1024, device="cuda", generator=g)),
              ("model.layers.0.self_attn.q_proj.weight",
               torch.randn(2048, 1024, device="cuda", generator=g).to(torch.bfloat16)),
              ("model.norm.weight", torch.randn(1024, device="cuda", generator=g))]
    want = {n: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
            for n, t in bucket}
    writer = IpcBucketWriter()
    desc = writer.write(0, bucket)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-c", _IPC_CHILD], input=json.dumps(desc), capture_output=True, text=True,
                       timeout=300, cwd=REPO, env=env)
    writer.release_all()
    if r.returncode != 0:
        raise RuntimeError(f"the loading process failed (exit {r.returncode}): {r.stderr[-3000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
    bitwise = got["sha256"] == want
    if not bitwise:
        raise RuntimeError(f"bytes differ: {sorted(n for n in want if got['sha256'].get(n) != want[n])}")
    return {"bitwise": bitwise, "tensors": len(bucket), "bytes": nbytes, "load_s": got["load_s"],
            "load_GBps": nbytes / got["load_s"] / 1e9}


SECTIONS = {"env": section_env, "update": section_update, "export": section_export, "loss": section_loss,
            "nccl": section_nccl, "ipc": section_ipc}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--install-wheels", default=None, help="pip install every *.whl of this folder first")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip the sections left after this many seconds")
    p.add_argument("--only", nargs="*", default=None, help=f"sections to run (default all: {list(SECTIONS)})")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report: dict = {"sections": {}}
    if args.install_wheels:
        report["wheels"] = _install_wheels(args.install_wheels)
    ctx = {"work": os.path.join(args.out, "work")}
    os.makedirs(ctx["work"], exist_ok=True)
    start = time.perf_counter()
    for name in args.only or list(SECTIONS):
        if time.perf_counter() - start > args.budget_s:
            report["sections"][name] = {"ok": False, "skipped": "time budget spent"}
            continue
        fn = SECTIONS[name]
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **fn(ctx)}
        except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        result["seconds"] = time.perf_counter() - t0
        report["sections"][name] = result
        print(f"[gpu_check] {name}: {'ok' if result['ok'] else 'FAILED ' + result['error']} "
              f"({result['seconds']:.1f}s)", flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:  # after each section: a timeout keeps it
            json.dump(report, f, indent=1, default=str)
    if ctx.get("trainer") is not None:
        ctx["trainer"].close()
    print(json.dumps({k: {kk: v for kk, v in r.items() if kk != "traceback"} for k, r in report["sections"].items()},
                     indent=1, default=str))
    return 0 if all(r.get("ok") for r in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
