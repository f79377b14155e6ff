"""One entry point for the annotate stage: requests in, character spans + diagnostic labels out.

    annotations = annotate_batch(annotator, [AnnotationRequest(problem, solution, response_text, correct), ...])

`annotator` is anything with `complete_batch(list of chat messages) -> list[Completion]` (a `ChatAnnotator`): the
OpenAI-compatible client (`annotate.client.OpenAIAnnotator`) or the policy itself
(`annotate.self_annotator.SelfAnnotator`). The trainer calls every annotator through the `Annotator` protocol;
`annotate.reference_match.ReferenceMatchAnnotator` implements it without a model.
A failed call marks its item failed (no spans) and is counted; it never raises into the training step.

An annotator with a context limit (`fits(messages) -> bool`: the self-annotator, whose engine also serves
rollouts) gets each request checked on its own: one that does not fit is shortened -- long segments elided in the
middle with a marker, segment numbers unchanged, so the reply still maps to the original text -- or, failing
that, skipped and counted. No request the engine would refuse is ever sent, so one long response cannot fail the
whole batched call.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from megatron_trace.annotate.labels import normalize_type
from megatron_trace.annotate.parse import parse_annotation
from megatron_trace.annotate.prompt import annotator_messages
from megatron_trace.annotate.segments import Segment, segment_char_span, split_segments

# A label repeating this many consecutive words of its span would leak span text into the privileged prompt.
_QUOTE_WORDS = 5
# What stands for the elided middle of a long segment in a shortened annotation prompt.
ELISION_MARKER = " [...] "
# Longest segment text kept whole, tried in turn until the prompt fits (characters).
_ELISION_LIMITS = (1024, 512, 256, 128, 64, 32)


@dataclass
class Completion:
    """The annotator's reply to one prompt: text, or None with the error that prevented it."""

    text: str | None
    error: str | None = None


class Annotator(Protocol):
    """Everything the trainer calls on an annotator."""

    # Called as (responses done, responses) while an annotate call runs; None = no reports.
    on_progress: Callable[[int, int], None] | None

    def annotate(self, requests: Sequence[AnnotationRequest], golds: Sequence[str], *,
                 max_spans: int, taxonomy: tuple[Sequence[str], Sequence[str]] | None = None) -> list[Annotation]:
        """One Annotation per request (golds: the gold answers, for annotators that compare with them); a failed
        item comes back marked failed, never as an exception. taxonomy: (key types, error types) to label spans
        with (Annotation.types); None = free-text labels."""
        ...

    def check_reachable(self) -> None:
        """Raise a clear error now if the annotator cannot be used (start-up check)."""
        ...

    def close(self) -> None:
        """Release connections and workers; idempotent."""
        ...


class ChatAnnotator:
    """Base of the annotators that answer the annotator prompt as a chat model: subclasses implement
    `complete_batch(chats) -> list[Completion]` (one reply per chat; failures as Completion(None, error)) and
    `check_reachable`; the rest of `Annotator` is here."""

    on_progress: Callable[[int, int], None] | None = None

    def complete_batch(self, messages: Sequence[list[dict[str, str]]]) -> list[Completion]:
        raise NotImplementedError

    def annotate(self, requests: Sequence[AnnotationRequest], golds: Sequence[str], *,
                 max_spans: int = 4, taxonomy: tuple[Sequence[str], Sequence[str]] | None = None
                 ) -> list[Annotation]:
        return annotate_batch(self, requests, max_spans=max_spans, taxonomy=taxonomy)

    def close(self) -> None:
        """Nothing to release unless a subclass holds connections."""


@dataclass
class AnnotationRequest:
    """One response to annotate: its problem, the reference solution, the decoded response and the verdict."""

    problem: str
    solution: str
    response_text: str
    correct: bool


@dataclass
class Annotation:
    """Spans of one response, in the annotator's priority order.

    char_spans: (start, end) character ranges of the response text (end exclusive); labels: one diagnostic label
    per span ("" when none or withheld); types: one coarse type per span from the taxonomy ("" when the reply's
    type is not in it, or no taxonomy was asked for); dropped: entries of the reply discarded by the parser;
    failed: no reply came back; shortened: the prompt had long segments elided to fit the context; skipped: the
    prompt did not fit even so and was not sent; errors: why, for the log.
    """

    char_spans: list[tuple[int, int]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    dropped: int = 0
    failed: bool = False
    shortened: bool = False
    skipped: bool = False
    errors: list[str] = field(default_factory=list)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _safe_label(label: str, span_text: str) -> str:
    """The label, or "" if it quotes the span: the privileged prompt may hold labels, never span text.

    Quoting = any run of `_QUOTE_WORDS` consecutive words of the span (case and punctuation ignored) inside the
    label; for spans shorter than that, the whole span when it has at least 3 words.
    """
    span_words, label_words = _words(span_text), _words(label)
    n = min(_QUOTE_WORDS, len(span_words))
    if n < 3:
        return label
    span_grams = {tuple(span_words[i : i + n]) for i in range(len(span_words) - n + 1)}
    if any(tuple(label_words[i : i + n]) in span_grams for i in range(len(label_words) - n + 1)):
        return ""
    return label


def elide_segment(segment: Segment, limit: int) -> Segment:
    """The segment with the middle of its text replaced by ELISION_MARKER when longer than `limit` characters
    (index, start, end unchanged: the annotator's segment numbers still map to the original text)."""
    if len(segment.text) <= limit:
        return segment
    head = max(1, limit // 2)
    tail = max(1, limit - head)
    return dataclasses.replace(segment, text=segment.text[:head].rstrip() + ELISION_MARKER +
                               segment.text[-tail:].lstrip())


def shorten_to_fit(segments: list[Segment], fits: Callable[[list[Segment]], bool]) -> list[Segment] | None:
    """The segments with long ones elided (longest kept text 1024, 512, ... 32 characters) until `fits` says
    the prompt fits; None if it does not fit even at the shortest."""
    for limit in _ELISION_LIMITS:
        shortened = [elide_segment(s, limit) for s in segments]
        if shortened != segments and fits(shortened):
            return shortened
    return None


def annotate_batch(annotator: ChatAnnotator, requests: Sequence[AnnotationRequest], *, max_spans: int = 4,
                   taxonomy: tuple[Sequence[str], Sequence[str]] | None = None) -> list[Annotation]:
    """Annotate each request: segment, prompt, one annotator call per response, parse, map to char spans.

    taxonomy: (key types, error types): each span is asked for a coarse type (Annotation.types); None asks for
    free-text labels only. An empty response is not sent (it has nothing to mark) and comes back with no spans
    and an error saying so; a prompt longer than the annotator's context is shortened or skipped (module doc).
    """
    results: list[Annotation] = [Annotation() for _ in requests]
    segmented = [split_segments(r.response_text) for r in requests]
    for i, segs in enumerate(segmented):
        if not segs:
            results[i].errors.append("empty response: nothing to annotate")
    fits = getattr(annotator, "fits", None)

    def types_for(i: int):
        return None if taxonomy is None else list(taxonomy[0] if requests[i].correct else taxonomy[1])

    def chat(i: int, segs: list[Segment]):
        r = requests[i]
        return annotator_messages(r.problem, r.solution, segs, r.correct, max_spans=max_spans, types=types_for(i))

    todo, chats = [], []
    for i, segs in enumerate(segmented):
        if not segs:
            continue
        messages = chat(i, segs)
        if fits is not None and not fits(messages):
            shortened = shorten_to_fit(segs, lambda s, i=i: fits(chat(i, s)))
            if shortened is None:
                results[i].skipped = True
                results[i].errors.append("annotation prompt exceeds the annotator's context even with long "
                                         "segments elided: skipped")
                continue
            results[i].shortened = True
            messages = chat(i, shortened)
        todo.append(i)
        chats.append(messages)
    if not todo:
        return results
    replies = annotator.complete_batch(chats)
    if len(replies) != len(chats):
        raise RuntimeError(f"annotator returned {len(replies)} replies for {len(chats)} prompts")
    for i, reply in zip(todo, replies):
        out = results[i]
        if reply.text is None:
            out.failed = True
            out.errors.append(f"annotator call failed: {reply.error}")
            continue
        segs = segmented[i]
        parsed = parse_annotation(reply.text, len(segs))
        out.dropped = parsed.dropped
        out.errors.extend(parsed.errors)
        text = requests[i].response_text
        allowed = types_for(i) or ()
        for (first, last, label), kind in zip(parsed.spans, parsed.types):
            start, end = segment_char_span(segs, first, last)
            out.char_spans.append((start, end))
            out.labels.append(_safe_label(label, text[start:end]))
            out.types.append(normalize_type(kind, allowed))
    return results


def annotation_metrics(annotations: Sequence[Annotation]) -> dict[str, float]:
    """Plain scalars for the trainer's log: failures, parser drops, spans per response, unusable replies."""
    n = max(len(annotations), 1)
    return {
        "annotate/failed": float(sum(a.failed for a in annotations)),
        "annotate/shortened": float(sum(a.shortened for a in annotations)),
        "annotate/skipped_too_long": float(sum(a.skipped for a in annotations)),
        "annotate/dropped": float(sum(a.dropped for a in annotations)),
        "annotate/spans_per_response": sum(len(a.char_spans) for a in annotations) / n,
        "annotate/no_spans_frac": sum(not a.char_spans for a in annotations) / n,
    }
