"""The annotate section of the config, and the annotator it describes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_trace.annotate.client import AnnotatorClientConfig, OpenAIAnnotator
from megatron_trace.annotate.labels import DEFAULT_ERROR_TYPES, DEFAULT_KEY_TYPES, check_taxonomy
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
    # type: the annotator gives each span one coarse type from key_types (key spans of a correct response) or
    # error_types (error spans of an incorrect one), and the teacher's privileged prompt holds the reference
    # solution plus those types only; free_text: short free-text labels instead (ablation).
    label_mode: Literal["type", "free_text"] = "type"
    key_types: list[str] = field(default_factory=lambda: list(DEFAULT_KEY_TYPES))
    error_types: list[str] = field(default_factory=lambda: list(DEFAULT_ERROR_TYPES))

    def __post_init__(self) -> None:
        for name in ("key_types", "error_types"):
            try:
                check_taxonomy(name, getattr(self, name))
            except ValueError as e:
                raise ConfigError(str(e)) from e
        if self.annotator == "external" and not self.client.model:
            raise ConfigError("client.model: required when annotator is 'external' (the served model name)")
        if self.max_spans < 1:
            raise ConfigError(f"max_spans: must be >= 1, got {self.max_spans}")

    @property
    def taxonomy(self) -> Optional[tuple[list[str], list[str]]]:
        """(key types, error types) in label_mode type, else None (free-text labels)."""
        return (self.key_types, self.error_types) if self.label_mode == "type" else None


def build_annotator(cfg: AnnotateConfig, *, engine=None, tokenizer=None, max_model_len: int | None = None) -> Annotator:
    """The annotator `cfg` describes; "self" needs the generation engine and the policy's tokenizer (and the
    engine's max_model_len, so that each request is checked against the context on its own)."""
    if cfg.annotator == "external":
        return OpenAIAnnotator(cfg.client)
    if cfg.annotator == "reference_match":
        from megatron_trace.annotate.reference_match import ReferenceMatchAnnotator

        return ReferenceMatchAnnotator(max_spans=cfg.max_spans)
    if engine is None or tokenizer is None:
        raise ValueError("self-annotation needs the generation engine and the tokenizer")
    return SelfAnnotator(engine, tokenizer, max_tokens=cfg.self_max_tokens, enable_thinking=cfg.self_enable_thinking,
                         max_model_len=max_model_len)
