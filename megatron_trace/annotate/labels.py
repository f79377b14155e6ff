"""Coarse span labels: a fixed, configurable taxonomy of diagnostic types.

The teacher's privileged context carries, per response, only the types of the spans that survived the coverage cap
(never the span's text, never a free-text description): the TRACE paper gives the teacher a coarse diagnostic type,
not the span's content. Free-text labels stay available for ablations (annotate.label_mode: free_text).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

__all__ = ["DEFAULT_KEY_TYPES", "DEFAULT_ERROR_TYPES", "normalize_type", "unique_in_order", "check_taxonomy"]

# Defaults for math reasoning: what makes a step of a correct solution key, what went wrong in an incorrect one.
DEFAULT_KEY_TYPES = ("setup", "key_insight", "computation", "case_analysis", "verification")
DEFAULT_ERROR_TYPES = ("arithmetic", "algebra", "misread_problem", "wrong_method", "unjustified_step", "incomplete")

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def normalize_type(raw: str, allowed: Sequence[str]) -> str:
    """The taxonomy entry `raw` names ("Key insight", "key-insight" -> "key_insight"), or "" when it names none."""
    name = re.sub(r"[\s\-]+", "_", str(raw).strip().lower())
    return name if name in allowed else ""


def unique_in_order(items: Iterable[str]) -> list[str]:
    """Non-empty items, first occurrence only, in order."""
    seen: set[str] = set()
    out = []
    for item in items:
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


def check_taxonomy(name: str, types: Sequence[str]) -> None:
    """Raise ValueError naming `name` unless `types` is a non-empty list of distinct snake_case names."""
    if not types:
        raise ValueError(f"{name}: the taxonomy needs at least one type")
    for t in types:
        if not isinstance(t, str) or not _TYPE_NAME.match(t):
            raise ValueError(f"{name}: {t!r} is not a snake_case type name (a-z, 0-9, _)")
    if len(set(types)) != len(types):
        raise ValueError(f"{name}: a type is listed twice in {list(types)}")
