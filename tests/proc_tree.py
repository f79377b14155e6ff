"""Process helpers for the tests: the children of a pid (what a killed trainer leaves behind), and waiting on
subprocesses started together."""

from __future__ import annotations

import os


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc/*/stat)."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return out


def wait_all(procs: list, timeout: float) -> None:
    """Wait for every (Popen, log file) of `procs`, each up to `timeout` s; whatever happens, kill the ones still
    running and close every log."""
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
