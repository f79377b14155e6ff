"""What the generation engine takes and returns; shared by rollouts, self-annotation and evaluation.

These are plain data (no vLLM import), so code that only consumes rollouts imports without vLLM installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


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


class GenerationEngine(Protocol):
    """Anything that can generate: the in-process vLLM engine, or the HTTP client of a generation server."""

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """Returns, for each prompt, `sampling.n` generations."""
        ...
