"""Hardening of the run configuration, the data and resume: bad settings fail at load naming the field (they used
to surface after the model was built, as tracebacks), data errors name file:line before any model is built, and
resume never loses data (missing `latest`, a fresh run beside another run's checkpoints, keep_last)."""

from __future__ import annotations

import json
import os

import pytest

from megatron_trace.config import ConfigError, load_config
from megatron_trace.data.dataset import DataConfig, DatasetError, load_problems
from megatron_trace.train import checkpointing as ck

EXAMPLE = "examples/configs/tiny_cpu.yaml"


@pytest.mark.parametrize("override, field, before", [
    ("rollout.temperature=-1", "rollout.temperature", "vLLM error after the server started"),
    ("rollout.temperature=.nan", "rollout.temperature", "vLLM error after the server started"),
    ("rollout.top_p=0", "rollout.top_p", "vLLM error after the server started"),
    ("rollout.top_k=0", "rollout.top_k", "vLLM error after the server started"),
    ("rollout.max_model_len=8", "rollout.max_model_len", "every prompt refused after start-up"),
    ("rollout.kv_cache_memory_bytes=-1", "rollout.kv_cache_memory_bytes", "server start-up failure"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization", "vLLM error at start-up"),
    ("optim.lr=.inf", "optim.lr", "NaN weights after step 0"),
    ("optim.lr=.nan", "optim.lr", "NaN weights after step 0"),
    ("optim.adam_beta1=1.5", "optim.adam_beta1", "diverging optimizer"),
    ("optim.adam_beta2=-0.1", "optim.adam_beta2", "diverging optimizer"),
    ("optim.clip_grad=-1", "optim.clip_grad", "clipping silently disabled"),
    ("optim.weight_decay=-1", "optim.weight_decay", "accepted"),
    ("optim.adam_eps=0", "optim.adam_eps", "accepted"),
    ("checkpoint.save_every=-1", "checkpoint.save_every", "a checkpoint every step"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last", "accepted"),
    ("data.max_text_chars=0", "data.max_text_chars", "(new field)"),
    ("train.steps=[1", "train.steps=[1", "a YAML ParserError traceback"),
])
def test_a_bad_setting_fails_at_load_naming_the_field(override, field, before):
    with pytest.raises(ConfigError) as e:
        load_config(EXAMPLE, [override])
    assert str(e.value).startswith(field) or f"override '{field}" in str(e.value), (before, str(e.value))


def test_a_yaml_file_with_a_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\nrollout:\n  top_p: [0.5\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        load_config(str(path))


# ------------------------------------------------------------------------------------------------ data


def _jsonl(path, records, raw_lines=()):
    with open(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())
        for line in raw_lines:
            f.write(line)
    return str(path)


GOOD = {"problem": "1+1?", "solution": "2", "answer": "2"}


def test_non_utf8_data_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [GOOD, GOOD], [b'{"problem": "caf\xe9", "solution": "x", "answer": "1"}\n'])
    with pytest.raises(DatasetError, match=r"d\.jsonl: line 3: not UTF-8 \(byte 0xe9"):
        load_problems(DataConfig(path=path))  # before: UnicodeDecodeError, no file, no line


def test_an_oversized_problem_is_refused_at_load_with_its_line_and_id(tmp_path):
    huge = dict(GOOD, problem="x" * 300_001, id="p-huge")
    path = _jsonl(tmp_path / "d.jsonl", [dict(GOOD, id="p-1"), huge])
    with pytest.raises(DatasetError, match=r"line 2: problem 'p-huge': field 'problem' has 300001 characters"):
        load_problems(DataConfig(path=path, id_field="id"))


# The student prompt of a problem "7 7 ... 7" (k sevens) under qwen3-bpe4k's chat template, thinking off, counted by
# hand: digits and spaces are pre-tokens of their own in Qwen's byte-level BPE (no merge joins them), so the problem
# is 2k - 1 tokens; the rest is 35: 5 specials (<|im_start|> x2, <|im_end|>, <think>, </think>), "user" "\n",
# "\n\n", the instruction's 20 ("P" "lease" " reason" " step" " by" " step" "," " and" " put" " your" " final" " an"
# "swer" " within" " \\" "box" "ed" "{" "}" "."), "\n", "ass" "ist" "ant", "\n", and "\n\n" after each think tag.
def _sevens_prompt_tokens(k):
    return 35 + 2 * k - 1


def _sevens(k):
    return " ".join(["7"] * k)


def test_a_problem_too_long_for_max_model_len_is_counted_in_tokens_with_the_runs_tokenizer(tmp_path):
    from megatron_trace.data.dataset import check_prompt_tokens
    from megatron_trace.data.prompts import build_prompt_ids, student_messages
    from megatron_trace.data.tokenizer import load_tokenizer

    tok = load_tokenizer("qwen3-bpe4k")
    limit = 512 - 48  # tiny_cpu: rollout.max_model_len - rollout.max_response_tokens
    k_fit = (limit - 34) // 2  # 215 sevens: exactly `limit` tokens
    assert _sevens_prompt_tokens(k_fit) == limit
    path = _jsonl(tmp_path / "d.jsonl", [dict(GOOD, problem=_sevens(k_fit), id="fits"),
                                         dict(GOOD, problem=_sevens(k_fit + 1), id="too-long"),
                                         dict(GOOD, problem=_sevens(k_fit + 5), id="longer")])
    problems = load_problems(DataConfig(path=path, id_field="id"))
    assert len(problems[1].problem) < 500  # before: only characters were counted (data.max_text_chars=200,000)

    def ids(p):
        return build_prompt_ids(tok, student_messages(p.problem), enable_thinking=False)

    check_prompt_tokens(problems[:1], ids, limit, "tokens a prompt may take")  # exactly at the limit: accepted
    with pytest.raises(DatasetError, match=rf"d\.jsonl: line 2: problem 'too-long': its prompt is "
                                           rf"{limit + 2} tokens, more than the {limit} tokens a prompt may take "
                                           r"\(1 more problems are too long as well\)"):
        check_prompt_tokens(problems, ids, limit, "tokens a prompt may take")


def test_the_trainer_counts_prompt_tokens_at_load_before_any_model_is_built(tmp_path, monkeypatch):
    from megatron_trace.train import trainer as trainer_mod

    def no_model(*a, **k):
        raise AssertionError("a model was built before the data checks")

    monkeypatch.setattr(trainer_mod, "build_model_and_optimizer", no_model)
    kept = dict(GOOD, kind="mul")  # the example keeps kind == mul
    path = _jsonl(tmp_path / "d.jsonl", [kept, dict(kept, problem=_sevens(60))])  # 154 tokens, 119 characters
    cfg = load_config(EXAMPLE, [f"data.path={path}", f"logging.output_dir={tmp_path / 'run'}", "parallel.tp=1",
                                "logging.tensorboard=false", "rollout.max_model_len=160",
                                "rollout.max_response_tokens=48"])
    with pytest.raises(DatasetError, match=r"d\.jsonl: line 2: problem 'd-1': its prompt is 154 tokens, more than "
                                           r"the 112 tokens a prompt may take \(rollout\.max_model_len=160 - "
                                           r"rollout\.max_response_tokens=48\)"):
        trainer_mod.Trainer(cfg, start_rollout=False)


def test_a_deeply_nested_record_is_a_dataset_error_not_a_crash(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [GOOD], [b"[" * 100_000 + b"]" * 100_000 + b"\n"])
    with pytest.raises(DatasetError, match=r"line 2"):
        load_problems(DataConfig(path=path))


def test_data_and_checkpoint_folder_errors_come_before_any_model_is_built(tmp_path, monkeypatch):
    from megatron_trace.train import trainer as trainer_mod

    def no_model(*a, **k):
        raise AssertionError("a model was built before the data/checkpoint checks")

    monkeypatch.setattr(trainer_mod, "build_model_and_optimizer", no_model)
    bad = _jsonl(tmp_path / "d.jsonl", [GOOD], [b"\xff\xfe\n"])
    cfg = load_config(EXAMPLE, [f"data.path={bad}", f"logging.output_dir={tmp_path / 'run'}", "parallel.tp=1",
                                "logging.tensorboard=false"])
    with pytest.raises(DatasetError, match="line 2: not UTF-8"):
        trainer_mod.Trainer(cfg, start_rollout=False)
    ckpts = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(ckpts, 4)
    cfg = load_config(EXAMPLE, [f"logging.output_dir={tmp_path / 'run'}", "parallel.tp=1", "checkpoint.resume=none",
                                "logging.tensorboard=false"])
    with pytest.raises(ConfigError, match=r"checkpoint.dir: .* holds checkpoints \(step_000004\)"):
        trainer_mod.Trainer(cfg, start_rollout=False)


# ------------------------------------------------------------------------------------------------ resume


def _fake_checkpoint(root, step, complete=True):
    d = os.path.join(root, f"step_{step:06d}")
    os.makedirs(d, exist_ok=True)
    if complete:
        with open(os.path.join(d, ck.STATE_FILE), "w") as f:
            json.dump({"step": step}, f)
    return d


def test_resume_auto_finds_the_newest_complete_checkpoint_without_latest(tmp_path):
    root = str(tmp_path)
    for s in (4, 5):
        _fake_checkpoint(root, s)
    _fake_checkpoint(root, 6, complete=False)  # a kill during the write
    # before: no `latest` -> a fresh start beside step_4/step_5, which keep_last then deleted
    assert ck.resolve_resume("auto", root) == os.path.join(root, "step_000005")
    with open(os.path.join(root, ck.LATEST), "w") as f:
        f.write("step_000009\n")  # names a folder that does not exist
    assert ck.latest_checkpoint(root) == os.path.join(root, "step_000005")


def test_a_fresh_run_refuses_a_folder_with_checkpoints_unless_told_to_overwrite(tmp_path):
    root = str(tmp_path / "ck")
    for s in (4, 5):
        _fake_checkpoint(root, s)
    with pytest.raises(ConfigError, match=r"holds checkpoints \(step_000004, step_000005\).*checkpoint.overwrite"):
        ck.resolve_resume("none", root)
    early = _fake_checkpoint(str(tmp_path / "other"), 2)
    with pytest.raises(ConfigError, match=r"\(step_000004, step_000005\) that a run resuming from .*step_000002"):
        ck.resolve_resume(early, root)  # resuming at step 2 would mix with / be pruned against steps 4, 5
    assert sorted(os.listdir(root)) == ["step_000004", "step_000005"]  # nothing touched
    assert ck.resolve_resume("none", root, overwrite=True) is None
    assert os.listdir(root) == []
    assert ck.resolve_resume("none", str(tmp_path / "empty")) is None  # nothing there: a fresh start is fine


def test_keep_last_never_deletes_what_latest_names(tmp_path):
    root = str(tmp_path)
    for s in (4, 5, 1):
        _fake_checkpoint(root, s)
    ck._write_latest(root, "step_000001")  # e.g. a run that (with overwrite off, now refused) restarted here
    ck._prune(root, keep_last=2)
    # before: sorted names, last two kept -> step_000001 (the one just written, named by latest) deleted
    assert os.path.isdir(os.path.join(root, "step_000001"))
    assert sorted(e for e in os.listdir(root) if e.startswith("step_")) == ["step_000001", "step_000005"]
    assert ck.latest_checkpoint(root) == os.path.join(root, "step_000001")
    ck._prune(root, keep_last=0)  # 0 keeps all
    assert len([e for e in os.listdir(root) if e.startswith("step_")]) == 2


def test_metrics_are_appended_never_truncated_unless_overwriting(tmp_path):
    from megatron_trace.train.metrics import MetricsLogger

    out = str(tmp_path)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    log = MetricsLogger(out, tensorboard=False, resume=True)  # what a run without checkpoint.overwrite opens
    log.log(0, {"loss": 2.0})
    log.close()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(x)["loss"] for x in f] == [1.0, 2.0]
