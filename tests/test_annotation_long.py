"""Self-annotation at the 8B recipe's lengths: a tiny Qwen3 served by the real vLLM engine with max_model_len
10,240, 1,024 annotation tokens, and a response of 8,192 tokens.

The engine refuses a whole batched call when any one request exceeds its context, so unchecked, one long response
fails every annotation of the step (shown first). Checked, the long request is shortened (long segments elided in
the middle with a marker, every segment number kept), a short one goes through untouched, and a request that
cannot fit at all is skipped and counted; the batch never fails.
"""

from __future__ import annotations

import json
import os

import pytest

from megatron_trace.annotate import AnnotationRequest, annotate_batch, annotation_metrics
from megatron_trace.annotate.labels import DEFAULT_ERROR_TYPES, DEFAULT_KEY_TYPES
from megatron_trace.annotate.pipeline import ELISION_MARKER
from megatron_trace.annotate.segments import split_segments
from megatron_trace.annotate.self_annotator import SelfAnnotator
from tiny_hf_model import make_tiny_qwen3_dir

MAX_MODEL_LEN = 10_240
REPLY_TOKENS = 1_024
RESPONSE_TOKENS = 8_192


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from megatron_trace.rollout.engine import EngineConfig, VLLMEngine

    path = make_tiny_qwen3_dir(str(tmp_path_factory.mktemp("long") / "m"), seed=3, tied=False)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["max_position_embeddings"] = MAX_MODEL_LEN  # the 8B recipe's context
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    _answer_eos_at_once(path, int(config["eos_token_id"]))
    eng = VLLMEngine(EngineConfig(path, max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=64 << 20))
    yield eng, path
    eng.close()


def _answer_eos_at_once(path: str, eos: int) -> None:
    """Make greedy decoding stop at the first token, so the test pays for the 9k-token prefills, not for 1,024
    CPU decode steps: every position's residual stream is the same vector e (equal embedding rows, attention and
    MLP outputs zeroed), and only the EOS row of the output layer is nonzero (= e), so EOS has the top logit."""
    import torch
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    e = torch.linspace(0.5, 1.5, tensors["model.embed_tokens.weight"].shape[1])
    tensors["model.embed_tokens.weight"][:] = e
    for name, t in tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t.zero_()
    head = tensors["lm_head.weight"]
    head.zero_()
    head[eos] = e
    save_file(tensors, file, metadata={"format": "pt"})


class Recording:
    """The engine, recording the prompts of each generate call."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append([list(p) for p in prompts])
        return self.engine.generate(prompts, sampling)


def _requests(tok):
    line = ("Step {k}: multiply the running total by the next factor, write the partial products in a column and "
            "add them digit by digit while carrying, which gives the intermediate value {v} for this step.")
    ids: list[int] = []
    k = 0
    while len(ids) < RESPONSE_TOKENS:
        ids += tok.encode(line.format(k=k, v=1000 + 37 * k) + "\n", add_special_tokens=False)
        k += 1
    response = tok.decode(ids[:RESPONSE_TOKENS])
    assert len(ids[:RESPONSE_TOKENS]) == RESPONSE_TOKENS
    solution = " ".join(f"Multiply by {i} and carry the digits." for i in range(150))  # ~1,300 tokens
    huge = " ".join(f"Reference step {i}." for i in range(3000))  # alone longer than the context
    return [AnnotationRequest("Compute the product of the listed factors.", solution, response, True),
            AnnotationRequest("What is 2 + 2?", "2 + 2 = 4.", "Two plus two is 4.\nSo the answer is 4.", True),
            AnnotationRequest("What is 3 + 3?", huge, "Three plus three is 6.", False)]


def test_unchecked_one_long_request_fails_the_whole_batch(engine):
    eng, path = engine
    from megatron_trace.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    unchecked = SelfAnnotator(eng, tok, max_tokens=REPLY_TOKENS)  # no max_model_len: what the trainer did before
    out = annotate_batch(unchecked, _requests(tok)[:2])
    assert all(a.failed and "exceeds max_model_len" in a.errors[0] for a in out)


def test_long_request_is_shortened_short_one_untouched_impossible_one_skipped(engine):
    eng, path = engine
    from megatron_trace.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    recording = Recording(eng)
    annotator = SelfAnnotator(recording, tok, max_tokens=REPLY_TOKENS, max_model_len=MAX_MODEL_LEN)
    requests = _requests(tok)
    out = annotate_batch(annotator, requests, taxonomy=(DEFAULT_KEY_TYPES, DEFAULT_ERROR_TYPES))
    long, short, impossible = out
    assert long.shortened and not long.failed and not long.skipped
    assert not short.shortened and not short.failed
    assert impossible.skipped and not impossible.failed and "skipped" in impossible.errors[0]
    metrics = annotation_metrics(out)
    assert metrics["annotate/shortened"] == 1 and metrics["annotate/skipped_too_long"] == 1
    assert metrics["annotate/failed"] == 0
    [prompts] = recording.calls  # one batched call holding exactly the two that fit
    assert len(prompts) == 2 and all(len(p) + REPLY_TOKENS <= MAX_MODEL_LEN for p in prompts)
    text = tok.decode(prompts[0])
    segments = split_segments(requests[0].response_text)
    assert ELISION_MARKER.strip() in text
    for s in (segments[0], segments[len(segments) // 2], segments[-1]):  # every segment number is still there
        assert f"\n[{s.index}] " in text
    # the full prompt would not have fit: shortening was needed
    from megatron_trace.annotate.prompt import annotator_messages
    from megatron_trace.data.prompts import build_prompt_ids

    full = build_prompt_ids(tok, annotator_messages(requests[0].problem, requests[0].solution, segments, True,
                                                    types=list(DEFAULT_KEY_TYPES)), enable_thinking=False)
    assert len(full) + REPLY_TOKENS > MAX_MODEL_LEN
    assert "2 + 2 = 4." in tok.decode(prompts[1])
