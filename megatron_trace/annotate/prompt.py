"""The annotator's prompt: problem, reference solution, the response as numbered segments, and the verdict.

For a correct response it asks for KEY segments (the steps that make the answer right); for an incorrect one,
ERROR segments (where the reasoning goes wrong). Each span gets a coarse type from a fixed taxonomy
(annotate.labels; label_mode "type") or a short free-text diagnostic label (label_mode "free_text"); either later
goes into the teacher's privileged prompt, so labels must describe the issue without quoting the response.
The reply format is JSON, parsed by `annotate.parse.parse_annotation`.
"""

from __future__ import annotations

from typing import Sequence

from megatron_trace.annotate.segments import Segment

SYSTEM_PROMPT = (
    "You are a careful grader of step-by-step math solutions. You compare a student's response with a "
    "reference solution and point out which numbered segments matter. Reply with JSON only."
)

_KEY_TASK = (
    "The response was judged CORRECT. List its KEY segments: the few steps that are essential for reaching the "
    "right answer (the decisive idea, setting up the right equation, the crucial computation). Skip restatements, "
    "filler and routine arithmetic."
)
_ERROR_TASK = (
    "The response was judged INCORRECT. List its ERROR segments: the steps where the reasoning goes wrong (the "
    "first wrong step first, then steps that carry the error forward only if they add a new mistake)."
)
_FORMAT = (
    "Most important first, at most {max_spans} entries, covering few segments. Give each a short diagnostic "
    "label (at most 12 words) that names the kind of step or mistake WITHOUT quoting the response. Reply with "
    'exactly this JSON and nothing else:\n{{"spans": [{{"segments": "3-5", "label": "sets up the equation for '
    'the total cost"}}, {{"segments": "8", "label": "..."}}]}}\n"segments" is one number or a range "a-b" of '
    "segment numbers from the list above."
)


_TYPE_FORMAT = (
    "Most important first, at most {max_spans} entries, covering few segments. Give each the one type from this "
    "list that fits it best: {types}. Reply with exactly this JSON and nothing else:\n"
    '{{"spans": [{{"segments": "3-5", "type": "{example}"}}, {{"segments": "8", "type": "..."}}]}}\n'
    '"segments" is one number or a range "a-b" of segment numbers from the list above.'
)


def format_segments(segments: list[Segment]) -> str:
    """Segments as `[i] text` lines (newlines inside a segment cannot occur: segments are within one line)."""
    return "\n".join(f"[{s.index}] {s.text}" for s in segments)


def annotator_messages(
    problem: str, solution: str, segments: list[Segment], correct: bool, *, max_spans: int = 4,
    types: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """Chat messages (OpenAI format) asking for key (correct) or error (incorrect) segments as JSON.

    types: the taxonomy for this verdict (key types for a correct response, error types otherwise): each span is
    asked for one of them; None asks for a free-text label instead.
    """
    if not segments:
        raise ValueError("annotator_messages: the response has no segments (empty response)")
    if types is not None:
        fmt = _TYPE_FORMAT.format(max_spans=max_spans, types=", ".join(types), example=types[0])
    else:
        fmt = _FORMAT.format(max_spans=max_spans)
    user = (
        f"## Problem\n{problem.strip()}\n\n"
        f"## Reference solution\n{solution.strip()}\n\n"
        f"## Student response, split into {len(segments)} numbered segments\n{format_segments(segments)}\n\n"
        f"## Task\n{_KEY_TASK if correct else _ERROR_TASK}\n{fmt}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
