"""Spans -> token masks -> routes, with the real Qwen3 tokenizer and the sampled token ids."""

import math
import random

import pytest
import torch

from megatron_trace.annotate.segments import split_segments
from megatron_trace.annotate.spans import (
    SpanMaskConfig,
    all_token_mask,
    decode_with_offsets,
    random_span_mask,
    response_routes,
    response_span_mask,
    spans_to_token_mask,
    token_char_offsets,
    tokens_in_span,
)
from megatron_trace.data.tokenizer import load_tokenizer
from megatron_trace.routes import Route

FRAGMENTS = [
    "Let x be the number.", "Then 3x + 4 = 19.", "So 3x = 15, and x = 5.", "Check: 3(5) + 4 = 19!",
    "We compute $\\frac{1}{2} + 0.25 = 0.75$.", "Is it right?", "Yes.", "α + β = γ, très bien.",
    "中文的推理步骤。", "Emoji check 😀 ok.", "\\boxed{5}", "<think>", "</think>", "  indented line.",
    "Wait, 23 + 58 = 81.", "Thus   the total is 1{,}000.",
]


def random_response(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(3, 14)):
        parts.append(rng.choice(FRAGMENTS))
        parts.append(rng.choice([" ", "\n", "\n\n", " "]))
    return "".join(parts).strip()


def test_offsets_equal_the_tokenizers_own_offset_mapping(tok):
    """For ids the tokenizer itself produced, our decode-side offsets equal its encode-side offset mapping."""
    rng = random.Random(0)
    for _ in range(30):
        text = random_response(rng)
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert token_char_offsets(tok, enc["input_ids"]) == [tuple(o) for o in enc["offset_mapping"]]


def test_offsets_of_arbitrary_sampled_ids_cover_the_decoded_text(tok):
    """Random vocabulary ids (byte fragments of multi-byte characters included), as a sampler may produce."""
    rng = random.Random(1)
    vocab = len(tok)
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        text = tok.decode(ids)
        offsets = token_char_offsets(tok, ids)
        assert len(offsets) == len(ids)
        covered = set()
        prev_start = 0
        for tid, (a, b) in zip(ids, offsets):
            assert prev_start <= a <= b <= len(text)
            prev_start = a
            covered.update(range(a, b))
            alone = tok.decode([tid])
            if "\ufffd" not in alone and alone:
                assert text[a:b] == alone  # a token that is whole characters maps to exactly its text
        assert covered == set(range(len(text)))


def test_decode_with_offsets_returns_the_tokenizers_decode_text(tok):
    ids = tok.encode("<think>\nhi é 😀</think>\n\n\\boxed{3}") + [tok.convert_tokens_to_ids("<|im_end|>")]
    text, offsets = decode_with_offsets(tok, ids)
    assert text == tok.decode(ids) and text.endswith("<|im_end|>")
    assert offsets == token_char_offsets(tok, ids) and offsets[-1] == (len(text) - len("<|im_end|>"), len(text))


def test_a_token_holding_part_of_a_character_gets_that_character(tok):
    # "😀" is 4 bytes; Qwen3's byte-level vocabulary has single-byte tokens for each of them
    ids = [tok.convert_tokens_to_ids(t) for t in ["a", "ð", "Ł", "ĺ", "Ģ", "b"]]
    text = tok.decode(ids)
    assert text == "a😀b"
    assert token_char_offsets(tok, ids) == [(0, 1), (1, 2), (1, 2), (1, 2), (1, 2), (2, 3)]


def test_an_unfinished_character_becomes_one_replacement_owned_by_its_own_tokens(tok):
    # two of the emoji's four bytes, then "b": decode gives U+FFFD for the broken bytes
    ids = [tok.convert_tokens_to_ids(t) for t in ["a", "ð", "Ł", "b"]]
    assert tok.decode(ids) == "a\ufffdb"
    assert token_char_offsets(tok, ids) == [(0, 1), (1, 2), (1, 2), (2, 3)]


def test_masked_tokens_cover_exactly_the_chosen_segments(tok):
    """Random responses, random segment choices, sampled ids: the mask's tokens cover every character of the
    chosen segments, and every masked token touches a chosen segment (straddling tokens count as inside)."""
    rng = random.Random(2)
    for _ in range(40):
        ids = tok.encode(random_response(rng), add_special_tokens=False)
        text = tok.decode(ids)
        offsets = token_char_offsets(tok, ids)
        segments = split_segments(text)
        chosen = rng.sample(segments, rng.randint(1, max(1, len(segments) // 2)))
        spans = [(s.start, s.end) for s in chosen]
        mask = spans_to_token_mask(offsets, spans, coverage_cap=None)
        in_mask = [offsets[i] for i in range(len(ids)) if mask[i]]
        covered = {c for a, b in in_mask for c in range(a, b)}
        wanted = {c for a, b in spans for c in range(a, b)}
        assert wanted <= covered
        for a, b in in_mask:
            assert any(a < e and b > s for s, e in spans)
        # and the masked tokens decode to text in which each chosen segment appears whole
        runs, cur = [], []
        for i in range(len(ids)):
            if mask[i]:
                cur.append(ids[i])
            elif cur:
                runs.append(tok.decode(cur)); cur = []
        if cur:
            runs.append(tok.decode(cur))
        for seg in chosen:
            assert any(seg.text in r for r in runs)


def reference_capped_mask(offsets, spans, cap):
    """Independent reference: the tokens of all spans in priority order, de-duplicated, first floor(cap*L)."""
    order = []
    for s, e in spans:
        for i, (a, b) in enumerate(offsets):
            if a < e and b > s and i not in order:
                order.append(i)
    keep = order[: math.floor(cap * len(offsets))]
    return torch.tensor([i in keep for i in range(len(offsets))], dtype=torch.bool)


@pytest.mark.parametrize("cap", [0.1, 0.25, 0.5])
def test_coverage_never_exceeds_the_cap_and_keeps_annotator_order(tok, cap):
    rng = random.Random(3)
    for _ in range(30):
        ids = tok.encode(random_response(rng), add_special_tokens=False)
        offsets = token_char_offsets(tok, ids)
        segments = split_segments(tok.decode(ids))
        chosen = rng.sample(segments, rng.randint(1, len(segments)))
        spans = [(s.start, s.end) for s in chosen]
        mask = spans_to_token_mask(offsets, spans, coverage_cap=cap)
        assert int(mask.sum()) <= math.floor(cap * len(ids))
        assert torch.equal(mask, reference_capped_mask(offsets, spans, cap))


def test_the_span_crossing_the_cap_is_truncated_to_its_first_tokens():
    offsets = [(i, i + 1) for i in range(20)]  # 20 one-character tokens; cap 0.25 -> 5 tokens
    mask = spans_to_token_mask(offsets, [(10, 13), (2, 8), (15, 18)], coverage_cap=0.25)
    assert mask.nonzero().flatten().tolist() == [2, 3, 10, 11, 12]


def test_tokens_straddling_a_span_boundary_count_as_inside():
    offsets = [(0, 4), (4, 9), (9, 12)]
    assert tokens_in_span(offsets, (6, 10)) == [1, 2]
    assert tokens_in_span(offsets, (4, 9)) == [1]


def test_random_span_mask_has_the_coverage_and_is_seeded():
    for length, cov, n in [(100, 0.25, 1), (100, 0.25, 3), (37, 0.1, 2), (10, 0.0, 2), (8, 1.0, 3)]:
        m = random_span_mask(length, cov, seed=7, num_spans=n)
        k = math.floor(cov * length)
        assert m.dtype == torch.bool and m.shape == (length,) and int(m.sum()) == k
        runs = int((m[1:] & ~m[:-1]).sum()) + int(m[0]) if length else 0
        if k and length - k >= n - 1:
            assert runs == min(n, k)
        assert torch.equal(m, random_span_mask(length, cov, seed=7, num_spans=n))
    masks = {tuple(random_span_mask(200, 0.25, seed=s, num_spans=2).tolist()) for s in range(10)}
    assert len(masks) > 5


def test_all_token_mask_is_all_true():
    assert all_token_mask(5).tolist() == [True] * 5


def test_routes_follow_spans_verdict_and_enabled_routes():
    offsets = [(i, i + 1) for i in range(8)]
    spans = [(2, 4)]
    cfg = SpanMaskConfig(coverage_cap=0.5, fkl=True, rkl=True)
    fkl = response_routes(offsets, spans, True, cfg)
    assert fkl.tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    rkl = response_routes(offsets, spans, False, cfg)
    assert rkl.tolist() == [0, 0, 2, 2, 0, 0, 0, 0]
    no_rkl = response_routes(offsets, spans, False, SpanMaskConfig(coverage_cap=0.5, rkl=False))
    assert no_rkl.tolist() == [int(Route.PG)] * 8


def test_baseline_modes_all_tokens_and_random_with_the_same_coverage():
    offsets = [(i, i + 1) for i in range(40)]
    spans = [(0, 6), (20, 30)]
    trace = response_span_mask(offsets, spans, SpanMaskConfig(coverage_cap=0.25))
    assert int(trace.sum()) == 10
    rand = response_span_mask(offsets, spans, SpanMaskConfig(mode="random_spans", random_num_spans=2), seed=3)
    assert int(rand.sum()) == 10 and not torch.equal(rand, trace)
    assert response_span_mask(offsets, spans, SpanMaskConfig(mode="all_tokens")).all()
    with pytest.raises(ValueError, match="mode"):
        SpanMaskConfig(mode="everything")


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="coverage_cap"):
        spans_to_token_mask([(0, 1)], [(0, 1)], coverage_cap=1.5)
    with pytest.raises(ValueError, match="exactly one of seed"):
        random_span_mask(10, 0.2)
    assert token_char_offsets(load_tokenizer(), []) == []


def test_an_empty_response_has_empty_masks_and_routes():
    for mode in ("annotator", "all_tokens", "random_spans"):
        routes = response_routes([], [], True, SpanMaskConfig(mode=mode))
        assert routes.shape == (0,) and routes.dtype == torch.long
