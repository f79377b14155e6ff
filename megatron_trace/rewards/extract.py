"""Final-answer extraction from a model response: the last `\\boxed{...}` after any Qwen3 `<think>` block.

Pure string functions; no sympy here, so they are cheap enough to call anywhere.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def strip_think(response: str) -> str | None:
    """The part of `response` after its reasoning block, or None when the block never closed.

    Qwen3 writes `<think> ... </think>` before the answer (an empty block when thinking is off). The answer is
    what follows the LAST `</think>`; a response with `<think>` but no closing tag was cut off mid-thought
    (finish_reason "length") and has no answer yet. A response without tags is returned unchanged.
    """
    close = response.rfind(THINK_CLOSE)
    if close >= 0:
        return response[close + len(THINK_CLOSE) :]
    if THINK_OPEN in response:
        return None
    return response


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None when there is none.

    Handles nesting (`\\boxed{\\frac{1}{2}}`), escaped braces (`\\{` / `\\}` count as text, not grouping), and
    the brace-less form `\\boxed 5`. When the last one is unclosed (truncated output) there is no answer,
    even if an earlier box closed.
    """
    pos, macro = max((text.rfind(m), m) for m in ("\\boxed", "\\fbox"))
    if pos < 0:
        return None
    content = _group_after(text, pos + len(macro))
    return None if content is None else content.strip()


def _group_after(text: str, i: int) -> str | None:
    """The brace group (or single token for `\\boxed 5`) starting at text[i]; None if unbalanced or absent."""
    n = len(text)
    if i < n and text[i] == " ":
        # `\boxed 5`: TeX takes the next token as the argument.
        j = i
        while j < n and text[j] == " ":
            j += 1
        k = j
        while k < n and not text[k].isspace() and text[k] not in "$\\":
            k += 1
        return text[j:k] if k > j else None
    if i >= n or text[i] != "{":
        return None
    depth = 0
    j = i
    while j < n:
        c = text[j]
        if c == "\\" and j + 1 < n and text[j + 1] in "{}":
            j += 2  # an escaped brace is a literal character, not grouping
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def extract_boxed_answer(response: str) -> str | None:
    """The final boxed answer of a response (after its think block), or None when it gave none."""
    body = strip_think(response)
    if body is None:
        return None
    return last_boxed(body)
