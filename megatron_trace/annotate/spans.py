"""Spans -> token masks -> token routes (docs/design.md, "The step", 3-4).

Responses arrive as the sampled token ids. `token_char_offsets` gives each sampled token's character range in
`tokenizer.decode(token_ids)` without re-tokenising the text (re-encoding can produce different ids, and the
loss needs the sampled ones). Annotator spans, as character ranges of that text, then become a [L] bool mask,
capped at a fraction of the response's tokens, and the mask plus the verifier's verdict become route ids.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import torch

from megatron_trace.config_base import ConfigError
from megatron_trace.routes import routes_from_spans

CharSpan = tuple[int, int]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-level alphabet: each printable stand-in character -> the byte it encodes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, token_ids: Sequence[int]) -> list[bytes] | None:
    """The raw bytes each token contributes to the decoded text, or None if the tokenizer is not byte-level BPE.

    Added tokens (`<think>`, `<|im_end|>`) decode to their literal content; the rest are byte-level symbols.
    """
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    decoder = _byte_decoder()
    pieces = tokenizer.convert_ids_to_tokens(list(token_ids))
    out: list[bytes] = []
    for tid, piece in zip(token_ids, pieces):
        if tid in added:
            out.append(added[tid].encode("utf-8"))
            continue
        if piece is None:
            return None
        try:
            out.append(bytes(decoder[c] for c in piece))
        except KeyError:
            return None  # not a byte-level vocabulary (e.g. sentencepiece)
    return out


def _offsets_from_bytes(pieces: list[bytes]) -> tuple[str, list[CharSpan]]:
    """Decode the concatenated bytes as UTF-8 (invalid bytes -> U+FFFD, as HF decode does) and give each token
    the characters its bytes contribute to. A token holding part of a multi-byte character gets that character,
    so two neighbouring tokens can share one character. When a token's bytes show that the previous token's
    unfinished character was invalid, the U+FFFD that replaces it belongs to the previous token only."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chunks: list[str] = []
    emitted = 0
    offsets: list[CharSpan] = []
    for piece in pieces:
        start = emitted
        pending = dec.getstate()[0]
        if pending and piece and not _continues(pending, piece[:1]):
            start += 1  # the first character out is the previous token's U+FFFD
        s = dec.decode(piece)
        chunks.append(s)
        emitted += len(s)
        unfinished = 1 if dec.getstate()[0] else 0  # bytes of a character completed by a later token
        offsets.append((min(start, emitted + unfinished), emitted + unfinished))
    tail = dec.decode(b"", final=True)
    chunks.append(tail)
    emitted += len(tail)
    return "".join(chunks), [(min(a, emitted), min(b, emitted)) for a, b in offsets]


def _continues(pending: bytes, nxt: bytes) -> bool:
    """Whether byte `nxt` validly continues (or completes) the unfinished UTF-8 sequence `pending`."""
    try:
        codecs.getincrementaldecoder("utf-8")(errors="strict").decode(pending + nxt)
    except UnicodeDecodeError:
        return False
    return True


def offsets_by_prefix_decode(tokenizer, token_ids: Sequence[int]) -> list[CharSpan]:
    """Generic fallback for non-byte-level tokenizers: decode growing prefixes (O(L^2), correct for any decode)."""
    offsets = []
    prev = 0
    for k in range(1, len(token_ids) + 1):
        cur = len(tokenizer.decode(list(token_ids[:k])))
        offsets.append((min(prev, cur), cur))
        prev = cur
    return offsets


def decode_with_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[CharSpan]]:
    """(text, offsets): `text == tokenizer.decode(token_ids)` (special tokens kept) and each sampled token's
    character range in it. Use this text for the reward, the annotator and the masks, so that all three agree.

    token_ids: [L] the response's sampled ids (not re-encoded). offsets: L pairs (start, end), end exclusive,
    starts non-decreasing. A byte-level token that carries part of a multi-byte character covers that whole
    character (its neighbour covers it too); a token that contributes no text has start == end.
    """
    token_ids = [int(t) for t in token_ids]
    text = tokenizer.decode(token_ids)
    if not token_ids:
        return text, []
    pieces = token_bytes(tokenizer, token_ids)
    if pieces is not None:
        ours, offsets = _offsets_from_bytes(pieces)
        if ours == text:
            return text, offsets
    return text, offsets_by_prefix_decode(tokenizer, token_ids)


def token_char_offsets(tokenizer, token_ids: Sequence[int]) -> list[CharSpan]:
    """Character range of each sampled token in `text = tokenizer.decode(token_ids)`, without re-tokenising.

    See `decode_with_offsets` (which also returns the text). Returns [L] pairs (start, end).
    """
    return decode_with_offsets(tokenizer, token_ids)[1]


def tokens_in_span(offsets: Sequence[CharSpan], span: CharSpan) -> list[int]:
    """Indices of the tokens overlapping char range [start, end); a token straddling a boundary counts as inside."""
    start, end = span
    return [i for i, (a, b) in enumerate(offsets) if (a < end and b > start) or (a == b and start <= a < end)]


def coverage_budget(length: int, coverage_cap: float | None) -> int:
    """Largest number of span tokens allowed in a response of `length` tokens: floor(cap * length)."""
    if coverage_cap is None:
        return length
    if not 0.0 <= coverage_cap <= 1.0:
        raise ValueError(f"coverage_cap must be in [0, 1], got {coverage_cap}")
    return int(math.floor(coverage_cap * length + 1e-9))


def spans_to_token_mask(
    offsets: Sequence[CharSpan], char_spans: Sequence[CharSpan], *, coverage_cap: float | None = 0.25
) -> torch.Tensor:
    """[L] bool mask of the tokens inside `char_spans`, at most floor(coverage_cap * L) of them.

    offsets: [L] token char ranges (`token_char_offsets`); char_spans: (start, end) char ranges in the
    annotator's priority order. Spans are taken whole in that order until the budget runs out; the span that
    crosses it keeps only its first tokens; later spans are dropped. coverage_cap None = no cap.
    """
    length = len(offsets)
    mask = torch.zeros(length, dtype=torch.bool)
    budget = coverage_budget(length, coverage_cap)
    used = 0
    for span in char_spans:
        if span[1] < span[0]:
            raise ValueError(f"char span {span} ends before it starts")
        for i in tokens_in_span(offsets, span):
            if used >= budget:
                return mask
            if not mask[i]:
                mask[i] = True
                used += 1
    return mask


def spans_in_capped_mask(
    offsets: Sequence[CharSpan], char_spans: Sequence[CharSpan], *, coverage_cap: float | None = 0.25
) -> list[int]:
    """Indices of the `char_spans` that survive the coverage cap: those with at least one token in
    `spans_to_token_mask(offsets, char_spans, coverage_cap=...)`. Only these spans' types/labels may reach the
    teacher (a dropped span's label would describe tokens the teacher never scores)."""
    mask = spans_to_token_mask(offsets, char_spans, coverage_cap=coverage_cap)
    return [k for k, span in enumerate(char_spans) if any(bool(mask[i]) for i in tokens_in_span(offsets, span))]


def all_token_mask(length: int) -> torch.Tensor:
    """[L] bool, all True: the baseline that distils on every response token."""
    return torch.ones(length, dtype=torch.bool)


def random_span_mask(
    length: int,
    coverage: float,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    num_spans: int = 1,
) -> torch.Tensor:
    """[L] bool with floor(coverage * L) True tokens in `num_spans` random contiguous runs (seeded baseline).

    The runs do not overlap; with fewer selected tokens than `num_spans`, there are that many runs of one.
    Give `seed` or a torch `generator`; the same seed gives the same mask.
    """
    if (seed is None) == (generator is None):
        raise ValueError("random_span_mask needs exactly one of seed= or generator=")
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0, 1], got {coverage}")
    if num_spans < 1:
        raise ValueError(f"num_spans must be >= 1, got {num_spans}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(length, dtype=torch.bool)
    k = coverage_budget(length, coverage)
    if k == 0:
        return mask
    runs = min(num_spans, k)
    # lengths of the runs: a random composition of k into `runs` positive parts
    cuts = sorted((torch.randperm(k - 1, generator=generator)[: runs - 1] + 1).tolist())
    run_lengths = [b - a for a, b in zip([0] + cuts, cuts + [k])]
    # the L - k free tokens are spread into runs + 1 gaps; inner gaps get at least one so runs stay distinct
    free = length - k
    inner = runs - 1
    if free >= inner:
        extra = free - inner
        slots = sorted(torch.randint(0, extra + 1, (runs,), generator=generator).tolist())
        gaps = [b - a for a, b in zip([0] + slots, slots + [extra])]
        gaps = [gaps[0]] + [g + 1 for g in gaps[1:-1]] + [gaps[-1]] if runs > 1 else gaps
    else:  # too little room to separate the runs: they touch
        gaps = [0] * (runs + 1)
        gaps[-1] = free
    pos = 0
    for gap, run in zip(gaps, run_lengths):
        pos += gap
        mask[pos : pos + run] = True
        pos += run
    return mask


SpanMode = Literal["annotator", "all_tokens", "random_spans"]


@dataclass
class SpanMaskConfig:
    """How a response's distillation tokens are chosen, and which routes they take.

    mode: "annotator" (TRACE: the annotator's spans), "all_tokens" (baseline: every token of every response is
    distilled), or "random_spans" (baseline: random runs with the same number of tokens as the annotator's
    capped mask for that response).
    """

    mode: SpanMode = "annotator"
    coverage_cap: float = 0.25  # at most this fraction of a response's tokens is in spans
    fkl: bool = True  # key spans of correct responses take forward KL
    rkl: bool = False  # error spans of incorrect responses take reverse KL (else PG)
    random_num_spans: int = 1  # runs per response in the random_spans baseline

    def __post_init__(self) -> None:
        if self.mode not in ("annotator", "all_tokens", "random_spans"):
            raise ConfigError(f"mode: {self.mode!r} is not one of annotator, all_tokens, random_spans")
        if not 0.0 <= self.coverage_cap <= 1.0:
            raise ConfigError(f"coverage_cap: must be in [0, 1], got {self.coverage_cap}")
        if self.random_num_spans < 1:
            raise ConfigError(f"random_num_spans: must be >= 1, got {self.random_num_spans}")


def response_span_mask(
    offsets: Sequence[CharSpan], char_spans: Sequence[CharSpan], cfg: SpanMaskConfig, *, seed: int = 0
) -> torch.Tensor:
    """[L] bool span mask of one response under `cfg.mode` (seed: used by the random_spans baseline only)."""
    length = len(offsets)
    if cfg.mode == "all_tokens":
        return all_token_mask(length)
    mask = spans_to_token_mask(offsets, char_spans, coverage_cap=cfg.coverage_cap)
    if cfg.mode == "random_spans":
        coverage = float(mask.sum()) / length if length else 0.0
        return random_span_mask(length, coverage, seed=seed, num_spans=cfg.random_num_spans)
    return mask


def response_routes(
    offsets: Sequence[CharSpan],
    char_spans: Sequence[CharSpan],
    correct: bool,
    cfg: SpanMaskConfig,
    *,
    seed: int = 0,
) -> torch.Tensor:
    """[L] int64 route ids (`megatron_trace.routes.Route`) of one response from its spans and verdict."""
    mask = response_span_mask(offsets, char_spans, cfg, seed=seed)
    return routes_from_spans(mask, correct, fkl=cfg.fkl, rkl=cfg.rkl)
