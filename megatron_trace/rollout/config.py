"""Configuration of the rollout stage: the trainer's `rollout:` section (`RolloutConfig`, composed by
megatron_trace/config.py) and the settings of one vLLM engine (`EngineConfig`, also the defaults of the
generation server's command line). Plain data: importing this module needs neither vLLM nor torch."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_trace.config_base import ConfigError

__all__ = ["CPU_KV_CACHE_BYTES", "EngineConfig", "RolloutConfig"]

# vLLM's CPU build sizes its KV cache from this when set; a small default keeps test processes lean.
CPU_KV_CACHE_BYTES = 64 * 1024 * 1024


@dataclass
class EngineConfig:
    """Settings of one vLLM engine.

    model_dir: HF folder (config.json, safetensors, tokenizer). dtype: "float32" on CPU (exact log-probs),
    "bfloat16" on GPU. max_model_len: prompt + response tokens at most. kv_cache_memory_bytes: KV cache size in
    bytes (None: vLLM sizes it from gpu_memory_utilization on GPU; on CPU None means CPU_KV_CACHE_BYTES).
    enable_sleep_mode: needed for sleep()/wake_up() (vLLM's sleep mode on GPU; on CPU they are accepted, free
    nothing and say so in the log). The trainer's `rollout:` settings of the same
    names (RolloutConfig) and the server's command line take their defaults from here.
    """

    model_dir: str
    dtype: str = "float32"
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.5  # vLLM's share of the GPU (colocated with the trainer: leave it room)
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    seed: int = 0
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False

    def __post_init__(self) -> None:
        if not os.path.isfile(os.path.join(self.model_dir, "config.json")):
            raise ValueError(f"model_dir={self.model_dir!r}: no config.json there (expected an HF model folder)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: expected float32, bfloat16 or float16")
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len={self.max_model_len} must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes={self.kv_cache_memory_bytes} must be positive or None")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1")


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8  # problems per training step (global batch of prompts)
    group_size: int = 4  # responses sampled per problem (the GRPO group, G)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_response_tokens: int = 64
    enable_thinking: bool = False  # Qwen3 thinking mode in the chat template
    # "server": vLLM generation server(s) (tools/serve_rollout.py) on 127.0.0.1 started beside global rank 0, or
    # the ones at `server_url(s)`; weights are pushed to them after every step. "inprocess": vllm.LLM inside the
    # trainer; only for single-process runs (vLLM takes over torch.distributed's default group).
    engine: Literal["server", "inprocess"] = "server"
    server_url: Optional[str] = None  # an already running generation server; None = start one
    # Several already running generation servers, used in data parallel (each generate call's prompts are split
    # over them, every weight update goes to all); a one-element list is the same as `server_url`.
    server_urls: list[str] = field(default_factory=list)
    server_token_env: str = "MEGATRON_TRACE_ROLLOUT_TOKEN"  # env var with the server's bearer token (all servers)
    num_servers: int = 1  # without server_url(s): generation servers started beside rank 0, in data parallel
    # With num_servers: one CUDA_VISIBLE_DEVICES value per started server (e.g. ["6", "7"] or ["4,5", "6,7"]);
    # empty = every server sees the trainer's devices. Ignored on CPU.
    server_gpus: list[str] = field(default_factory=list)
    server_start_timeout_s: float = 300.0
    # Where the generation servers run. "colocated": on every node, one server per group of tensor_parallel_size
    # local GPUs (every GPU generates; on CPU one server per node), started and owned by the node's local rank 0
    # with sleep mode on, asleep while the trainer trains, refreshed node-locally through shared memory after
    # every step. "separate": the servers at server_url(s), run by the user elsewhere (weights pushed over HTTP).
    # "driver": num_servers servers beside global rank 0 (or server_url(s) when given), weights over HTTP.
    placement: Literal["driver", "colocated", "separate"] = "driver"
    # vLLM tensor parallelism of each generation server: the colocated ones (local GPUs per server), the ones
    # started beside rank 0, and, under weight_sync nccl, the external ones (each joins the NCCL weight group
    # with this many workers).
    tensor_parallel_size: int = 1
    # Colocated: vLLM sleep level while the trainer runs (1: weights offloaded to host memory, KV cache freed;
    # 2: both freed, the next update overwrites the weights anyway; 0: never sleep). No-op on CPU.
    sleep_level: int = 2
    # Colocated: the address other nodes reach this node's servers at (None: 127.0.0.1 on one node, the host
    # name on several; servers then listen on every interface, behind the bearer token). weight_sync nccl with
    # external servers: the address they reach rank 0's NCCL rendezvous at (None: rank 0's host name).
    advertise_host: Optional[str] = None
    # Engine settings, as in EngineConfig (documented there; same defaults). kv_cache_memory_bytes None = the
    # platform's default (rollout/platform.py: CPU_KV_CACHE_BYTES on CPU; on GPU vLLM sizes the cache from
    # gpu_memory_utilization, which a value set here replaces). enable_sleep_mode: the servers started beside
    # rank 0 can sleep()/wake_up() (vLLM's sleep mode on GPU; accepted no-ops on CPU); colocated servers always do.
    kv_cache_memory_bytes: Optional[int] = EngineConfig.kv_cache_memory_bytes
    gpu_memory_utilization: float = EngineConfig.gpu_memory_utilization
    max_model_len: int = EngineConfig.max_model_len
    enable_sleep_mode: bool = EngineConfig.enable_sleep_mode
    weight_bucket_mb: float = 64.0  # weight sync bucket size: the bridge's peak extra memory
    # How the updated weights reach the servers after every step (docs/design.md, "Weight sync"):
    # http: checksummed buckets over HTTP (portable; any placement but colocated).
    # shm: node-local /dev/shm (CUDA IPC on GPU); placement colocated only.
    # nccl: GPU only: rank 0 broadcasts the tensors over one NCCL group joined by every server's workers (world
    #   size 1 + servers x tensor_parallel_size; set up once, torn down when the trainer closes); the update is
    #   announced over HTTP first and committed on every server only after all of them received it. Needs the
    #   servers on GPUs other than rank 0's (server_gpus), or external servers that reach rank 0 (advertise_host).
    # auto: in-process engine: direct; colocated: shm; servers started beside rank 0 on GPUs of their own: nccl;
    #   on CPU, without server_gpus, or with server_url(s): http.
    # Checked when the config is loaded (nccl on a machine without CUDA is refused, naming the field);
    # `weight_transport` is what auto resolved to.
    weight_sync: Literal["auto", "http", "shm", "nccl"] = "auto"
    recompute_old_logprobs: bool = True  # trainer recomputes log p_old (else the sampler's log-probs are used)
    # Dynamic sampling (loss.dynamic_sampling) with refill: up to this many generate rounds per step, each on fresh
    # prompts, until prompts_per_step groups with signal are collected (DAPO); 1 = no refill (the batch shrinks).
    max_rounds: int = 1

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1 or self.group_size < 1:
            raise ConfigError("prompts_per_step and group_size must be >= 1")
        if self.max_rounds < 1:
            raise ConfigError(f"max_rounds: must be >= 1, got {self.max_rounds}")
        if self.max_response_tokens < 1:
            raise ConfigError(f"max_response_tokens: must be >= 1, got {self.max_response_tokens}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ConfigError(f"kv_cache_memory_bytes: must be > 0 or unset, got {self.kv_cache_memory_bytes}")
        if self.weight_bucket_mb <= 0:
            raise ConfigError(f"weight_bucket_mb: must be > 0, got {self.weight_bucket_mb}")
        # The sampling and engine settings vLLM would refuse only after the model is built and the server started.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature: must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"top_k: -1 (off) or a positive integer, got {self.top_k}")
        if self.max_model_len <= self.max_response_tokens:
            raise ConfigError(f"max_model_len: {self.max_model_len} leaves no room for a prompt beside "
                              f"max_response_tokens={self.max_response_tokens}")
        if not (math.isfinite(self.gpu_memory_utilization) and 0.0 < self.gpu_memory_utilization <= 1.0):
            raise ConfigError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if not (math.isfinite(self.server_start_timeout_s) and self.server_start_timeout_s > 0):
            raise ConfigError(f"server_start_timeout_s: must be > 0, got {self.server_start_timeout_s}")
        if self.server_url and self.server_urls:
            raise ConfigError("server_urls: set either server_url (one server) or server_urls, not both")
        for i, url in enumerate(self.external_urls):
            if not url.startswith(("http://", "https://")):
                name = f"server_urls[{i}]" if self.server_urls else "server_url"
                raise ConfigError(f"{name}: {url!r} is not an http://host:port or https://... address")
        if len(set(self.external_urls)) != len(self.external_urls):
            raise ConfigError(f"server_urls: a server is listed twice in {self.server_urls}")
        if self.num_servers < 1:
            raise ConfigError(f"num_servers: must be >= 1, got {self.num_servers}")
        for name in ("num_servers", "server_gpus"):
            if self.external_urls and getattr(self, name) not in (1, []):
                raise ConfigError(f"{name}: only for servers started by the trainer; with server_url(s) the "
                                  "servers listed there are used")
        if self.num_servers > 1 and self.engine == "inprocess":
            raise ConfigError("num_servers: engine inprocess is a single engine; use engine: server")
        if self.server_gpus and len(self.server_gpus) != self.num_servers:
            raise ConfigError(f"server_gpus: {len(self.server_gpus)} entries for num_servers={self.num_servers} "
                              "(one CUDA_VISIBLE_DEVICES value per started server)")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.sleep_level not in (0, 1, 2):
            raise ConfigError(f"sleep_level: expected 0 (never), 1 or 2, got {self.sleep_level}")
        if self.placement == "separate" and not self.external_urls:
            raise ConfigError("placement: separate uses the servers at rollout.server_urls (or server_url); "
                              "none is set")
        if self.placement == "colocated":
            if self.external_urls:
                raise ConfigError("server_urls: placement colocated starts its own servers on every node; use "
                                  "placement: separate for servers run elsewhere")
            if self.engine != "server":
                raise ConfigError("engine: placement colocated runs generation servers (engine: server)")
            if self.num_servers != 1 or self.server_gpus:
                raise ConfigError("num_servers/server_gpus: placement colocated derives its servers from each "
                                  "node's GPUs (one per tensor_parallel_size of them); leave them unset")
        from megatron_trace.rollout.platform import resolve_weight_sync

        # Not a dataclass field: derived, and re-derived on every load (the platform may differ).
        self._weight_transport = resolve_weight_sync(
            self.weight_sync, placement=self.placement, engine=self.engine, external=bool(self.external_urls),
            server_gpus=self.server_gpus)

    @property
    def weight_transport(self) -> str:
        """What `weight_sync` resolved to when the config was loaded: http, shm, nccl or inprocess."""
        return self._weight_transport

    @property
    def external_urls(self) -> list[str]:
        """The already running generation servers to use (server_urls, or [server_url]); [] = start our own."""
        return list(self.server_urls) if self.server_urls else ([self.server_url] if self.server_url else [])
