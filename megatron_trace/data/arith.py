"""Generated arithmetic / algebra problems with short worked solutions, for tests and the tiny CPU run.

Easy and short on purpose: a 2-layer random Qwen3 learns them in a minute of SFT, responses are ~20-40 tokens,
and every answer is an integer a test can check by hand. Deterministic for a seed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

from megatron_trace.data.dataset import Problem


def _add(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", f"We add: {a} + {b} = {a + b}.", a + b


def _sub(rng: random.Random) -> tuple[str, str, int]:
    a = rng.randint(20, 99)
    b = rng.randint(10, a - 1)
    return f"What is {a} - {b}?", f"We subtract: {a} - {b} = {a - b}.", a - b


def _mul(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} * {b}?", f"We multiply: {a} * {b} = {a * b}.", a * b


def _two_step(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(10, 60), rng.randint(10, 60)
    c = rng.randint(1, a + b - 1)
    s = a + b
    return f"What is {a} + {b} - {c}?", f"First {a} + {b} = {s}, then {s} - {c} = {s - c}.", s - c


def _linear(rng: random.Random) -> tuple[str, str, int]:
    a, x, b = rng.randint(2, 9), rng.randint(1, 12), rng.randint(1, 20)
    c = a * x + b
    return (
        f"Solve {a}x + {b} = {c} for x.",
        f"Subtract {b}: {a}x = {c - b}. Divide by {a}: x = {x}.",
        x,
    )


# (template, weight): mostly one-operation sums, a few two-step and equation problems
TEMPLATES: list[tuple[str, Callable[[random.Random], tuple[str, str, int]], float]] = [
    ("add", _add, 0.30),
    ("sub", _sub, 0.25),
    ("mul", _mul, 0.20),
    ("two_step", _two_step, 0.15),
    ("linear", _linear, 0.10),
]


def make_problem(rng: random.Random) -> tuple[str, Problem]:
    """One random problem: (template name, Problem with id unset). The solution ends in `\\boxed{answer}`."""
    names = [t[0] for t in TEMPLATES]
    kind = rng.choices(names, weights=[t[2] for t in TEMPLATES])[0]
    fn = dict((t[0], t[1]) for t in TEMPLATES)[kind]
    problem, work, answer = fn(rng)
    solution = f"{work}\nThe answer is \\boxed{{{answer}}}."
    return kind, Problem(id="", problem=problem, solution=solution, answer=str(answer))


def make_splits(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Disjoint splits of distinct problems, e.g. sizes={"train": 2000, "test": 100}; records are JSON-ready."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        records: list[dict] = []
        attempts = 0
        while len(records) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise RuntimeError(f"could not draw {n} distinct problems for {split!r}")
            kind, p = make_problem(rng)
            if p.problem in seen:
                continue
            seen.add(p.problem)
            records.append(
                {"id": f"arith-{split}-{len(records)}", "problem": p.problem, "solution": p.solution,
                 "answer": p.answer, "kind": kind}
            )
        out[split] = records
    return out


def write_jsonl(records: list[dict], path: str | Path) -> None:
    """Write records as JSONL through a temp file renamed into place (no half-written dataset on a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def assets_dir() -> Path:
    """Folder of the shipped datasets (`arith_train.jsonl`, `arith_test.jsonl`)."""
    return Path(__file__).parent / "assets"
