"""Tolerant parsing of the annotator's reply into segment spans.

Annotators (external models or the policy itself) do not always reply with clean JSON. The parser accepts JSON
in code fences or inside prose, a bare list, a few spellings of the keys, segment ranges written "3-5",
"3 to 5", [3, 4, 5] or {"start": 3, "end": 5}. Indices outside 1..num_segments, duplicates and unreadable
entries are dropped and counted; nothing here raises on model output.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

MAX_SPANS = 64  # entries beyond this are dropped: a runaway reply must not cost more than a bounded effort
MAX_LABEL_CHARS = 100
MAX_REPLY_CHARS = 200_000
_MAX_JSON_STARTS = 256  # positions tried by the scan for JSON inside prose
_MAX_DEPTH = 4

_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.DOTALL)
_RANGE = re.compile(r"^\s*\[?\s*(\d{1,9})\s*(?:-|–|—|\.\.|to)\s*(\d{1,9})\s*\]?\s*$", re.IGNORECASE)
_SINGLE = re.compile(r"^\s*\[?\s*(?:segment\s*)?#?(\d{1,9})\s*\]?\s*$", re.IGNORECASE)
_LIST_KEYS = ("spans", "key_segments", "error_segments", "key_spans", "error_spans", "segments", "annotations")
_SEG_KEYS = ("segments", "segment", "segment_range", "range", "indices", "index", "span", "ids", "id")
_LABEL_KEYS = ("label", "diagnostic", "reason", "description", "type", "note")
_TYPE_KEYS = ("type", "category", "kind")


@dataclass
class ParsedAnnotation:
    """spans: (first_segment, last_segment, label), 1-based inclusive, in the annotator's order; types: the raw
    coarse type of each span ("" when the entry has none), parallel to spans; dropped: entries (or parts of
    entries) discarded; errors: why, for the log."""

    spans: list[tuple[int, int, str]] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    dropped: int = 0
    errors: list[str] = field(default_factory=list)


def parse_annotation(text: str, num_segments: int) -> ParsedAnnotation:
    """Spans named by an annotator reply, for a response of `num_segments` segments."""
    out = ParsedAnnotation()
    if not isinstance(text, str) or not text.strip():
        out.errors.append("empty annotator output")
        return out
    if len(text) > MAX_REPLY_CHARS:
        out.errors.append(f"annotator output truncated from {len(text)} to {MAX_REPLY_CHARS} characters")
        text = text[:MAX_REPLY_CHARS]
    close = text.rfind("</think>")  # a thinking annotator's reasoning is not its answer
    if close >= 0:
        text = text[close + len("</think>") :]
    best: ParsedAnnotation | None = None
    for value in _json_candidates(text):
        items = _find_items(value, 0)
        if items is None:
            continue
        parsed = _read_items(items, num_segments)
        if best is None:
            best = parsed
        if parsed.spans:  # the first candidate that names any usable span wins
            best = parsed
            break
    if best is None:
        out.errors.append("no annotation JSON found in the annotator output")
        return out
    best.errors = out.errors + best.errors
    return best


def _read_items(items: list, num_segments: int) -> ParsedAnnotation:
    out = ParsedAnnotation()
    seen: set[tuple[int, int]] = set()
    for n, item in enumerate(items):
        if len(out.spans) >= MAX_SPANS:
            out.dropped += len(items) - n
            out.errors.append(f"more than {MAX_SPANS} spans; the rest dropped")
            break
        ranges, label, kind = _read_item(item)
        if not ranges:
            out.dropped += 1
            out.errors.append(f"entry {n}: no segment numbers in {_short(item)}")
            continue
        for first, last in ranges:
            if first > last:
                first, last = last, first
            if last < 1 or first > num_segments:
                out.dropped += 1
                out.errors.append(f"entry {n}: segments {first}-{last} outside 1-{num_segments}")
                continue
            if first < 1 or last > num_segments:
                out.dropped += 1  # the out-of-range part is dropped; the rest is kept
                out.errors.append(f"entry {n}: segments {first}-{last} clipped to 1-{num_segments}")
                first, last = max(first, 1), min(last, num_segments)
            if (first, last) in seen:
                out.dropped += 1
                out.errors.append(f"entry {n}: duplicate span {first}-{last}")
                continue
            seen.add((first, last))
            out.spans.append((first, last, label))
            out.types.append(kind)
    return out


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def _json_candidates(text: str):
    """JSON values found in the reply: fenced blocks first, then the whole text, then values inside prose."""
    decoder = json.JSONDecoder()
    for m in _FENCE.finditer(text):
        value = _loads(m.group(1).strip())
        if value is not None:
            yield value
    value = _loads(text.strip())
    if value is not None:
        yield value
    # Objects before lists: prose like "segments [3] and [5]" must not shadow the JSON object after it.
    for opener in "{[":
        tried = 0
        for m in re.finditer(re.escape(opener), text):
            if tried >= _MAX_JSON_STARTS:
                break
            tried += 1
            try:
                value, _ = decoder.raw_decode(text, m.start())
            except (ValueError, RecursionError):  # also: ints too long to convert, absurd nesting
                continue
            yield value


def _loads(s: str):
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        return None


def _find_items(value, depth: int) -> list | None:
    """The list of span entries inside a decoded JSON value, or None if it holds none."""
    if depth > _MAX_DEPTH:
        return None
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        return _find_items(_loads(value), depth + 1)  # JSON encoded inside a string
    if isinstance(value, list):
        return [value] if value and all(_is_index(x) for x in value) else value
    if not isinstance(value, dict):
        return None
    for key in _LIST_KEYS:
        if key in value:
            inner = value[key]
            if isinstance(inner, list):
                return [inner] if inner and all(_is_index(x) for x in inner) else inner
            if isinstance(inner, (dict, str)):
                found = _find_items(inner, depth + 1)
                if found is not None:
                    return found
    if any(k in value for k in _SEG_KEYS + ("start", "first")):
        return [value]  # a single entry without the surrounding list
    for inner in value.values():
        if isinstance(inner, (dict, list)):
            found = _find_items(inner, depth + 1)
            if found is not None:
                return found
    return None


def _is_index(x) -> bool:
    return _as_int(x) is not None


def _as_int(x) -> int | None:
    """An integer segment number from an int, an integral float or a numeric string; None otherwise."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return int(x) if math.isfinite(x) and x.is_integer() and abs(x) < 2**31 else None
    if isinstance(x, str):
        m = _SINGLE.match(x)
        return int(m.group(1)) if m else None
    return None


def _ranges(x) -> list[tuple[int, int]]:
    """Segment ranges named by one value: 3, "3", "3-5", [3, 4, 5] (contiguous runs), [[3, 5]]."""
    n = _as_int(x)
    if n is not None:
        return [(n, n)]
    if isinstance(x, str):
        m = _RANGE.match(x)
        if m:
            return [(int(m.group(1)), int(m.group(2)))]
        parts = [p for p in re.split(r"\s*,\s*", x.strip()) if p]
        if len(parts) > 1:
            return [r for p in parts for r in _ranges(p)]
        return []
    if isinstance(x, list):
        ints = [_as_int(v) for v in x]
        if x and all(v is not None for v in ints):
            runs: list[tuple[int, int]] = []
            for v in ints:  # keep the annotator's order; merge consecutive numbers into one range
                if runs and v == runs[-1][1] + 1:
                    runs[-1] = (runs[-1][0], v)
                else:
                    runs.append((v, v))
            return runs
        out = []
        for v in x:  # a list of pairs [[3, 5], [8, 8]] names ranges
            pair = [_as_int(u) for u in v] if isinstance(v, list) else []
            if len(pair) == 2 and None not in pair:
                out.append((pair[0], pair[1]))
            elif not isinstance(v, dict):
                out.extend(_ranges(v))
        return out
    return []


def _read_item(item) -> tuple[list[tuple[int, int]], str, str]:
    """(ranges, label, raw type) of one span entry."""
    if not isinstance(item, dict):
        return _ranges(item), "", ""
    label = kind = ""
    for key in _LABEL_KEYS:
        if isinstance(item.get(key), str):
            label = " ".join(item[key].split())[:MAX_LABEL_CHARS]
            break
    for key in _TYPE_KEYS:
        if isinstance(item.get(key), str):
            kind = " ".join(item[key].split())[:MAX_LABEL_CHARS]
            break
    for key in _SEG_KEYS:
        if key in item:
            return _ranges(item[key]), label, kind
    first = _as_int(item.get("start", item.get("first")))
    last = _as_int(item.get("end", item.get("last", item.get("start", item.get("first")))))
    if first is None or last is None:
        return [], label, kind
    return [(first, last)], label, kind
