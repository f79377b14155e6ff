"""cpu_refit.keep_freed_memory: a refit drops a layer's packed copy and packs the new weight (vLLM's oneDNN
handler), on a request thread. With the setting, from the second re-pack on the new copy lands in the pages the old
one left (no page faults); without it glibc hands each freed copy back to the kernel and every re-pack faults all
its pages in again (3x a memcpy for the head). Each case runs in a fresh interpreter (the setting is process-wide)
and counts the process's minor page faults (getrusage) per re-pack, with transparent huge pages off for it (so
that a page is 4 KiB on every machine)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import ctypes, json, resource, sys, threading
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever the system's THP setting
import torch
from vllm import _custom_ops as ops
from megatron_trace.rollout.cpu_refit import keep_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
weight = torch.randn(32768, 1024)  # 128 MiB: above glibc's mmap threshold (<= 32 MiB) and a thread heap (64 MiB)
kernel = {"packed": ops.create_onednn_mm(weight.t(), 32)}
faults = []

def refits():
    torch.set_num_threads(1)
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        del kernel["packed"]  # as cpu_refit._drop_kernel, then the layer's packing
        kernel["packed"] = ops.create_onednn_mm(weight.t(), 32)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

t = threading.Thread(target=refits)
t.start()
t.join()
x = torch.randn(3, 1024)
ok = torch.allclose(ops.onednn_mm(kernel["packed"], x, None), x @ weight.t(), atol=1e-3, rtol=1e-4)
print(json.dumps({"kept": kept, "faults": faults, "pages": weight.numel() * 4 // resource.getpagesize(), "ok": ok}))
"""


def _run(mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_repacked_layer_reuses_the_pages_its_old_copy_left():
    plain, kept = _run("plain"), _run("keep")
    assert plain["ok"] and kept["ok"]  # the re-packed kernel computes with the weight
    assert kept["kept"] is True
    # the premise: without the setting every re-pack faults (nearly) all its pages in again
    assert min(plain["faults"][1:]) > plain["pages"] // 2, plain
    # with it, from the second re-pack on, the freed copy's pages are reused
    # (glibc may place one more block before the freed ones line up: the last re-packs are the steady state)
    assert max(kept["faults"][3:]) < kept["pages"] // 20, kept
