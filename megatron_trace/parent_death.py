"""Child processes die with the process that started them (Linux): a trainer killed with SIGKILL must not leave
generation servers or reward workers running, reparented to init."""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG).

    Call it in the child (e.g. as Popen's preexec_fn, or first thing in a worker). Caveat: the signal fires when
    the parent *thread* that forked exits, so start children from a long-lived thread; servers also watch their
    parent's pid (`serve_rollout.py --parent-pid`). A no-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
