"""The engine's platform-dependent settings (dtype, KV cache bytes, sleep mode) for CPU and for GPU, as every
place that builds an engine sees them: `engine_platform_settings`, the trainer's `start_engine` (server and
in-process engines), `ManagedServer`'s command line, `tools/serve_rollout.py` and `VLLMEngine`'s call into vLLM.
The GPU case is checked on this CPU machine by making `torch.cuda.is_available()` answer True; vLLM itself is
replaced by a recorder.

The defect pinned: a 64 MiB KV cache (the CPU default) passed to vLLM on GPU, where it replaces
gpu_memory_utilization and vLLM refuses to start (Qwen3-8B needs 1.41 GiB at max_model_len 10,240).
"""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest
import torch

from megatron_trace.rollout.platform import CPU_KV_CACHE_BYTES, engine_platform_settings

GPU = mock.patch("torch.cuda.is_available", return_value=True)
CPU = mock.patch("torch.cuda.is_available", return_value=False)


def test_cpu_settings():
    s = engine_platform_settings(cuda=False, bf16=True)
    assert (s.dtype, s.kv_cache_memory_bytes, s.enable_sleep_mode) == ("float32", CPU_KV_CACHE_BYTES, False)
    assert engine_platform_settings(cuda=False, kv_cache_memory_bytes=16 << 20).kv_cache_memory_bytes == 16 << 20
    # Sleep mode on CPU (colocated demo): the engine accepts sleep/wake as no-ops; vLLM is built without it.
    s = engine_platform_settings(cuda=False, enable_sleep_mode=True)
    assert (s.enable_sleep_mode, s.vllm_sleep_mode) == (True, False)
    assert s.kv_cache_memory_bytes == CPU_KV_CACHE_BYTES


def test_gpu_settings():
    s = engine_platform_settings(cuda=True, bf16=True)
    assert (s.dtype, s.kv_cache_memory_bytes, s.enable_sleep_mode) == ("bfloat16", None, False)
    assert engine_platform_settings(cuda=True, bf16=False).dtype == "float32"
    assert engine_platform_settings(cuda=True).dtype == "bfloat16"
    assert engine_platform_settings(cuda=True, enable_sleep_mode=True).enable_sleep_mode is True
    assert engine_platform_settings(cuda=True, enable_sleep_mode=True).vllm_sleep_mode is True
    assert engine_platform_settings(cuda=True).vllm_sleep_mode is False
    # A size the user set is honoured on GPU too (it is theirs to get right).
    assert engine_platform_settings(cuda=True, kv_cache_memory_bytes=2 << 30).kv_cache_memory_bytes == 2 << 30
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        engine_platform_settings(cuda=True, kv_cache_memory_bytes=0)


def _cfg(*overrides):
    from megatron_trace.config import load_config

    return load_config(None, ["logging.output_dir=/tmp/engine_platform", *overrides])


def _start_engine(cfg):
    """start_engine's ManagedServer / VLLMEngine arguments (both replaced by recorders)."""
    from megatron_trace.rollout import launch

    seen = {}
    with mock.patch.object(launch, "ManagedServer", lambda model_dir, **kw: seen.setdefault("server", kw)), \
            mock.patch("megatron_trace.rollout.engine.VLLMEngine", lambda c: seen.setdefault("engine", c)):
        launch.start_engine(cfg, lambda out_dir: None)
    return seen


@pytest.mark.parametrize("engine", ["server", "inprocess"])
def test_start_engine_on_gpu_leaves_the_kv_cache_to_vllm_and_passes_sleep_mode(engine):
    cfg = _cfg("model.bf16=true", "rollout.enable_sleep_mode=true", f"rollout.engine={engine}")
    with GPU, mock.patch("megatron_trace.rollout.engine.EngineConfig", lambda **kw: kw):
        seen = _start_engine(cfg)
    got = seen["server" if engine == "server" else "engine"]
    assert got["kv_cache_memory_bytes"] is None
    assert got["dtype"] == "bfloat16" and got["enable_sleep_mode"] is True


@pytest.mark.parametrize("engine", ["server", "inprocess"])
def test_start_engine_on_cpu_sizes_the_kv_cache_and_accepts_sleep_mode_as_a_no_op(engine):
    with CPU, mock.patch("megatron_trace.rollout.engine.EngineConfig", lambda **kw: kw):
        seen = _start_engine(_cfg(f"rollout.engine={engine}", "model.bf16=true"))
        got = seen["server" if engine == "server" else "engine"]
        assert got["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES and got["dtype"] == "float32"
        assert got["enable_sleep_mode"] is False
        # Asked for on CPU: passed on (the engine accepts sleep/wake as logged no-ops), not an error.
        seen = _start_engine(_cfg(f"rollout.engine={engine}", "rollout.enable_sleep_mode=true"))
        got = seen["server" if engine == "server" else "engine"]
        assert got["enable_sleep_mode"] is True and got["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES


def test_managed_server_command_line_carries_sleep_mode_and_only_a_set_kv_size(tmp_path):
    from megatron_trace.rollout import launch

    cmds = []

    class FakeProc:
        pid, returncode = 0, 0

        def __init__(self, cmd, **kw):
            cmds.append(cmd)

        def poll(self):
            return 0

    with mock.patch.object(launch.subprocess, "Popen", FakeProc):
        launch.ManagedServer(str(tmp_path), log_path=str(tmp_path / "a.log"), enable_sleep_mode=True,
                             wait=False, token="t").client.close()
        launch.ManagedServer(str(tmp_path), log_path=str(tmp_path / "b.log"), kv_cache_memory_bytes=1 << 26,
                             wait=False, token="t").client.close()
    assert "--enable-sleep-mode" in cmds[0] and "--kv-cache-memory-bytes" not in cmds[0]
    assert "--enable-sleep-mode" not in cmds[1]
    assert cmds[1][cmds[1].index("--kv-cache-memory-bytes") + 1] == str(1 << 26)


def _model_dir(path) -> str:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"tie_word_embeddings": False, "vocab_size": 2}, f)  # the engine bounds token ids by it
    save_file({"w": torch.zeros(2, 2)}, os.path.join(path, "model.safetensors"))
    return str(path)


def _serve_rollout(argv):
    """The EngineConfig `tools/serve_rollout.py` builds, and the kwargs VLLMEngine hands to vllm.LLM."""
    from megatron_trace.rollout import server
    from megatron_trace.rollout.engine import VLLMEngine

    built = {}

    def engine(cfg):
        built["config"] = cfg
        with mock.patch("vllm.LLM", lambda **kw: built.setdefault("llm", kw)):
            return VLLMEngine(cfg)

    # (the server's run loop replaced too: nothing is served; _close_within would wait on the recorder engine)
    with mock.patch("megatron_trace.rollout.engine.VLLMEngine", engine), mock.patch("uvicorn.run"), \
            mock.patch.object(server, "_BoundedShutdownServer"), mock.patch.object(server, "_close_within"), \
            mock.patch("megatron_trace.data.tokenizer.load_tokenizer"), mock.patch.object(server, "build_app"):
        server.main(argv)
    return built


def test_serve_rollout_on_gpu_passes_no_kv_size_and_bf16(tmp_path):
    model = _model_dir(tmp_path / "m")
    with GPU:
        built = _serve_rollout(["--model", model, "--enable-sleep-mode"])
    assert built["config"].dtype == "bfloat16" and built["config"].enable_sleep_mode
    assert "kv_cache_memory_bytes" not in built["llm"] and built["llm"]["enable_sleep_mode"] is True


def test_serve_rollout_on_cpu_passes_the_cpu_kv_size_and_builds_vllm_without_sleep_mode(tmp_path):
    model = _model_dir(tmp_path / "m")
    with CPU:
        built = _serve_rollout(["--model", model])
        assert built["config"].dtype == "float32"
        assert built["llm"]["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
        # --enable-sleep-mode on CPU: the engine accepts sleep/wake (no-ops), vLLM's CPU build gets it off.
        built = _serve_rollout(["--model", model, "--enable-sleep-mode"])
    assert built["config"].enable_sleep_mode is True and built["llm"]["enable_sleep_mode"] is False


def test_a_committed_streamed_update_is_the_full_update_a_level_2_sleep_waits_for(tmp_path):
    """GPU path (vLLM replaced by a recorder): after sleep(level=2) the weights are gone and generate refuses;
    the shared-memory / IPC update (load_weights_stream + commit_loaded_weights) is a complete update and ends
    the refusal, like update_weights does."""
    from megatron_trace.rollout.engine import EngineConfig, VLLMEngine

    model = _model_dir(tmp_path / "m")
    llm = mock.MagicMock()
    with GPU, mock.patch("vllm.LLM", lambda **kw: llm):
        engine = VLLMEngine(EngineConfig(model_dir=model, enable_sleep_mode=True))
        engine.sleep(level=2)
        llm.sleep.assert_called_once_with(level=2)
        engine.wake_up()
        with pytest.raises(RuntimeError, match="discarded by a level-2 sleep"):
            engine._check_serving()
        engine.load_weights_stream(iter([("w", torch.ones(2, 2))]), version=1)
        with pytest.raises(RuntimeError, match="discarded by a level-2 sleep"):  # loaded, not yet served
            engine._check_serving()
        assert engine.commit_loaded_weights(1) == 1
        engine._check_serving()  # serving again
        assert engine.weight_version == 1


def test_on_cpu_sleep_and_wake_are_accepted_no_ops_that_keep_the_weights(tmp_path, caplog):
    from megatron_trace.rollout.engine import EngineConfig, VLLMEngine

    model = _model_dir(tmp_path / "m")
    llm = mock.MagicMock()
    with CPU, mock.patch("vllm.LLM", lambda **kw: llm), caplog.at_level("INFO"):
        engine = VLLMEngine(EngineConfig(model_dir=model, enable_sleep_mode=True))
        engine.sleep(level=2)
        with pytest.raises(RuntimeError, match="asleep"):
            engine._check_serving()
        engine.wake_up()
        engine._check_serving()  # nothing was discarded on CPU
    assert not llm.sleep.called and not llm.wake_up.called
    assert "costs nothing" in caplog.text
