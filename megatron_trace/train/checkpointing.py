"""Trainer checkpoints: Megatron distributed checkpoints of model + optimizer (+ teacher snapshot), RNG and
trainer state, written atomically.

Layout under the checkpoint dir:
    step_000010/            one complete checkpoint (a megatron dist checkpoint + our files)
        trainer_state.json  step, data position, lambda schedule position, exposure, teacher snapshot step
        rng_rank00000.pt    each rank's RNG states (torch, python, numpy, megatron's tracker)
    latest                  the name of the newest complete checkpoint (replaced atomically)
A checkpoint is written into `step_XXXXXX.tmp`, every rank finishes, then rank 0 renames it and updates
`latest`; a kill during the write leaves only a `.tmp` directory, which is ignored and removed by the next save.
Only the last `keep_last` checkpoints are kept. The distributed format is layout-independent, so a run can
resume at another TP/PP (the padded vocabulary permitting).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron_trace.models.qwen3 import unwrap_model

from megatron_trace.checkpoint import safe_pickle  # noqa: F401 - .metadata is read through an allowlist from here on
from megatron_trace.distributed import collectives

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "resolve_resume", "load_model_weights"]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        collectives.barrier()


def _rng_state() -> dict:
    """Every RNG state as tensors, tuples and numbers only, so it loads with `torch.load(weights_only=True)`."""
    from megatron.core import tensor_parallel

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _load_rng_state(path: str) -> dict:
    """An RNG file, read with weights_only=True (no code runs). Files of earlier versions hold the numpy state as
    an ndarray: those numpy classes (and only they) are allowed for them."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        pass
    from numpy._core.multiarray import _reconstruct

    with torch.serialization.safe_globals([np.ndarray, _reconstruct, np.dtype, type(np.dtype(np.uint32))]):
        try:
            return torch.load(path, weights_only=True)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: not an RNG state file of this trainer ({e})") from e


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model_chunks: list, optimizer, teacher_chunks: list | None, *, with_optimizer: bool,
                   loading: bool) -> dict:
    model_sd = unwrap_model(model_chunks[0]).sharded_state_dict()
    state = {"model": model_sd}
    if with_optimizer and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading)
    if teacher_chunks is not None:
        state["teacher"] = unwrap_model(teacher_chunks[0]).sharded_state_dict(prefix="teacher.")
    return state


_results_manager = None  # the manager behind megatron's write-results queue; kept so it lives as long as we do


def _manager_dies_with(parent_pid: int) -> None:
    """Initializer of the results manager's server process: SIGKILL it when its parent dies (it holds nothing
    worth flushing), and leave at once if the parent already died before the signal was armed."""
    import signal

    from megatron_trace.parent_death import die_with_parent

    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(0)


def _install_write_results_queue() -> None:
    """Give megatron's async filesystem writer a results queue whose manager process dies with this one.

    megatron's `filesystem_async._get_write_results_queue` otherwise creates, on the first save, a module-global
    queue from `mp.get_context("spawn").Manager()`: a server process nobody stops, which survives a `kill -9` of
    the trainer, reparented to init. We start the manager ourselves, with a parent-death signal, and set that
    global first. Forked, not spawned: a spawned child re-imports the parent's `__main__` (pytest's under the
    tests, where it fails), and megatron already forks its writer workers from this same process on every save;
    the manager's server runs only multiprocessing's own code, with no torch state. Called from the saving
    (main) thread, which lives as long as the trainer: PR_SET_PDEATHSIG fires when the forking *thread* exits."""
    global _results_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _results_manager is not None or filesystem_async._results_queue is not None:
        return
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=torch.multiprocessing.get_context("fork"))
    manager.start(initializer=_manager_dies_with, initargs=(os.getpid(),))
    _results_manager = manager
    filesystem_async._results_queue = manager.Queue()


def save_checkpoint(ckpt_root: str, step: int, model_chunks: list, optimizer, trainer_state: dict, *,
                    teacher_chunks: list | None = None, save_optimizer: bool = True, keep_last: int = 2,
                    hf_config: dict | None = None) -> str:
    """Write checkpoint `step` under `ckpt_root` atomically (collective). Returns its final path.

    With `hf_config`, the checkpoint also records the conversion metadata, so
    `tools/convert_checkpoint.py megatron-to-hf` turns it into a Hugging Face folder directly."""
    from megatron.core import dist_checkpointing

    name = f"step_{step:06d}"
    final = os.path.join(ckpt_root, name)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        for entry in os.listdir(ckpt_root):  # leftovers of interrupted writes
            if entry.endswith(".tmp"):
                shutil.rmtree(os.path.join(ckpt_root, entry), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    _install_write_results_queue()
    state = _sharded_state(model_chunks, optimizer, teacher_chunks, with_optimizer=save_optimizer, loading=False)
    dist_checkpointing.save(state, tmp, content_metadata=_conversion_metadata(model_chunks, hf_config))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{_rank():05d}.pt"))
    if _rank() == 0:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**trainer_state, "step": step, "has_optimizer": bool(save_optimizer),
                       "has_teacher": teacher_chunks is not None}, f, indent=1, sort_keys=True)
    _barrier()
    if _rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_latest(ckpt_root, name)
        _prune(ckpt_root, keep_last)
    _barrier()
    return final


def _prune(ckpt_root: str, keep_last: int) -> None:
    """Delete all but the `keep_last` newest complete checkpoints (0 = keep all), oldest first by step number;
    never the one `latest` names, whatever else the folder holds."""
    if keep_last <= 0:
        return
    newest = latest_checkpoint(ckpt_root)
    others = [c for _, c in _complete_checkpoints(ckpt_root) if c != newest]
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _conversion_metadata(model_chunks: list, hf_config: dict | None) -> dict | None:
    if hf_config is None:
        return None
    from megatron_trace.checkpoint.convert import CONVERSION_FORMAT, CONVERSION_VERSION

    gpt = unwrap_model(model_chunks[0])
    return {"format": CONVERSION_FORMAT, "version": CONVERSION_VERSION, "hf_config": dict(hf_config),
            "tensor_model_parallel_size": gpt.config.tensor_model_parallel_size,
            "pipeline_model_parallel_size": gpt.config.pipeline_model_parallel_size,
            "vocab_size": int(hf_config["vocab_size"]), "padded_vocab_size": int(gpt.vocab_size)}


def _write_latest(ckpt_root: str, name: str) -> None:
    tmp = os.path.join(ckpt_root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, os.path.join(ckpt_root, LATEST))


def _complete_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint folder (`step_N` holding the trainer state), by step."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for entry in os.listdir(ckpt_root):
        step = entry.removeprefix("step_")
        if entry.startswith("step_") and step.isdigit() and os.path.isfile(os.path.join(ckpt_root, entry, STATE_FILE)):
            found.append((int(step), os.path.join(ckpt_root, entry)))
    return sorted(found)


def latest_checkpoint(ckpt_root: str) -> str | None:
    """Path of the newest complete checkpoint under `ckpt_root`, or None: the one `latest` names, or, when that
    marker is missing or names no complete checkpoint, the complete `step_N` with the highest N."""
    marker = os.path.join(ckpt_root, LATEST)
    if os.path.isfile(marker):
        with open(marker) as f:
            path = os.path.join(ckpt_root, f.read().strip())
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    found = _complete_checkpoints(ckpt_root)
    if found:
        logger.warning("%s: no valid `latest` marker; using the newest complete checkpoint %s", ckpt_root,
                       found[-1][1])
        return found[-1][1]
    return None


def resolve_resume(resume: str, ckpt_root: str, *, overwrite: bool = False) -> str | None:
    """`auto` -> the latest checkpoint if any; `none` -> None; else the given path (must be complete).

    Never loses data: a run that would start fresh (or from an explicit path) in a folder holding checkpoints
    newer than its start raises ConfigError naming them, unless `overwrite` (checkpoint.overwrite: start fresh,
    or from the explicit path, removing those checkpoints on rank 0). Called before any model is built."""
    from megatron_trace.config_base import ConfigError

    if resume == "auto" and not overwrite:
        return latest_checkpoint(ckpt_root)
    if resume in ("auto", "none"):  # a fresh start (overwrite: whatever the folder holds is replaced)
        path, start = None, -1
    else:
        if not os.path.isfile(os.path.join(resume, STATE_FILE)):
            raise ConfigError(f"checkpoint.resume: {resume} is not a complete checkpoint (no {STATE_FILE})")
        with open(os.path.join(resume, STATE_FILE)) as f:
            path, start = resume, int(json.load(f)["step"])
    newer = [c for step, c in _complete_checkpoints(ckpt_root)
             if step > start and os.path.realpath(c) != os.path.realpath(path or "")]
    if newer and not overwrite:
        where = "a fresh run" if path is None else f"a run resuming from {path}"
        raise ConfigError(f"checkpoint.dir: {ckpt_root} holds checkpoints ({', '.join(map(os.path.basename, newer))}) "
                          f"that {where} would mix with or delete; resume them (checkpoint.resume=auto), use another "
                          "checkpoint.dir, or set checkpoint.overwrite=true to replace them")
    if overwrite and _rank() == 0:
        for c in newer:
            shutil.rmtree(c, ignore_errors=True)
        if path is None and os.path.isfile(os.path.join(ckpt_root, LATEST)):
            os.remove(os.path.join(ckpt_root, LATEST))
    _barrier()
    return path


def load_checkpoint(path: str, model_chunks: list, optimizer, *, teacher_chunks: list | None = None) -> dict:
    """Load a checkpoint written by `save_checkpoint` into the model (+ optimizer, teacher, RNG); collective.
    Returns the trainer state dict. Absent Transformer Engine `_extra_state` entries are tolerated, nothing else
    (checkpoint/tolerant_load.py)."""
    from megatron_trace.checkpoint.tolerant_load import dist_load, load_module_state

    with open(os.path.join(path, STATE_FILE)) as f:
        trainer_state = json.load(f)
    with_opt = trainer_state.get("has_optimizer", True) and optimizer is not None
    teacher = teacher_chunks if trainer_state.get("has_teacher") else None
    state = _sharded_state(model_chunks, optimizer, teacher, with_optimizer=with_opt, loading=True)
    loaded = dist_load(state, path)
    loaded.pop("content_metadata", None)
    load_module_state(unwrap_model(model_chunks[0]), loaded["model"], path)
    if with_opt:
        optimizer.load_state_dict(loaded["optimizer"])
    if teacher is not None:
        teacher_state = {k.removeprefix("teacher."): v for k, v in loaded["teacher"].items()}
        load_module_state(unwrap_model(teacher[0]), teacher_state, f"{path} (teacher)")
    rng_file = os.path.join(path, f"rng_rank{_rank():05d}.pt")
    if os.path.isfile(rng_file):  # absent when resuming with another world size: keep the fresh seeds
        _set_rng_state(_load_rng_state(rng_file))
    return trainer_state


def load_model_weights(path: str, model_chunks: list, hf_config: dict) -> None:
    """Initial weights from `path` (collective): a trainer checkpoint (model only) or a trainer checkpoint
    root (its `latest`), an HF folder (safetensors), or a Megatron checkpoint made by tools/convert_checkpoint.py."""
    from megatron_trace.checkpoint.convert import load_converted_checkpoint
    from megatron_trace.checkpoint.hf_mapping import load_hf_state_into_model

    if os.path.isfile(os.path.join(path, LATEST)):
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"model.load: {path} has a `latest` marker but no complete checkpoint")
        path = latest

    if os.path.isfile(os.path.join(path, STATE_FILE)):
        load_checkpoint_model_only(path, model_chunks)
    elif os.path.isfile(os.path.join(path, "config.json")):
        load_hf_state_into_model(unwrap_model(model_chunks[0]), path, hf_config)
    else:
        load_converted_checkpoint(unwrap_model(model_chunks[0]), path)


def load_checkpoint_model_only(path: str, model_chunks: list) -> None:
    """The policy weights of a trainer checkpoint (no optimizer, RNG or trainer state): a warm start."""
    from megatron_trace.checkpoint.tolerant_load import dist_load, load_module_state

    model_sd = unwrap_model(model_chunks[0]).sharded_state_dict()
    loaded = dist_load({"model": model_sd}, path)
    load_module_state(unwrap_model(model_chunks[0]), loaded["model"], path)
