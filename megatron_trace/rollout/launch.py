"""Bring up the trainer's generation engine: a vLLM generation server beside the driver rank (or one already
running), several of them in data parallel (an `EnginePool`), or an in-process engine for single-process runs.

A server is started as a child process of global rank 0 with torchrun's variables removed from its
environment (vLLM would otherwise join the trainer's process group), bound to 127.0.0.1 on a free port, with a
fresh bearer token (shared by all of a run's servers), and stopped with the trainer. Its log goes to
`<output_dir>/rollout_server.log`, or `rollout_server.<i>.log` for server i of `rollout.num_servers` > 1.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

import httpx

from megatron_trace.distributed.setup import free_ports
from megatron_trace.parent_death import die_with_parent as _die_with_parent

__all__ = ["start_engine", "ManagedServer"]

logger = logging.getLogger(__name__)

# torchrun's (and torch elastic's) variables: a child with these would think it is a trainer rank.
_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ManagedServer:
    """A generation server child process and its client; a `GenerationEngine` (generate, update_weights).

    The trainer passes its rollout settings; tests and benchmarks also use: token (this bearer token instead of
    the one in $token_env or a fresh one), extra_args (more `serve_rollout.py` flags, e.g. size limits),
    extra_env (variables for the child only, e.g. OMP_NUM_THREADS or CUDA_VISIBLE_DEVICES), die_with_parent (default
    on: the child gets SIGTERM when the process that started it dies, and watches that process's pid as well, so
    a trainer, test or benchmark killed with SIGKILL leaves no server behind; Linux), port (default: a free one),
    wait (False: return once the process is started; call `wait_ready()` before use, so that several servers start
    side by side), enable_sleep_mode (the server's engine can sleep()/wake_up(); on CPU accepted no-ops), host (the
    address it listens on) and advertise_host (the one its URL names, for other nodes; default 127.0.0.1).
    Arguments left at None are left to the server's own defaults. Also a context manager (close() on exit).
    """

    def __init__(self, model_dir: str, *, log_path: str, token_env: str = "MEGATRON_TRACE_ROLLOUT_TOKEN",
                 dtype: str | None = None, max_model_len: int | None = None,
                 kv_cache_memory_bytes: int | None = None, gpu_memory_utilization: float | None = None,
                 seed: int | None = None, start_timeout_s: float = 300.0, token: str | None = None,
                 extra_args: Sequence[str] = (), extra_env: Mapping[str, str] | None = None,
                 die_with_parent: bool = True, port: int | None = None, wait: bool = True,
                 enable_sleep_mode: bool = False, host: str = "127.0.0.1", advertise_host: str | None = None):
        from megatron_trace.rollout.client import RolloutClient

        token = token or os.environ.get(token_env) or secrets.token_hex(16)
        # The client reads the token from this variable; the child inherits it.
        os.environ[token_env] = token
        env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
        env.update(extra_env or {})
        self.port = port or free_ports(1)[0]
        self.url = f"http://{advertise_host or '127.0.0.1'}:{self.port}"
        cmd = [sys.executable, os.path.join(_REPO_ROOT, "tools", "serve_rollout.py"), "--model", model_dir,
               "--host", host, "--port", str(self.port), "--token-env", token_env]
        for flag, value in (("--dtype", dtype), ("--max-model-len", max_model_len),
                            ("--gpu-memory-utilization", gpu_memory_utilization), ("--seed", seed)):
            if value is not None:
                cmd += [flag, str(value)]
        if kv_cache_memory_bytes:
            cmd += ["--kv-cache-memory-bytes", str(kv_cache_memory_bytes)]
        if enable_sleep_mode:
            cmd += ["--enable-sleep-mode"]
        if die_with_parent:
            cmd += ["--parent-pid", str(os.getpid())]
        cmd += [str(a) for a in extra_args]
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent if die_with_parent else None)
        self._started = time.monotonic()
        self.client = RolloutClient(base_url=self.url, token_env=token_env)
        self.start_timeout_s = start_timeout_s
        if wait:
            self.wait_ready()

    def __enter__(self) -> "ManagedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the server answers /health (default limit: start_timeout_s after the process started); on
        failure the server is stopped and the error quotes the end of its log."""
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        deadline = self._started + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"the generation server exited with code {self.proc.returncode} during "
                                   f"start-up; last lines of {self.log_path}:\n{self._tail()}")
            try:  # a bare probe: the client's retry logging would flood the log during start-up
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.close()
        raise TimeoutError(f"the generation server did not become healthy within {timeout_s:.0f}s "
                           f"(rollout.server_start_timeout_s); see {self.log_path}:\n{self._tail()}")

    def _tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def generate(self, prompt_token_ids, sampling):
        return self.client.generate(prompt_token_ids, sampling)

    @property
    def on_progress(self):
        return self.client.on_progress

    @on_progress.setter
    def on_progress(self, fn) -> None:  # forwarded to the client (progress of a generate call)
        self.client.on_progress = fn

    def update_weights(self, buckets, version: int | None = None) -> int:
        return self.client.update_weights(buckets, version)

    def sleep(self, level: int = 1) -> None:
        self.client.sleep(level)

    def wake_up(self) -> None:
        self.client.wake_up()

    def close(self) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after 30 s); idempotent."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.client.close()
        self._log.close()


def start_engine(cfg, export_fn: Callable[[str], None], *, driver: bool = True):
    """The run's generation engine on the driver (None on other ranks); collective when the current weights
    must first be exported as an HF folder (`export_fn(dir)`, called on every rank).

    External servers (`rollout.server_url`, or `rollout.server_urls`) are used as they are: the trainer pushes
    its weights before the first step. Otherwise `rollout.num_servers` servers are started beside the driver.
    One server is returned as its client (or ManagedServer), several as an `EnginePool` over them.
    """
    r = cfg.rollout
    urls = r.external_urls
    if urls:
        if not driver:
            return None
        from megatron_trace.rollout.client import RolloutClient

        clients = [RolloutClient(base_url=u, token_env=r.server_token_env) for u in urls]
        if len(clients) == 1:
            clients[0].health()  # fails now, naming the URL, if unreachable
            return clients[0]
        from megatron_trace.rollout.pool import EnginePool

        pool = EnginePool(clients)
        try:
            pool.health()  # fails now, naming every unreachable URL
        except Exception:
            pool.close()
            raise
        return pool
    model_dir = os.path.join(cfg.logging.output_dir, "rollout_model")
    export_fn(model_dir)
    if not driver:
        return None
    from megatron_trace.rollout.platform import engine_platform_settings

    plat = engine_platform_settings(bf16=cfg.model.bf16, kv_cache_memory_bytes=r.kv_cache_memory_bytes,
                                    enable_sleep_mode=r.enable_sleep_mode)
    if r.engine == "inprocess":
        from megatron_trace.rollout.engine import EngineConfig, VLLMEngine

        return VLLMEngine(EngineConfig(model_dir=model_dir, dtype=plat.dtype, max_model_len=r.max_model_len,
                                       gpu_memory_utilization=r.gpu_memory_utilization,
                                       kv_cache_memory_bytes=plat.kv_cache_memory_bytes, seed=cfg.train.seed,
                                       enable_sleep_mode=plat.enable_sleep_mode))
    n = r.num_servers
    kwargs = dict(token_env=r.server_token_env, dtype=plat.dtype, max_model_len=r.max_model_len,
                  kv_cache_memory_bytes=plat.kv_cache_memory_bytes, gpu_memory_utilization=r.gpu_memory_utilization,
                  seed=cfg.train.seed, start_timeout_s=r.server_start_timeout_s,
                  enable_sleep_mode=plat.enable_sleep_mode)
    if n == 1 and not r.server_gpus:
        return ManagedServer(model_dir, log_path=os.path.join(cfg.logging.output_dir, "rollout_server.log"),
                             **kwargs)
    import torch

    gpus = r.server_gpus if r.server_gpus and torch.cuda.is_available() else None  # CPU: nothing to place
    if gpus is None and n > 1 and torch.cuda.is_available():
        logger.warning("rollout.num_servers=%d without rollout.server_gpus: every server sees the same devices "
                       "and vLLM puts them all on the first one", n)
    # One token for all (each ManagedServer would otherwise pick its own); distinct ports picked at once.
    token = os.environ.get(r.server_token_env) or secrets.token_hex(16)
    ports = free_ports(n)
    servers: list[ManagedServer] = []
    try:
        for i in range(n):  # start them all, then wait: the servers load side by side
            log = "rollout_server.log" if n == 1 else f"rollout_server.{i}.log"
            servers.append(ManagedServer(model_dir, log_path=os.path.join(cfg.logging.output_dir, log), token=token,
                                         port=ports[i], wait=False, **kwargs,
                                         extra_env={"CUDA_VISIBLE_DEVICES": gpus[i]} if gpus else None))
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.close()
        raise
    if n == 1:
        return servers[0]
    from megatron_trace.rollout.pool import EnginePool

    return EnginePool(servers)
