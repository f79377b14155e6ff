"""Split a response into numbered segments (lines, then sentences) that keep their character offsets.

The annotator names segments by number; the offsets turn its answer back into character spans of the exact
response text, and from there into token masks (`annotate.spans`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) and then whitespace. Decimals
# ("3.5") and LaTeX ("\frac{1}{2}.") without a following space do not split.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_LINE = re.compile(r"[^\n]+")


@dataclass(frozen=True)
class Segment:
    """One numbered piece of the response: text == response[start:end]; index counts from 1."""

    index: int
    start: int
    end: int
    text: str


def split_segments(text: str) -> list[Segment]:
    """Numbered segments of `text`: each non-blank line, split further into sentences.

    Segments carry no leading/trailing whitespace; together they cover every non-whitespace character of
    `text` exactly once, in order. An empty or blank text has no segments.
    """
    pieces: list[tuple[int, int]] = []
    for line in _LINE.finditer(text):
        start = line.start()
        for m in _SENTENCE_END.finditer(line.group()):
            closers = len(m.group()) - len(m.group().lstrip("\"')]"))  # they stay with the sentence
            pieces.append((start, line.start() + m.start() + closers))
            start = line.start() + m.end()
        pieces.append((start, line.end()))
    segments: list[Segment] = []
    for a, b in pieces:
        raw = text[a:b]
        lead = len(raw) - len(raw.lstrip())
        stripped = raw.strip()
        if stripped:
            a += lead
            segments.append(Segment(len(segments) + 1, a, a + len(stripped), stripped))
    return segments


def segment_char_span(segments: list[Segment], first: int, last: int) -> tuple[int, int]:
    """Char range [start, end) covering segments first..last (1-based, inclusive)."""
    if not 1 <= first <= last <= len(segments):
        raise ValueError(f"segment range {first}-{last} is outside 1-{len(segments)}")
    return segments[first - 1].start, segments[last - 1].end
