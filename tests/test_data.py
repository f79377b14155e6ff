"""Datasets, prompts and the shipped arithmetic problems, with the real Qwen3 tokenizer and chat template."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_trace.config_base import ConfigError, from_dict
from megatron_trace.data.arith import assets_dir, make_splits
from megatron_trace.data.dataset import DataConfig, DatasetError, Problem, load_problems
from megatron_trace.data.prompts import build_prompt_ids, privileged_messages, student_messages
from megatron_trace.rewards.math import math_reward

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_with_field_map_and_nested_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"q": "What is 1+1?", "meta": {"sol": "1+1=2, \\boxed{2}"}, "gt": [{"v": 2}], "uid": "a"},
        {"q": "What is 2+2?", "meta": {"sol": "2+2=4, \\boxed{4}"}, "gt": [{"v": "4"}], "uid": "b"},
    ])
    cfg = DataConfig(path=path, field_map={"problem": "q", "solution": "meta.sol", "answer": "gt.0.v"}, id_field="uid")
    assert load_problems(cfg) == [
        Problem("a", "What is 1+1?", "1+1=2, \\boxed{2}", "2"),
        Problem("b", "What is 2+2?", "2+2=4, \\boxed{4}", "4"),
    ]


def test_parquet_and_answer_taken_from_the_solution_box(tmp_path):
    table = pa.table({"problem": ["p1", "p2", "p3"], "solution": ["s \\boxed{\\frac{1}{2}}", "t \\boxed{7}", "u \\boxed{8}"],
                      "domain": ["math", "code", "math"]})
    pq.write_table(table, tmp_path / "d.parquet")
    cfg = DataConfig(path=str(tmp_path / "d.parquet"), where={"domain": "math"})
    problems = load_problems(cfg)
    assert [(p.problem, p.answer) for p in problems] == [("p1", "\\frac{1}{2}"), ("p3", "8")]
    assert [p.id for p in problems] == ["d-0", "d-1"]


def test_missing_field_names_the_field_the_column_and_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "ok", "solution": "\\boxed{1}", "answer": "1"},
        {"question": "ok", "solution": "s", "answer": "1"},
        {"solution": "s", "answer": "1"},
    ])
    with pytest.raises(DatasetError, match=r"line 3: record has no field 'problem' \(mapped from column 'question'\)"):
        load_problems(DataConfig(path=path, field_map={"problem": "question"}))


def test_missing_answer_without_a_boxed_solution_is_an_error_naming_the_row(tmp_path):
    pq.write_table(pa.table({"problem": ["p", "q"], "solution": ["\\boxed{1}", "no box"]}), tmp_path / "d.parquet")
    with pytest.raises(DatasetError, match=r"row 1: record has no field 'answer'"):
        load_problems(DataConfig(path=str(tmp_path / "d.parquet")))


def test_empty_field_bad_json_missing_file_and_unknown_mapping_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "  ", "solution": "s", "answer": "1"}])
    with pytest.raises(DatasetError, match="line 1: record has an empty field 'problem'"):
        load_problems(DataConfig(path=path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "solution": "s", "answer": "1"}\n{oops\n')
    with pytest.raises(DatasetError, match="line 2: not valid JSON"):
        load_problems(DataConfig(path=str(bad)))
    with pytest.raises(DatasetError, match="not found"):
        load_problems(DataConfig(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ConfigError, match="field_map: unknown field"):
        from_dict(DataConfig, {"path": path, "field_map": {"question": "q"}})
    with pytest.raises(DatasetError, match="cannot tell the format"):
        (tmp_path / "d.csv").write_text("x")
        load_problems(DataConfig(path=str(tmp_path / "d.csv")))


def test_grpo_only_data_may_lack_solutions_when_allowed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"content": "p"}], "reward_model": {"ground_truth": "3"}}])
    cfg = DataConfig(path=path, field_map={"problem": "prompt.0.content", "answer": "reward_model.ground_truth"},
                     require_solution=False)
    assert load_problems(cfg)[0] == Problem("d-0", "p", "", "3")
    cfg.require_solution = True
    with pytest.raises(DatasetError, match="no field 'solution'"):
        load_problems(cfg)


def test_student_prompt_uses_the_qwen3_chat_template_with_thinking_on_and_off(tok):
    msgs = student_messages("What is 2 + 3?")
    off = tok.decode(build_prompt_ids(tok, msgs, enable_thinking=False))
    on = tok.decode(build_prompt_ids(tok, msgs, enable_thinking=True))
    body = "<|im_start|>user\nWhat is 2 + 3?\n\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    assert off == body + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on == body + "<|im_start|>assistant\n"


def test_privileged_prompt_has_problem_solution_and_labels(tok):
    msgs = privileged_messages("What is 2 + 3?", "2 + 3 = 5. \\boxed{5}", ["adds the two numbers", "  ", "states the box"])
    text = tok.decode(build_prompt_ids(tok, msgs, enable_thinking=False))
    assert "What is 2 + 3?" in text and "2 + 3 = 5. \\boxed{5}" in text
    assert "- adds the two numbers\n- states the box" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(ValueError, match="reference solution is empty"):
        privileged_messages("p", " ", [])


def test_shipped_arith_files_are_what_the_script_writes(tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "make_arith_data.py"), "--out-dir", str(tmp_path)],
                   check=True, capture_output=True)
    for split in ("train", "test"):
        assert (tmp_path / f"arith_{split}.jsonl").read_text() == (assets_dir() / f"arith_{split}.jsonl").read_text()


def _check_arith(problem: str, answer: int) -> bool:
    """Independent check of a generated problem: recompute its answer from the problem text."""
    m = re.fullmatch(r"What is (\d+) ([+\-*]) (\d+)\?", problem)
    if m:
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return answer == {"+": a + b, "-": a - b, "*": a * b}[op]
    m = re.fullmatch(r"What is (\d+) \+ (\d+) - (\d+)\?", problem)
    if m:
        return answer == int(m.group(1)) + int(m.group(2)) - int(m.group(3))
    m = re.fullmatch(r"Solve (\d+)x \+ (\d+) = (\d+) for x\.", problem)
    if m:
        return int(m.group(1)) * answer + int(m.group(2)) == int(m.group(3))
    raise AssertionError(f"unknown template: {problem}")


def test_shipped_arith_problems_are_right_short_distinct_and_disjoint(tok):
    train = load_problems(DataConfig(path=str(assets_dir() / "arith_train.jsonl"), id_field="id"))
    test = load_problems(DataConfig(path=str(assets_dir() / "arith_test.jsonl"), id_field="id"))
    assert len(train) == 2000 and len(test) == 100
    assert not {p.problem for p in train} & {p.problem for p in test}
    assert len({p.problem for p in train}) == 2000
    lengths = []
    for p in train + test:
        assert _check_arith(p.problem, int(p.answer)), p
        assert p.solution.endswith(f"\\boxed{{{p.answer}}}.")
        lengths.append(len(tok.encode(p.solution)))
    assert 10 <= min(lengths) and max(lengths) <= 45
    for p in test[:20]:  # the verifier agrees with the worked solutions
        assert math_reward(p.solution, p.answer) == 1.0


def test_arith_generation_is_deterministic_per_seed():
    assert make_splits(5, {"a": 50}) == make_splits(5, {"a": 50})
    assert make_splits(5, {"a": 50}) != make_splits(6, {"a": 50})
