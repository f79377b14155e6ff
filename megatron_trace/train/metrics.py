"""Per-step metrics: a compact stdout line, JSONL, TensorBoard, and wandb when configured (driver rank only); the
run's progress bar on the driver's terminal.

Metrics are flat dicts of floats whose meaning the logger does not know (a loss declares how its metrics are
reduced: megatron_trace/loss/reductions.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

__all__ = ["MetricsLogger", "RunProgress", "Timer"]

# The stdout line: (key, label, format).
_LINE = [("reward_mean", "reward", "{:.3f}"), ("lambda", "lambda", "{:.3f}"), ("kl_fkl", "fkl", "{:.4f}"),
         ("kl_rkl", "rkl", "{:.4f}"), ("entropy", "H", "{:.3f}"), ("response_len", "len", "{:.1f}"),
         ("loss", "loss", "{:.4f}"), ("grad_norm", "gnorm", "{:.3f}"), ("tokens_per_s", "tok/s", "{:.0f}"),
         ("time/step", "s", "{:.1f}")]


class Timer:
    """Accumulates wall-clock seconds per phase: `with timer("rollout"): ...`. `on_phase(name)` is called as each
    phase starts (the progress bar shows it)."""

    def __init__(self, on_phase=None):
        self.times: dict[str, float] = {}
        self.on_phase = on_phase

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                if timer.on_phase is not None:
                    timer.on_phase(name)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0

        return _Phase()

    def pop(self) -> dict[str, float]:
        out, self.times = {f"time/{k}": v for k, v in self.times.items()}, {}
        return out


class RunProgress:
    """A tqdm bar of the run (steps done of `total`, rate, ETA) with the phase running now (rollout, reward,
    annotate, teacher, train, sync) on the driver's terminal. Drawn only when `file` is a terminal (or `force`), so
    logs and CI output keep one plain line per step; `write` prints a line above the bar without breaking it."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train", enabled: bool = True, file=None,
                 force: bool = False):
        from tqdm import tqdm

        self._file = file if file is not None else sys.stderr
        active = enabled and (force or (hasattr(self._file, "isatty") and self._file.isatty()))
        self._tqdm = tqdm
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=self._file, dynamic_ncols=True,
                        disable=not active, mininterval=0.2) if active else None

    def phase(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def counter(self, phase: str):
        """A `fn(done, total)` that shows "phase done/total" as the running phase."""
        return lambda done, total: self.phase(f"{phase} {done}/{total}")

    def step_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str("")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self._tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLogger:
    """Writes `output_dir/metrics.jsonl` (one JSON object per step), TensorBoard events under
    `output_dir/tensorboard`, wandb when `wandb_project` is set, and a compact line to stdout."""

    def __init__(self, output_dir: str, *, tensorboard: bool = True, wandb_project: str | None = None,
                 run_config: dict | None = None, print_every: int = 1, resume: bool = False, write_line=None):
        os.makedirs(output_dir, exist_ok=True)
        self._write_line = write_line or (lambda line: print(line, file=sys.stdout, flush=True))
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = open(self.path, "a" if resume else "w")
        self.print_every = max(1, print_every)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb_project is set but wandb is not installed: "
                                  "pip install wandb") from e
            self._wandb = wandb.init(project=wandb_project, config=run_config or {}, dir=output_dir)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps > `step` (written after the checkpoint we resumed from)."""
        self._file.close()
        kept = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", -1) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if step % self.print_every == 0:
            parts = [f"step {step:>4d}"]
            for key, label, fmt in _LINE:
                if key in record and record[key] is not None:
                    parts.append(f"{label} {fmt.format(record[key])}")
            self._write_line(" | ".join(parts))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v
