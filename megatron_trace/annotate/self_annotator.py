"""Self-annotation: the policy annotates its own responses through the project's generation engine.

Same prompt as the external annotator, rendered with the policy's chat template, decoded greedily. The engine
refuses a whole batched call when one request exceeds its context (prompt + reply room > max_model_len), so each
prompt is checked on its own (`fits`, used by `annotate_batch` to shorten or skip) and `complete_batch` never sends
one that does not fit.
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

    def __init__(self, engine: GenerationEngine, tokenizer, *, max_tokens: int = 1024, enable_thinking: bool = False,
                 max_model_len: int | None = None):
        if max_model_len is not None and max_tokens >= max_model_len:
            raise ValueError(f"self-annotation reply length max_tokens={max_tokens} leaves no room for a prompt in "
                             f"the engine's max_model_len={max_model_len}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.enable_thinking = enable_thinking
        self.max_model_len = max_model_len  # the engine's context (prompt + reply); None = unchecked

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return build_prompt_ids(self.tokenizer, messages, enable_thinking=self.enable_thinking)

    def fits(self, messages: list[dict[str, str]]) -> bool:
        """Whether the rendered prompt plus the full reply room (max_tokens) fits the engine's context."""
        if self.max_model_len is None:
            return True
        return len(self._prompt_ids(messages)) + self.max_tokens <= self.max_model_len

    def check_reachable(self) -> None:
        """Nothing to check: the engine is the one that serves rollouts."""

    def complete_batch(self, messages: Sequence[list[dict[str, str]]]) -> list[Completion]:
        prompts = [self._prompt_ids(m) for m in messages]
        out: list[Completion | None] = [None] * len(prompts)
        send = []
        for i, ids in enumerate(prompts):
            if self.max_model_len is not None and len(ids) + self.max_tokens > self.max_model_len:
                out[i] = Completion(None, f"prompt of {len(ids)} tokens + {self.max_tokens} reply tokens exceeds "
                                          f"max_model_len={self.max_model_len}; not sent")
            else:
                send.append(i)
        if not send:
            return out
        sampling = SamplingConfig(temperature=0.0, max_tokens=self.max_tokens, n=1, logprobs=False)
        try:
            generations = self.engine.generate([prompts[i] for i in send], sampling)
        except Exception as e:  # the annotate stage degrades to "no spans"; the trainer logs the count
            for i in send:
                out[i] = Completion(None, f"generation engine failed: {type(e).__name__}: {e}")
            return out
        for i, g in zip(send, generations):
            out[i] = Completion(self.tokenizer.decode(g[0].token_ids, skip_special_tokens=True))
        return out
