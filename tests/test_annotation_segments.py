"""Numbered segments keep exact character offsets; the annotator prompt shows them and the verdict."""

import pytest

from megatron_trace.annotate.prompt import annotator_messages
from megatron_trace.annotate.segments import segment_char_span, split_segments

RESPONSE = (
    "<think>\nFirst, 3.5 + 1 = 4.5. Then \"ok.\" Next!  Yes?\n\n  Done (really.) end\n</think>\n\n"
    "So \\boxed{4}."
)


def test_segments_are_lines_then_sentences_with_exact_offsets():
    segs = split_segments(RESPONSE)
    assert [s.text for s in segs] == [
        "<think>", "First, 3.5 + 1 = 4.5.", 'Then "ok."', "Next!", "Yes?", "Done (really.)", "end", "</think>",
        "So \\boxed{4}.",
    ]
    assert [s.index for s in segs] == list(range(1, 10))
    for s in segs:
        assert RESPONSE[s.start : s.end] == s.text


def test_segments_cover_every_non_space_character_once():
    text = "a. b\n\n c? d!\te  \n  f.g 1.5 x"
    segs = split_segments(text)
    covered = [c for s in segs for c in range(s.start, s.end)]
    assert len(covered) == len(set(covered))
    assert {i for i, ch in enumerate(text) if not ch.isspace()} <= set(covered)
    assert "".join(ch for s in segs for ch in s.text if not ch.isspace()) == "".join(text.split())


def test_empty_response_has_no_segments_and_no_prompt():
    assert split_segments("") == [] and split_segments(" \n\t ") == []
    with pytest.raises(ValueError, match="empty response"):
        annotator_messages("p", "s", [], True)


def test_segment_ranges_map_to_char_spans():
    segs = split_segments(RESPONSE)
    a, b = segment_char_span(segs, 2, 4)
    assert RESPONSE[a:b] == 'First, 3.5 + 1 = 4.5. Then "ok." Next!'
    with pytest.raises(ValueError, match="outside 1-9"):
        segment_char_span(segs, 3, 12)


def test_prompt_numbers_the_segments_and_asks_for_key_or_error_spans():
    segs = split_segments(RESPONSE)
    correct = annotator_messages("What is 3+1?", "3 + 1 = 4.", segs, True)[1]["content"]
    wrong = annotator_messages("What is 3+1?", "3 + 1 = 4.", segs, False)[1]["content"]
    assert "[2] First, 3.5 + 1 = 4.5.\n[3] Then \"ok.\"" in correct
    assert "What is 3+1?" in correct and "3 + 1 = 4." in correct
    assert "CORRECT" in correct and "KEY segments" in correct and "ERROR" not in correct
    assert "INCORRECT" in wrong and "ERROR segments" in wrong
    assert '"segments": "3-5"' in correct and '"label"' in correct
