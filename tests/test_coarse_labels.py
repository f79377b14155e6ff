"""Coarse span labels: the annotator's types from a fixed taxonomy, and a teacher prompt that holds the reference
solution plus those types only (key and error types under their own headings, only spans that survived the
coverage cap, never span text or free-text labels); free-text labels behind annotate.label_mode: free_text."""

from __future__ import annotations

import pytest

from megatron_trace.annotate import AnnotationRequest, Completion, annotate_batch
from megatron_trace.annotate.pipeline import ChatAnnotator
from megatron_trace.annotate.labels import DEFAULT_ERROR_TYPES, DEFAULT_KEY_TYPES, normalize_type
from megatron_trace.annotate.parse import parse_annotation
from megatron_trace.annotate.prompt import annotator_messages
from megatron_trace.annotate.segments import split_segments
from megatron_trace.annotate.spans import decode_with_offsets, spans_in_capped_mask, tokens_in_span
from megatron_trace.config import ConfigError, load_config
from megatron_trace.data.dataset import Problem
from megatron_trace.rewards.batch import BatchScores
from megatron_trace.rollout.types import Generation
from megatron_trace.routes import Route
from megatron_trace.train.experience import ExperienceMaker

PROBLEM = Problem(id="p0", problem="Solve x + 2 = 5.", solution="Subtract 2 from both sides: x = 3.", answer="3")
RIGHT = ("We write the equation x + 2 = 5.\nThe decisive move is to take the same amount away from each side of "
         "the equation, keeping it balanced throughout.\nSo x = 3.")
WRONG = "We write the equation x + 2 = 5.\nAdding 2 to both sides gives x = 7.\nSo x = 7."
KEY_REPLY = ('{"spans": [{"segments": "2", "type": "Key insight", "label": "balances both sides"}, '
             '{"segments": "1", "type": "setup", "label": "writes the equation down"}]}')
ERROR_REPLY = '{"spans": [{"segments": "2", "type": "wrong-method", "label": "adds instead of subtracting"}]}'


class ScriptedAnnotator(ChatAnnotator):
    """Replies KEY_REPLY to a 'judged CORRECT' prompt, ERROR_REPLY otherwise; records the prompts."""

    def __init__(self):
        self.prompts = []

    def complete_batch(self, messages):
        self.prompts += [m[-1]["content"] for m in messages]
        return [Completion(KEY_REPLY if "judged CORRECT" in m[-1]["content"] else ERROR_REPLY) for m in messages]

    def check_reachable(self):
        pass


class Engine:
    def __init__(self, tok):
        self.tok = tok

    def generate(self, prompts, sampling):
        out = []
        for _ in prompts:
            gens = []
            for text in (RIGHT, WRONG):
                ids = self.tok.encode(text, add_special_tokens=False)
                gens.append(Generation(ids, [-0.5] * len(ids), "stop"))
            out.append(gens)
        return out


class Scorer:
    def score(self, texts, golds, timeout_s=None):
        return BatchScores(scores=[1.0 if t.endswith(f"x = {g}.") else 0.0 for t, g in zip(texts, golds)])


def _batch(label_mode: str):
    from megatron_trace.data.tokenizer import load_tokenizer

    tok = load_tokenizer("qwen3-bpe4k")
    ids = tok.encode(RIGHT, add_special_tokens=False)
    text, offsets = decode_with_offsets(tok, ids)
    seg2 = split_segments(text)[1]
    n2 = len(tokens_in_span(offsets, (seg2.start, seg2.end)))
    cap = n2 / len(ids)  # exactly the key span of segment 2: the "setup" span (segment 1) is dropped by the cap
    cfg = load_config(None, ["rollout.group_size=2", "rollout.prompts_per_step=1", "annotate.spans.rkl=true",
                             f"annotate.spans.coverage_cap={cap}", f"annotate.label_mode={label_mode}"])
    annotator = ScriptedAnnotator()
    maker = ExperienceMaker(cfg, tok, Engine(tok), Scorer(), annotator)
    batch = maker.make([PROBLEM], step=0, kl_weight=0.5)
    right, wrong = batch.samples
    assert right.reward == 1.0 and wrong.reward == 0.0
    assert any(r == Route.FKL for r in right.routes) and any(r == Route.RKL for r in wrong.routes)
    return tok.decode(right.teacher_prompt_ids), tok.decode(wrong.teacher_prompt_ids), annotator, text, offsets


def test_teacher_prompt_holds_the_reference_and_surviving_types_only():
    key_prompt, error_prompt, annotator, text, offsets = _batch("type")
    assert "Subtract 2 from both sides: x = 3." in key_prompt
    assert "Kinds of key steps to get right:\n- key_insight" in key_prompt
    assert "setup" not in key_prompt, "the span the coverage cap dropped must not reach the teacher"
    assert "Kinds of errors to avoid:\n- wrong_method" in error_prompt and "key steps" not in error_prompt
    for prompt in (key_prompt, error_prompt):  # no free-text label, no span text
        assert "balances both sides" not in prompt and "adds instead of subtracting" not in prompt
        assert "decisive move" not in prompt and "Adding 2 to both sides" not in prompt
        assert "Points to get right" not in prompt and "Mistakes to avoid" not in prompt
    # the annotator was asked for types from the taxonomy of each verdict
    key_ask = next(p for p in annotator.prompts if "judged CORRECT" in p)
    error_ask = next(p for p in annotator.prompts if "judged INCORRECT" in p)
    assert ", ".join(DEFAULT_KEY_TYPES) in key_ask and ", ".join(DEFAULT_ERROR_TYPES) in error_ask
    assert "12 words" not in key_ask


def test_free_text_mode_keeps_labels_of_surviving_spans_under_their_own_headings():
    key_prompt, error_prompt, *_ = _batch("free_text")
    assert "Points to get right:\n- balances both sides" in key_prompt
    assert "writes the equation down" not in key_prompt  # dropped by the coverage cap
    assert "Mistakes to avoid:\n- adds instead of subtracting" in error_prompt
    assert "Points to get right" not in error_prompt and "Kinds of" not in key_prompt


def test_types_are_parsed_and_normalized_to_the_taxonomy():
    parsed = parse_annotation('{"spans": [{"segments": "1", "type": "Case analysis"}, {"segments": "2", '
                              '"category": "banana"}, {"segments": "3"}]}', 3)
    assert parsed.types == ["Case analysis", "banana", ""]
    assert [normalize_type(t, DEFAULT_KEY_TYPES) for t in parsed.types] == ["case_analysis", "", ""]

    class One:
        def complete_batch(self, messages):
            return [Completion('{"spans": [{"segments": "1", "type": "Misread problem"}, '
                               '{"segments": "2", "type": "setup"}]}')]

    [ann] = annotate_batch(One(), [AnnotationRequest("p", "s", "One. Two.", False)],
                           taxonomy=(DEFAULT_KEY_TYPES, DEFAULT_ERROR_TYPES))
    assert ann.types == ["misread_problem", ""]  # setup is a key type, not an error type


def test_spans_surviving_the_cap_and_taxonomy_config_checks():
    offsets = [(i, i + 1) for i in range(8)]
    assert spans_in_capped_mask(offsets, [(0, 2), (4, 6), (6, 8)], coverage_cap=0.5) == [0, 1]
    assert spans_in_capped_mask(offsets, [(0, 2), (4, 6), (6, 8)], coverage_cap=0.375) == [0, 1]
    assert spans_in_capped_mask(offsets, [(0, 2), (4, 6), (6, 8)], coverage_cap=0.25) == [0]
    msgs = annotator_messages("p", "s", split_segments("a. b."), True, types=["setup", "computation"])
    assert '"type": "setup"' in msgs[1]["content"]
    cfg = load_config(None, ["annotate.key_types=[setup, lemma]"])
    assert cfg.annotate.taxonomy == (["setup", "lemma"], list(DEFAULT_ERROR_TYPES))
    assert load_config(None, ["annotate.label_mode=free_text"]).annotate.taxonomy is None
    for bad, message in (("annotate.key_types=[]", "key_types"), ("annotate.error_types=[Bad Type]", "snake_case"),
                         ("annotate.key_types=[setup, setup]", "twice"), ("annotate.label_mode=words", "label_mode")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])
