"""The shipped small-vocabulary Qwen3 tokenizer (`qwen3-bpe4k`, used by the tiny CPU demo) against the real Qwen3
tokenizer: a prefix of the same byte-level BPE, so lossless on any text and id-for-id identical wherever the real
tokenizer only needs the kept entries."""

import json
import random

import pytest

from megatron_trace.annotate.spans import offsets_by_prefix_decode, token_bytes, decode_with_offsets
from megatron_trace.data.prompts import build_prompt_ids, privileged_messages, student_messages
from megatron_trace.data.tokenizer import (
    SHIPPED_TOKENIZERS,
    check_tokenizer_fits,
    load_tokenizer,
    tokenizer_dir,
    truncate_qwen3_tokenizer,
)
from megatron_trace.models import load_hf_config

KEEP = SHIPPED_TOKENIZERS["qwen3-bpe4k"]
ARITH = "megatron_trace/data/assets/arith_train.jsonl"


@pytest.fixture(scope="module")
def small():
    return load_tokenizer("qwen3-bpe4k")


@pytest.fixture(scope="module")
def full():
    return load_tokenizer(None)


def _texts(n=300, seed=0):
    rng = random.Random(seed)
    alphabet = ("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789 .,;:!?*+-=/\\{}()[]'\"\n\t" "éüßçñ" "数学答案" "αβγ∑∫"
                "😀🚀")
    out = [json.loads(line)["problem"] + "\n" + json.loads(line)["solution"] for line in open(ARITH)][:200]
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n)]
    out += ["".join(rng.choice(alphabet[:60]) for _ in range(rng.randint(1, 12))) for _ in range(n)]  # ASCII
    out += ["internationalization counterrevolutionary antidisestablishment", "  leading and trailing  \n\n"]
    return out


def test_the_shipped_files_are_what_the_truncation_writes(tmp_path):
    out = truncate_qwen3_tokenizer(str(tmp_path / "t"), KEEP)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(f"{out}/{name}") as a, open(f"{tokenizer_dir('qwen3-bpe4k')}/{name}") as b:
            assert json.load(a) == json.load(b), name


def test_any_text_round_trips_and_matches_the_real_tokenizer_id_for_id_where_it_only_needs_kept_entries(small, full):
    same = 0
    for text in _texts():
        ids = small.encode(text, add_special_tokens=False)
        assert small.decode(ids) == text
        assert max(ids) < KEEP
        ref = full.encode(text, add_special_tokens=False)
        if max(ref) < KEEP:  # every merge the real BPE applied is kept, in the same order
            assert ids == ref, text
            same += 1
        else:
            assert len(ids) > len(ref)
    assert same > 100  # the comparison above really ran


def test_special_tokens_sit_after_the_kept_entries_and_the_chat_template_is_unchanged(small, full):
    assert len(small) == KEEP + 26
    for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert small.convert_tokens_to_ids(tok) == full.convert_tokens_to_ids(tok) - 151643 + KEEP
    assert small.eos_token == "<|im_end|>" and small.pad_token == "<|endoftext|>"
    for thinking in (True, False):
        for messages in (student_messages("What is 7 * 8?"),
                         privileged_messages("What is 7 * 8?", "7 * 8 = 56. The answer is \\boxed{56}.", ["x"])):
            a, b = build_prompt_ids(small, messages, enable_thinking=thinking), \
                build_prompt_ids(full, messages, enable_thinking=thinking)
            assert small.decode(a) == full.decode(b)
    cfg = load_hf_config("tiny-bpe4k")
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (small.pad_token_id, small.eos_token_id)
    check_tokenizer_fits(small, cfg["vocab_size"])


def test_sampled_token_offsets_use_the_byte_level_path(small):
    ids = small.encode("We multiply: 12 * 11 = 132.\nThe answer is \\boxed{132}.", add_special_tokens=False)
    ids += [small.eos_token_id]
    assert token_bytes(small, ids) is not None
    text, offsets = decode_with_offsets(small, ids)
    assert text == small.decode(ids)
    assert offsets == offsets_by_prefix_decode(small, ids)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_naming_the_field(full):
    with pytest.raises(ValueError, match=r"the tokenizer has 151669 tokens but the model's "
                                         r"vocab_size is 4096"):
        check_tokenizer_fits(full, load_hf_config("tiny-bpe4k")["vocab_size"])
    with pytest.raises(FileNotFoundError, match="neither a folder nor a shipped tokenizer"):
        load_tokenizer("no-such-tokenizer")
    with pytest.raises(ValueError, match="keep must be"):
        truncate_qwen3_tokenizer("/tmp/never-written", 10)
