"""The tolerant annotator-reply parser against a corpus of real-looking replies with expected spans."""

import json
from pathlib import Path

import pytest

from megatron_trace.annotate.parse import parse_annotation

CORPUS = Path(__file__).parent / "fixtures" / "annotator_outputs"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())


def test_corpus_is_large_enough():
    assert len(EXPECTED) >= 20


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parser_reads_the_expected_spans(name):
    case = EXPECTED[name]
    parsed = parse_annotation((CORPUS / name).read_text(), case["num_segments"])
    assert [list(s) for s in parsed.spans] == case["spans"], case["what"]
    assert parsed.dropped == case["dropped"], (case["what"], parsed.errors)


def test_every_dropped_entry_and_failure_says_why():
    parsed = parse_annotation('{"spans": [{"segments": "0"}, {"segments": "2"}, {"segments": "2"}]}', 3)
    assert parsed.spans == [(2, 2, "")] and parsed.dropped == 2
    assert any("outside 1-3" in e for e in parsed.errors)
    assert any("duplicate span 2-2" in e for e in parsed.errors)
    assert parse_annotation("", 3).errors == ["empty annotator output"]
    assert "no annotation JSON" in parse_annotation("nothing here", 3).errors[0]


def test_spans_are_always_inside_the_segment_range():
    for name, case in EXPECTED.items():
        n = case["num_segments"]
        for first, last, label in parse_annotation((CORPUS / name).read_text(), n).spans:
            assert 1 <= first <= last <= n
            assert isinstance(label, str) and len(label) <= 100
