"""Process-tree helpers for the tests that kill a trainer and check what it leaves behind."""

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
