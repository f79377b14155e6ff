"""A rule-based annotator for data whose reference solutions can be checked number by number.

For the shipped arithmetic/algebra problems (and any data whose worked solutions state every intermediate
value), a segment's correctness is decidable without a model: a segment is *key* when it states values of the
reference solution (the final answer first), and an *error* when it states a value the reference never
reaches. It needs no server, so the tiny CPU run and the tests exercise the full TRACE path (annotate -> spans
-> routes -> teacher -> KL) deterministically. Real runs use an external model (`OpenAIAnnotator`) or the
policy itself (`SelfAnnotator`).
"""

from __future__ import annotations

import re
from typing import Sequence

from megatron_trace.annotate.pipeline import Annotation, AnnotationRequest
from megatron_trace.annotate.segments import split_segments

__all__ = ["ReferenceMatchAnnotator", "numbers_in"]

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?")


def numbers_in(text: str) -> list[str]:
    """Numeric literals of `text` in order, normalised ("07" -> "7", "2.50" -> "2.5")."""
    out = []
    for m in _NUMBER.findall(text):
        if "/" in m or "." not in m:
            out.append(m.lstrip("0") or "0" if not m.startswith("-") else "-" + (m[1:].lstrip("0") or "0"))
        else:
            out.append(m.rstrip("0").rstrip("."))
    return out


class ReferenceMatchAnnotator:
    """Annotates by comparing each segment's numbers with the reference solution's.

    Correct response: key spans are the segments that state the gold answer (latest first), then other segments
    whose values all appear in the reference. Incorrect response: error spans are the segments stating a value
    absent from the reference and the problem (earliest first: the first wrong value is the one that matters).
    At most `max_spans` spans per response; labels are generic (never span text); types are coarse
    (annotate.labels defaults): "computation" for key spans, "arithmetic" for error spans.
    """

    def __init__(self, *, max_spans: int = 4):
        self.max_spans = max_spans

    on_progress = None  # annotating is local and instant: nothing to report

    def check_reachable(self) -> None:
        """Nothing to reach."""

    def close(self) -> None:
        """Nothing to release."""

    def annotate(self, requests: Sequence[AnnotationRequest], golds: Sequence[str], *,
                 max_spans: int | None = None, taxonomy=None) -> list[Annotation]:
        """max_spans: at most this many spans per response (default: the constructor's). taxonomy: ignored (the
        types are fixed: "computation" for key spans, "arithmetic" for error spans)."""
        if len(golds) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(golds)} gold answers")
        limit = self.max_spans if max_spans is None else max_spans
        return [self._one(r, g, limit) for r, g in zip(requests, golds)]

    def _one(self, req: AnnotationRequest, gold: str, max_spans: int) -> Annotation:
        segments = split_segments(req.response_text)
        if not segments:
            return Annotation(errors=["empty response: nothing to annotate"])
        known = set(numbers_in(req.solution)) | set(numbers_in(req.problem))
        gold_numbers = set(numbers_in(gold))
        picked: list[tuple[int, str]] = []
        if req.correct:
            states_answer = [s for s in reversed(segments) if gold_numbers & set(numbers_in(s.text))]
            picked += [(s.index, "the step that produces the final answer") for s in states_answer]
            for s in segments:
                nums = numbers_in(s.text)
                if nums and set(nums) <= known and all(s.index != i for i, _ in picked):
                    picked.append((s.index, "an intermediate value the solution relies on"))
        else:
            for s in segments:
                if set(numbers_in(s.text)) - known:
                    picked.append((s.index, "a value that does not follow from the problem"))
        picked = picked[:max_spans]
        by_index = {s.index: s for s in segments}
        out = Annotation()
        for index, label in picked:
            seg = by_index[index]
            out.char_spans.append((seg.start, seg.end))
            out.labels.append(label)
            out.types.append("computation" if req.correct else "arithmetic")
        return out
