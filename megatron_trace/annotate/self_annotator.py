"""Self-annotation: the policy annotates its own responses through the project's generation engine.

Same prompt as the external annotator, rendered with the policy's chat template, decoded greedily.
"""

from __future__ import annotations

from typing import Sequence

from megatron_trace.annotate.pipeline import ChatAnnotator, Completion
from megatron_trace.data.prompts import build_prompt_ids
from megatron_trace.rollout.types import GenerationEngine, SamplingConfig


class SelfAnnotator(ChatAnnotator):
    """Annotator backed by a `GenerationEngine` (in-process vLLM or the generation server's client).

    enable_thinking: let a Qwen3 policy think before answering (the parser reads what follows `</think>`);
    off by default: annotations are short JSON and thinking costs tokens.
    """

    def __init__(self, engine: GenerationEngine, tokenizer, *, max_tokens: int = 1024, enable_thinking: bool = False):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.enable_thinking = enable_thinking

    def check_reachable(self) -> None:
        """Nothing to check: the engine is the one that serves rollouts."""

    def complete_batch(self, messages: Sequence[list[dict[str, str]]]) -> list[Completion]:
        prompts = [build_prompt_ids(self.tokenizer, m, enable_thinking=self.enable_thinking) for m in messages]
        sampling = SamplingConfig(temperature=0.0, max_tokens=self.max_tokens, n=1, logprobs=False)
        try:
            generations = self.engine.generate(prompts, sampling)
        except Exception as e:  # the annotate stage degrades to "no spans"; the trainer logs the count
            return [Completion(None, f"generation engine failed: {type(e).__name__}: {e}") for _ in messages]
        return [Completion(self.tokenizer.decode(g[0].token_ids, skip_special_tokens=True)) for g in generations]
