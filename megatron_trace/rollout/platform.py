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
Every place that builds an engine (the trainer's `start_engine`, `tools/serve_rollout.py`, `VLLMEngine`) asks
`engine_platform_settings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_trace.rollout.config import CPU_KV_CACHE_BYTES

__all__ = ["CPU_KV_CACHE_BYTES", "EnginePlatformSettings", "engine_platform_settings"]


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
