"""tools/evaluate.py on a tiny random Qwen3 and a 10-problem fixture, through the real in-process vLLM engine:
every problem gets k responses sampled with the paper's settings, the verdicts in results.json are the verifier's
verdicts on the saved responses, and the tables carry avg@k / pass@k with intervals. The same model given as a
Megatron checkpoint (converted on the fly) samples the same responses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from proc_tree import wait_all
from tiny_hf_model import make_tiny_qwen3_dir

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "eval")
K, MAX_TOKENS = 2, 12


def _evaluate_together(jobs: list[tuple[str, str]]) -> None:
    """tools/evaluate.py on each (model, out) job, all started at once: independent single-threaded processes
    (OMP_NUM_THREADS=1) on a 2-core machine. Each one's output goes to `<out>.log`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = []
    try:
        for model, out in jobs:
            cmd = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--model", model, "--out", out,
                   "--bench", f"math500={FIX}/math10.jsonl", "--bench", f"gpqa_diamond={FIX}/gpqa3.csv",
                   "--k", str(K), "--max-tokens", str(MAX_TOKENS), "--reward-workers", "1"]
            log = open(out + ".log", "w")
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log))
    finally:
        wait_all(procs, 400)
    for (model, out), (p, _) in zip(jobs, procs):
        assert p.returncode == 0, f"{model}:\n" + open(out + ".log").read()[-8000:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_qwen3_dir(str(tmp_path_factory.mktemp("eval") / "hf"), seed=3, tied=False)


@pytest.fixture(scope="module")
def evals(tiny, tmp_path_factory) -> dict[str, str]:
    """The HF folder and its Megatron conversion (1 x 1), evaluated side by side: {"hf": out, "megatron": out}."""
    from megatron_trace.checkpoint.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("eval")
    megatron_dir = str(root / "megatron")
    convert_hf_to_megatron(tiny, megatron_dir, 1, 1)
    outs = {"hf": str(root / "hf_eval"), "megatron": str(root / "megatron_eval")}
    _evaluate_together([(tiny, outs["hf"]), (megatron_dir, outs["megatron"])])
    return outs


@pytest.fixture(scope="module")
def hf_eval(evals) -> str:
    return evals["hf"]


def test_tiny_model_evaluates_end_to_end_through_the_engine(hf_eval):
    from megatron_trace.rewards import choice_reward, math_reward

    out = hf_eval
    report = json.load(open(os.path.join(out, "results.json")))
    assert report["config"]["temperature"] == 0.6 and report["config"]["top_p"] == 0.95
    assert report["config"]["top_k"] == 20 and report["config"]["enable_thinking"] is True
    rows = [json.loads(l) for l in open(os.path.join(out, "responses.jsonl"))]
    gold = {json.loads(l)["unique_id"]: json.loads(l)["answer"] for l in open(os.path.join(FIX, "math10.jsonl"))}
    assert len(rows) == (10 + 3) * K
    for r in rows:  # every verdict is the verifier's on the saved text; lengths respect max_tokens
        assert 1 <= r["tokens"] <= MAX_TOKENS
        if r["benchmark"] == "math500":
            assert r["correct"] == int(math_reward(r["text"], gold[r["id"]]))
    math = report["benchmarks"]["math500"]
    assert math["problems"] == 10 and sorted(math["per_problem"]) == sorted(gold)
    verdicts = [c for cs in math["per_problem"].values() for c in cs]
    assert len(verdicts) == 10 * K
    assert math["scores"][f"avg@{K}"]["value"] == pytest.approx(sum(verdicts) / len(verdicts))
    assert set(math["scores"]) == {f"avg@{K}", "pass@1", f"pass@{K}"}
    gpqa = report["benchmarks"]["gpqa_diamond"]
    assert gpqa["problems"] == 3
    assert report["average"][f"avg@{K}"] == pytest.approx(
        (math["scores"][f"avg@{K}"]["value"] + gpqa["scores"][f"avg@{K}"]["value"]) / 2)
    # choice verdicts too come from the verifier: a letter-free response (random model) scores 0
    for r in rows:
        if r["benchmark"] == "gpqa_diamond" and r["correct"]:
            assert any(choice_reward(r["text"], letter) for letter in "ABCD")
    md = open(os.path.join(out, "results.md")).read()
    assert "| math500 | 10 |" in md and "| gpqa_diamond | 3 |" in md and "**average**" in md
    assert f"avg@{K}" in md and f"pass@{K}" in md


def test_a_megatron_checkpoint_is_converted_and_samples_as_its_hf_folder(evals):
    """Same weights + same seed = same responses, whether given as the HF folder or as its Megatron conversion
    (converted by `convert_hf_to_megatron` in the `evals` fixture)."""
    hf = [json.loads(l) for l in open(os.path.join(evals["hf"], "responses.jsonl"))]
    mg = [json.loads(l) for l in open(os.path.join(evals["megatron"], "responses.jsonl"))]
    assert len(hf) == (10 + 3) * K
    assert [(r["id"], r["text"]) for r in mg] == [(r["id"], r["text"]) for r in hf]
