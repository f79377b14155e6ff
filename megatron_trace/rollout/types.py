"""What the generation engine takes and returns; shared by rollouts, self-annotation and evaluation.

These are plain data (no vLLM import), so code that only consumes rollouts imports without vLLM installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import torch


@dataclass
class SamplingConfig:
    """Sampling settings for one generate call."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_tokens: int = 256  # new tokens per response
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS
    n: int = 1  # responses per prompt (the GRPO group size)
    seed: int | None = None  # per-call seed; same seed + same weights = same samples
    logprobs: bool = True  # return the sampled tokens' raw (temperature-1) log-probs


@dataclass
class Generation:
    """One sampled response.

    token_ids: [L] response token ids (the prompt excluded); logprobs: [L] raw log-probs of those tokens under
    the sampling engine's weights (nats, temperature 1), empty if not requested; finish_reason: "stop" | "length".
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: int = 0


class WeightUpdateError(ValueError):
    """A weight update was refused (unknown name, wrong shape, missing tensors, bad bucket, stale version)."""


def target_weight_version(serving: int, requested: int | None) -> int:
    """The version an update will serve: `requested`, or serving + 1 when None. Versions only grow, so a target
    at or below the serving version is refused (WeightUpdateError)."""
    target = serving + 1 if requested is None else int(requested)
    if target <= serving:
        raise WeightUpdateError(f"target version {target} must exceed the serving version {serving}")
    return target


# One bucket of a weight update: HF-named full tensors (the trainer's weight bridge produces them).
WeightBucket = list[tuple[str, torch.Tensor]]
# progress(prompts done, prompts) during a generate call (progress bars)
ProgressFn = Callable[[int, int], None]


class GenerationEngine(Protocol):
    """Everything the trainer calls on a generation engine. Implemented by the in-process vLLM engine
    (`engine.VLLMEngine`), the HTTP client of a generation server (`client.RolloutClient`, and
    `launch.ManagedServer`, which owns a server process and its client) and a data-parallel pool of servers
    (`pool.EnginePool`)."""

    # Called as (prompts done, prompts) while a generate call runs (after each finished request where the engine
    # is remote, once at the end in process); None = no reports.
    on_progress: ProgressFn | None

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """Returns, for each prompt, `sampling.n` generations."""
        ...

    def update_weights(self, buckets: Iterable[WeightBucket], version: int | None = None) -> int:
        """Load a complete update (every weight of the model, in buckets); returns the version now serving
        (`target_weight_version`). A refused or failed update raises."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory for training (1: weights offloaded to host memory, 2: discarded)."""
        ...

    def wake_up(self) -> None:
        """Undo `sleep` (after level 2, push weights before generating)."""
        ...

    def close(self) -> None:
        """Release the engine (processes, memory, connections); idempotent."""
        ...
