"""The checkpoint writer's results-queue manager dies with the trainer: megatron's async filesystem writer keeps a
module-global queue served by a multiprocessing manager process; killed with SIGKILL, the trainer must not leave
that process running, reparented to init (before: it did, started by megatron itself on the first save)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from proc_tree import children_of


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:  # a zombie counts as gone
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_results_manager_is_ours_and_dies_with_its_killed_parent(tmp_path):
    ready = tmp_path / "ready"
    parent = textwrap.dedent(f"""
        import time
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from megatron_trace.train import checkpointing
        checkpointing._install_write_results_queue()
        q = filesystem_async._get_write_results_queue()
        assert q is filesystem_async._results_queue and checkpointing._results_manager is not None
        checkpointing._install_write_results_queue()  # idempotent: the same queue, no second manager
        assert filesystem_async._get_write_results_queue() is q
        q.put({{"rank": 0}})
        assert q.get(timeout=30) == {{"rank": 0}}
        open({str(ready)!r}, "w").write("ok")
        time.sleep(3600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], env={**os.environ, "PYTHONPATH": os.getcwd()})
    children: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), f"the parent exited with {proc.poll()} before its queue worked"
        children = children_of(proc.pid)
        assert len(children) == 1, children  # exactly one manager process
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        while any(_alive(c) for c in children) and time.monotonic() - t0 < 30:
            time.sleep(0.2)
        assert not [c for c in children if _alive(c)], "the results manager outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in children:
            if _alive(c):
                os.kill(c, signal.SIGKILL)
