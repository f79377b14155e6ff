"""The generation engine's platform-dependent settings (dtype, KV cache size, sleep mode), decided in one place.

vLLM behaves differently on its CPU and GPU builds, and a value right for one is wrong for the other:
- KV cache: vLLM's CPU build needs an explicit size (a small 64 MiB keeps test processes lean); on GPU an
  explicit `kv_cache_memory_bytes` REPLACES `gpu_memory_utilization`, and 64 MiB is far below what a real
  model needs at its `max_model_len` (Qwen3-8B: 1.41 GiB at 10,240 tokens), so vLLM refuses to start. On GPU
  the size is left to vLLM unless the user set one.
- dtype: float32 on CPU (exact log-probs, what the CPU tests compare against); bfloat16 on GPU when the trainer
  trains in bf16 (the sampler then sees the trainer's rounding), else float32.
- sleep mode (`sleep()`/`wake_up()` free and re-allocate GPU memory): vLLM's GPU feature. On CPU (colocated
  demo and tests) the engine accepts sleep/wake as no-ops that cost nothing and says so in its log; vLLM itself
  is then built without sleep mode (its CPU build refuses it).
- weight sync transport (`rollout.weight_sync`): NCCL exists on GPU only, and whether it is the right choice
  depends on where the servers run; `resolve_weight_sync` decides (and refuses what cannot work) when the config
  is loaded.
Every place that builds an engine (the trainer's `start_engine`, `tools/serve_rollout.py`, `VLLMEngine`) asks
`engine_platform_settings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_trace.rollout.config import CPU_KV_CACHE_BYTES

__all__ = ["CPU_KV_CACHE_BYTES", "EnginePlatformSettings", "WEIGHT_SYNC_CHOICES", "driver_gpu",
           "engine_platform_settings", "resolve_weight_sync"]


@dataclass(frozen=True)
class EnginePlatformSettings:
    """dtype: vLLM dtype name; kv_cache_memory_bytes: bytes, or None = vLLM sizes the cache from
    gpu_memory_utilization; enable_sleep_mode: the engine accepts sleep()/wake_up(); vllm_sleep_mode: vLLM's own
    sleep mode is on (GPU only: on CPU sleep/wake are accepted no-ops)."""

    dtype: str
    kv_cache_memory_bytes: int | None
    enable_sleep_mode: bool
    vllm_sleep_mode: bool = False


def engine_platform_settings(*, cuda: bool | None = None, bf16: bool | None = None, dtype: str | None = None,
                             kv_cache_memory_bytes: int | None = None,
                             enable_sleep_mode: bool = False) -> EnginePlatformSettings:
    """The settings for this platform (`cuda`: None = ask torch), given what the user set (None = not set).

    bf16: the trainer's `model.bf16` (None: unknown, bfloat16 on GPU). An explicit dtype or KV size wins.
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if kv_cache_memory_bytes is not None and kv_cache_memory_bytes <= 0:
        raise ValueError(f"rollout.kv_cache_memory_bytes={kv_cache_memory_bytes}: must be positive, or unset "
                         "(CPU: 64 MiB; GPU: sized by vLLM from gpu_memory_utilization)")
    if cuda:
        return EnginePlatformSettings(
            dtype=dtype or ("float32" if bf16 is False else "bfloat16"),
            kv_cache_memory_bytes=kv_cache_memory_bytes, enable_sleep_mode=bool(enable_sleep_mode),
            vllm_sleep_mode=bool(enable_sleep_mode))
    # CPU: sleep/wake accepted as no-ops (nothing to free), vLLM built without its sleep mode.
    return EnginePlatformSettings(dtype=dtype or "float32",
                                  kv_cache_memory_bytes=kv_cache_memory_bytes or CPU_KV_CACHE_BYTES,
                                  enable_sleep_mode=bool(enable_sleep_mode), vllm_sleep_mode=False)


# ------------------------------------------------------------------------------------------------ weight sync

WEIGHT_SYNC_CHOICES = ("auto", "http", "shm", "nccl")


def driver_gpu() -> str:
    """The physical GPU of global rank 0 (local rank 0 uses the first visible device), as CUDA_VISIBLE_DEVICES
    names it: what `rollout.server_gpus` entries are compared with."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[0].strip() if visible else "0"


def resolve_weight_sync(requested: str, *, placement: str, engine: str = "server", external: bool = False,
                        server_gpus=(), cuda: bool | None = None, rank0_gpu: str | None = None) -> str:
    """How the trainer moves its weights into the generation engine: "http", "shm", "nccl", or "inprocess" (the
    in-process engine loads the bridge's buckets directly). Raises ConfigError naming `weight_sync` and the reason
    when the requested transport cannot work here.

    auto picks, per placement and platform:
    - engine inprocess: in process (no transport; only auto is accepted).
    - placement colocated: shm (node-local /dev/shm; CUDA IPC handles on GPU). The servers run on the trainer's
      own GPUs, and an NCCL group cannot hold two ranks on one GPU, so NCCL is never right there.
    - placement driver with servers the trainer starts on GPUs of their own (`server_gpus`, none of them rank
      0's GPU): nccl (one broadcast from rank 0's GPU reaches every server's workers; no host copy, no HTTP).
      Without server_gpus the servers share rank 0's GPU: http.
    - servers run elsewhere (placement separate, or server_url(s)): http (portable, no network path from their
      GPUs to rank 0's assumed). nccl may be asked for explicitly when they can reach rank 0 (advertise_host).
    - CPU: never nccl (no NCCL on CPU); asking for it is refused.

    cuda: None = ask torch (only when the answer matters). rank0_gpu: rank 0's physical GPU (default
    `driver_gpu()`).
    """
    from megatron_trace.config_base import ConfigError

    if requested not in WEIGHT_SYNC_CHOICES:
        raise ConfigError(f"weight_sync: {requested!r} is not one of {list(WEIGHT_SYNC_CHOICES)}")
    if engine == "inprocess":
        if requested != "auto":
            raise ConfigError(f"weight_sync: {requested} moves weights into generation servers; engine inprocess "
                              "loads them inside the trainer's process (leave weight_sync: auto)")
        return "inprocess"
    if placement == "colocated":
        if requested in ("http", "nccl"):
            why = ("the colocated servers run on the trainer's own GPUs and an NCCL group cannot hold two ranks on "
                   "one GPU" if requested == "nccl" else "colocated servers are refreshed node-locally")
            raise ConfigError(f"weight_sync: {requested} with placement colocated: {why}; use shm (or auto)")
        return "shm"
    if requested == "shm":
        raise ConfigError(f"weight_sync: shm is the node-local path of placement colocated (placement here is "
                          f"{placement}); use http or nccl (or auto)")
    if requested == "http":
        return "http"
    on_own_gpus = bool(server_gpus) and not external
    if requested == "auto" and (external or not on_own_gpus):
        return "http"  # no platform question to ask
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        if requested == "nccl":
            raise ConfigError("weight_sync: nccl needs CUDA GPUs and NCCL, and this machine has none "
                              "(torch.cuda.is_available() is False); use http (or auto)")
        return "http"
    if not external:
        gpu = rank0_gpu if rank0_gpu is not None else driver_gpu()
        shared = [g for g in server_gpus if gpu in [x.strip() for x in str(g).split(",")]]
        if not on_own_gpus or shared:
            if requested == "nccl":
                where = (f"server_gpus {shared} include rank 0's GPU {gpu}" if shared else
                         "without rollout.server_gpus the servers run on rank 0's GPU")
                raise ConfigError(f"weight_sync: nccl: {where}, and an NCCL group cannot hold two ranks on one "
                                  "GPU; give the servers GPUs of their own (rollout.server_gpus) or use http")
            return "http"
    return "nccl"
