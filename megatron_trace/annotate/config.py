"""The annotate section of the config, and the annotator it describes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_trace.annotate.client import AnnotatorClientConfig, OpenAIAnnotator
from megatron_trace.annotate.pipeline import Annotator
from megatron_trace.annotate.self_annotator import SelfAnnotator
from megatron_trace.annotate.spans import SpanMaskConfig
from megatron_trace.config_base import ConfigError


@dataclass
class AnnotateConfig:
    """Who annotates, how many spans it may name, and how spans become token masks and routes.

    annotator: "external" (an OpenAI-compatible server, see `client`), "self" (the policy, through the
    generation engine that serves rollouts) or "reference_match" (rule-based, for data whose worked solutions
    state every intermediate value, like the shipped arithmetic set; see `reference_match.py`).
    """

    annotator: Literal["external", "self", "reference_match"] = "self"
    client: AnnotatorClientConfig = field(default_factory=AnnotatorClientConfig)  # used when "external"
    max_spans: int = 4  # spans asked for per response
    self_max_tokens: int = 1024  # reply length for self-annotation
    self_enable_thinking: bool = False
    spans: SpanMaskConfig = field(default_factory=SpanMaskConfig)

    def __post_init__(self) -> None:
        if self.annotator == "external" and not self.client.model:
            raise ConfigError("client.model: required when annotator is 'external' (the served model name)")
        if self.max_spans < 1:
            raise ConfigError(f"max_spans: must be >= 1, got {self.max_spans}")


def build_annotator(cfg: AnnotateConfig, *, engine=None, tokenizer=None) -> Annotator:
    """The annotator `cfg` describes; "self" needs the generation engine and the policy's tokenizer."""
    if cfg.annotator == "external":
        return OpenAIAnnotator(cfg.client)
    if cfg.annotator == "reference_match":
        from megatron_trace.annotate.reference_match import ReferenceMatchAnnotator

        return ReferenceMatchAnnotator(max_spans=cfg.max_spans)
    if engine is None or tokenizer is None:
        raise ValueError("self-annotation needs the generation engine and the tokenizer")
    return SelfAnnotator(engine, tokenizer, max_tokens=cfg.self_max_tokens, enable_thinking=cfg.self_enable_thinking)
