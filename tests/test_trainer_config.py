"""A bad run config fails before any work, with a message naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_trace.config import ConfigError, load_config, validate_run_config
from megatron_trace.distributed.setup import free_ports

DATA = "megatron_trace/data/assets/arith_test.jsonl"
EXAMPLE = "examples/configs/tiny_cpu.yaml"


def _closed_port() -> int:
    return free_ports(1)[0]  # closed again on return: nothing listens there


def test_the_shipped_example_configs_load_and_validate():
    for path in (EXAMPLE, "examples/configs/tiny_cpu_sft.yaml"):
        cfg = load_config(path)
        hf = validate_run_config(cfg, world_size=cfg.parallel.tp * cfg.parallel.pp)
        assert hf["num_hidden_layers"] >= 1
    # The GPU recipes (data and annotator are the user's): 8 GPUs a node.
    for path, layers, rkl in (("examples/configs/qwen3_8b.yaml", 36, False),
                              ("examples/configs/qwen3_1p7b.yaml", 28, True)):
        cfg = load_config(path, [f"data.path={DATA}"])
        hf = validate_run_config(cfg, world_size=8, check_annotator=False)
        assert hf["num_hidden_layers"] == layers and cfg.model.bf16 and cfg.annotate.spans.rkl is rkl


@pytest.mark.parametrize("overrides, world, field", [
    (["loss.wo=0.5"], 2, "loss.wo"),
    (["rollout.group_size=four"], 2, "rollout.group_size"),
    (["parallel.tp=3"], 3, "parallel.tp"),
    (["parallel.tp=4", "model.hf_config=qwen3-8b"], 4, "parallel.tp"),  # 8 kv heads: fine; 32 heads: fine
    (["parallel.pp=3"], 6, "parallel.pp"),
    (["data.path=/nonexistent/problems.jsonl"], 2, "data.path"),
    (["model.hf_config=/nonexistent/model"], 2, "model.hf_config"),
    (["model.load=/nonexistent/ckpt"], 2, "model.load"),
    (["model.tokenizer=/nonexistent/tokenizer"], 2, "model.tokenizer"),
    (["model.tokenizer=null"], 2, "model.tokenizer"),  # the real Qwen3 tokenizer: 151,669 ids > 4,096 rows
    (["loss.mode=ppo"], 2, "loss.mode"),
    (["annotate.spans.coverage_cap=1.5"], 2, "annotate.spans.coverage_cap"),
    (["rollout.engine=inprocess"], 2, "rollout.engine"),
    (["rollout.num_servers=0"], 2, "rollout.num_servers"),
    (["rollout.server_url=http://127.0.0.1:8100", "rollout.server_urls=[http://127.0.0.1:8101]"], 2,
     "rollout.server_urls"),  # one or the other
    (["parallel.tp=2"], 3, "parallel"),  # world size not divisible
])
def test_bad_config_names_the_field(overrides, world, field):
    if overrides == ["parallel.tp=4", "model.hf_config=qwen3-8b"]:
        # Qwen3-8B has 32 heads / 8 kv heads: tp=4 is valid, tp=16 is not.
        cfg = load_config(EXAMPLE, overrides)
        validate_run_config(cfg, world_size=4)
        overrides = ["parallel.tp=16", "model.hf_config=qwen3-8b"]
        world = 16
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg = load_config(EXAMPLE, overrides)
        validate_run_config(cfg, world_size=world)


def test_unreachable_annotator_is_reported_at_start_up_naming_the_url():
    port = _closed_port()
    cfg = load_config(EXAMPLE, ["annotate.annotator=external", f"annotate.client.base_url=http://127.0.0.1:{port}/v1",
                                "annotate.client.model=judge", "annotate.client.timeout_s=2", "parallel.tp=1"])
    with pytest.raises(ConfigError, match=rf"annotate\.client\.base_url.*127\.0\.0\.1:{port}"):
        validate_run_config(cfg, world_size=1)


def test_external_annotator_without_a_model_name_is_rejected_on_load():
    with pytest.raises(ConfigError, match=r"annotate\.client\.model"):
        load_config(EXAMPLE, ["annotate.annotator=external"])


def test_the_launcher_exits_2_with_the_field_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(EXAMPLE).read() + "\nbogus_section:\n  x: 1\n")
    out = subprocess.run([sys.executable, "-m", "megatron_trace.train", "--config", str(bad),
                          f"logging.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "bogus_section" in out.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a bad config"


def test_the_progress_bar_shows_steps_and_the_running_phase_and_keeps_step_lines_whole(capsys):
    import io

    from megatron_trace.train.metrics import RunProgress, Timer

    term = io.StringIO()
    progress = RunProgress(10, initial=3, desc="trace", file=term, force=True)
    timer = Timer(on_phase=progress.phase)
    with timer("rollout"):
        pass
    assert "3/10" in term.getvalue() and "rollout" in term.getvalue()
    progress.counter("annotate")(5, 64)
    assert "annotate 5/64" in term.getvalue()
    progress.write("step    3 | reward 0.500")
    progress.step_done()
    progress.close()
    assert "4/10" in term.getvalue()
    assert capsys.readouterr().out == "step    3 | reward 0.500\n"
    assert set(timer.pop()) == {"time/rollout"}
    # not a terminal (logs, CI): no bar at all, plain lines
    quiet = io.StringIO()
    progress = RunProgress(10, file=quiet)
    progress.phase("train")
    progress.write("step    0")
    progress.step_done()
    progress.close()
    assert quiet.getvalue() == "" and capsys.readouterr().out == "step    0\n"
