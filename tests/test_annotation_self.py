"""Self-annotation through a generation engine, and the privileged prompt built from its labels."""

from megatron_trace.annotate import AnnotationRequest, annotate_batch
from megatron_trace.annotate.self_annotator import SelfAnnotator
from megatron_trace.data.prompts import build_prompt_ids, privileged_messages
from megatron_trace.data.tokenizer import load_tokenizer
from megatron_trace.rollout.types import Generation

RESPONSE = "We add 23 and 58.\nThe tens give 70 and the ones give 11.\nSo the answer is \\boxed{81}."


class ScriptedEngine:
    """A GenerationEngine (the protocol rollouts use) that replies with fixed token ids and records its calls."""

    def __init__(self, reply_ids):
        self.reply_ids = reply_ids
        self.calls = []

    def generate(self, prompt_token_ids, sampling):
        self.calls.append((prompt_token_ids, sampling))
        return [[Generation(token_ids=list(self.reply_ids), logprobs=[], finish_reason="stop")] for _ in prompt_token_ids]


class BrokenEngine:
    def generate(self, prompt_token_ids, sampling):
        raise RuntimeError("engine is down")


def test_self_annotation_uses_the_chat_template_greedy_and_parses_the_reply():
    tok = load_tokenizer()
    reply = 'Key steps:\n```json\n{"spans": [{"segments": "2", "label": "splits tens and ones"}]}\n```'
    engine = ScriptedEngine(tok.encode(reply) + [tok.convert_tokens_to_ids("<|im_end|>")])
    annotator = SelfAnnotator(engine, tok, max_tokens=300)
    req = AnnotationRequest("What is 23 + 58?", "23 + 58 = 81.", RESPONSE, True)
    [ann] = annotate_batch(annotator, [req])
    prompts, sampling = engine.calls[0]
    rendered = tok.decode(prompts[0])
    assert rendered.startswith("<|im_start|>system\n") and "[2] The tens give 70 and the ones give 11." in rendered
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off by default
    assert sampling.temperature == 0.0 and sampling.n == 1 and sampling.max_tokens == 300
    assert [RESPONSE[a:b] for a, b in ann.char_spans] == ["The tens give 70 and the ones give 11."]
    assert ann.labels == ["splits tens and ones"] and ann.dropped == 0 and not ann.failed


def test_engine_failure_marks_items_failed_without_raising():
    tok = load_tokenizer()
    out = annotate_batch(SelfAnnotator(BrokenEngine(), tok), [AnnotationRequest("p", "s", "a. b.", False)] * 2)
    assert all(a.failed and "engine is down" in a.errors[0] for a in out)


def test_privileged_prompt_carries_labels_but_never_span_text():
    """A label that quotes the response is withheld, so the teacher's prompt holds no span text."""
    tok = load_tokenizer()
    reply = ('{"spans": [{"segments": "2", "label": "the tens give 70 and the ones give 11"},'
             ' {"segments": "3", "label": "states the final answer"}]}')
    engine = ScriptedEngine(tok.encode(reply))
    [ann] = annotate_batch(SelfAnnotator(engine, tok), [AnnotationRequest("What is 23 + 58?", "81", RESPONSE, True)])
    assert len(ann.char_spans) == 2 and ann.labels == ["", "states the final answer"]
    ids = build_prompt_ids(tok, privileged_messages("What is 23 + 58?", "23 + 58 = 81.", ann.labels),
                           enable_thinking=False)
    text = tok.decode(ids)
    assert "states the final answer" in text and "23 + 58 = 81." in text
    for a, b in ann.char_spans:
        assert RESPONSE[a:b] not in text
    assert "the ones give 11" not in text.lower()
