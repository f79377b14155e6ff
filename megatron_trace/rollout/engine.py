"""The in-process vLLM generation engine: sample responses with raw log-probs, and take new weights in place.

This is the one generation engine (colocated mode: `vllm.LLM` in the trainer's process; the generation server
wraps the same class). vLLM is imported lazily, inside `VLLMEngine.__init__`, so code that only consumes
rollouts imports without it.

Side effects of building an engine in-process (vLLM's, documented here because they reach the whole process):
- env: `VLLM_ENABLE_V1_MULTIPROCESSING=0` (keep the engine core in this process so weight tensors pass by
  reference) is set before vLLM is imported; this module is the one place that sets vLLM env vars.
- On CPU vLLM replaces `torch.set_num_threads` process-wide with a no-op and binds OpenMP threads / sets a NUMA
  memory policy: call `torch.set_num_threads` BEFORE building the engine.
"""

from __future__ import annotations

import itertools
import json
import math
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from megatron_trace.rollout.config import EngineConfig
from megatron_trace.rollout.types import (
    Generation, ProgressFn, SamplingConfig, WeightBucket, WeightUpdateError, target_weight_version,
)

logger = logging.getLogger(__name__)


def _norm_metas(metas) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in metas]


class GenerationCancelled(RuntimeError):
    """A generate call was stopped before it finished: its caller cancelled it (a client that went away), its
    deadline passed (`timed_out`), or the engine is shutting down. Its requests were removed from vLLM."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


# vLLM seeds a torch.Generator with the per-request seed: it must fit a signed 64-bit integer.
MAX_SEED = 2**63


def checkpoint_tensor_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of every tensor in `model_dir`'s safetensors files (read from headers only)."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


class WeightValidator:
    """Checks a weight update against the model's HF checkpoint: known names, right shapes, float, complete.

    expected: name -> shape. A tied model's checkpoint has no `lm_head.weight`; one sent anyway is dropped
    (vLLM ignores it; the head reads the embedding).
    """

    def __init__(self, expected: dict[str, tuple[int, ...]], tied: bool, dtype: torch.dtype | None = None):
        self.expected = dict(expected)
        self.tied = tied
        self.dtype = dtype  # the serving dtype: a tensor of another one is refused (None: any float accepted)
        if tied:
            self.expected.pop("lm_head.weight", None)

    def check(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> bool:
        """True if the tensor should be loaded, False if it is to be dropped; raises WeightUpdateError if bad."""
        if self.tied and name == "lm_head.weight":
            return False
        want = self.expected.get(name)
        if want is None:
            raise WeightUpdateError(f"unknown weight {name!r}: not a tensor of this model's HF checkpoint")
        if tuple(shape) != want:
            raise WeightUpdateError(f"weight {name!r} has shape {tuple(shape)}, the model expects {want}")
        if not dtype.is_floating_point:
            raise WeightUpdateError(f"weight {name!r} has dtype {dtype}, expected a floating-point tensor")
        if self.dtype is not None and dtype != self.dtype:
            # vLLM would cast silently (bf16 into an fp32 engine moved log-probs by up to 0.72): the sender
            # converts, explicitly, or the engine is started with the trainer's dtype.
            raise WeightUpdateError(f"weight {name!r} has dtype {dtype}, the engine serves {self.dtype}: convert "
                                    f"on the sending side or start the engine with that dtype")
        return True

    @staticmethod
    def check_finite(name: str, tensor: torch.Tensor) -> None:
        """Raise WeightUpdateError if `tensor` holds a NaN or an infinity (it would poison every generate)."""
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise WeightUpdateError(f"weight {name!r} holds {bad} non-finite values (NaN/inf) of {tensor.numel()}")

    def check_complete(self, seen: set[str]) -> None:
        missing = sorted(set(self.expected) - seen)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise WeightUpdateError(
                f"weight update is missing {len(missing)} tensors, e.g. {missing[:5]}{more}: every update must "
                "carry the whole model (vLLM fuses q/k/v and gate/up, so partial layers would load garbage)"
            )


def _refresh_tied_head(worker) -> None:
    """Re-run the output head's weight processing so it repacks the (reloaded) shared embedding.

    Runs inside each vLLM worker. Why: vLLM's CPU linear kernels keep a packed copy of the head's weight; with
    tied embeddings a reload writes the embedding only, and the head would keep serving the old packed copy.
    """
    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def _finish_aborted_reload(worker) -> None:
    """Close vLLM's layer-wise reload after the weight stream raised, so a later reload starts clean.

    Runs inside each vLLM worker. Why: vLLM moves each layer's parameters to the meta device and wraps their
    loaders when a reload begins, and restores them only in its finalize step, which an exception skips.
    """
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
    finalize_layerwise_reload(model, worker.model_runner.model_config)


def _sampling_params(sampling: SamplingConfig):
    from vllm import SamplingParams

    if sampling.n < 1:
        raise ValueError(f"sampling.n={sampling.n} must be >= 1")
    if sampling.max_tokens < 1:
        raise ValueError(f"sampling.max_tokens={sampling.max_tokens} must be >= 1")
    if sampling.temperature < 0:
        raise ValueError(f"sampling.temperature={sampling.temperature} must be >= 0")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"sampling.top_p={sampling.top_p} must be in (0, 1]")
    if sampling.top_k == 0 or sampling.top_k < -1:
        raise ValueError(f"sampling.top_k={sampling.top_k}: use -1 (off) or a positive integer")
    if sampling.seed is not None and not 0 <= sampling.seed < MAX_SEED:
        raise ValueError(f"sampling.seed={sampling.seed} must be in [0, 2^63)")
    if not math.isfinite(sampling.temperature) or not math.isfinite(sampling.top_p):
        raise ValueError(f"sampling.temperature={sampling.temperature}, top_p={sampling.top_p}: must be finite")
    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens,
        stop_token_ids=list(sampling.stop_token_ids),
        seed=sampling.seed,
        # 0 = only the sampled token's log-prob; the raw (temperature-1) value thanks to logprobs_mode below.
        logprobs=0 if sampling.logprobs else None,
    )


class VLLMEngine:
    """A `vllm.LLM` in this process, with the weight-update, cache and version bookkeeping RL needs (a
    `GenerationEngine`).

    Thread-safe: generate / update_weights / sleep / wake_up are serialized by one lock, so an update never
    interleaves with a generate (a response is sampled from exactly one weight version).
    """

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.on_progress: ProgressFn | None = None  # one report when a generate call is done
        # The engine core must live in this process: weight tensors then reach the workers by reference
        # (through a process boundary vLLM cannot pickle them). vLLM reads its env vars lazily, at use.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM  # lazy: vLLM is an optional extra

        with open(os.path.join(cfg.model_dir, "config.json")) as f:
            hf_config = json.load(f)
        self.tied = bool(hf_config.get("tie_word_embeddings", False))
        # token ids must lie in [0, vocab_size) (None: a config without it; vLLM then checks the ids itself)
        self.vocab_size = int(hf_config["vocab_size"]) if hf_config.get("vocab_size") is not None else None
        self._validator = WeightValidator(checkpoint_tensor_shapes(cfg.model_dir), tied=self.tied,
                                          dtype=getattr(torch, cfg.dtype))
        from megatron_trace.rollout.platform import engine_platform_settings

        plat = engine_platform_settings(dtype=cfg.dtype, kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
                                        enable_sleep_mode=cfg.enable_sleep_mode)
        kv_bytes = plat.kv_cache_memory_bytes
        kwargs = dict(
            model=cfg.model_dir,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            tensor_parallel_size=cfg.tensor_parallel_size,
            seed=cfg.seed,
            enable_prefix_caching=cfg.enable_prefix_caching,
            # vLLM refuses sleep mode on CPU; there sleep()/wake_up() are accepted no-ops (see below)
            enable_sleep_mode=plat.vllm_sleep_mode,
            # log-probs of the sampled tokens under the unmodified model (temperature 1, no top-p/k),
            # comparable with the trainer's log-probs.
            logprobs_mode="raw_logprobs",
            # adds the NCCL weight-receiving methods to each worker (used on GPU only; inert on CPU)
            worker_extension_cls="megatron_trace.rollout.nccl_weights.WeightReceiverExtension",
        )
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        self._llm = LLM(**kwargs)
        # Streamed updates (shm / IPC) copy into the live weights where the engine allows (cpu_refit.py); False
        # forces vLLM's checkpoint-format reload (kept for comparison). last_refit: the in-place path's byte counts.
        self.refit_in_place = True
        self.last_refit: dict | None = None
        self._lock = threading.RLock()
        self._version = 0
        self._sleeping = False
        # Set when a streamed update failed after vLLM had taken some tensors: weights are a mix, refuse to serve.
        self._inconsistent: str | None = None
        # Set by a level-2 sleep (vLLM discards the weights; wake_up re-allocates them uninitialised): refuse to
        # serve until a complete update has been loaded.
        self._weights_discarded = False
        # The NCCL update announced and accepted by prepare_nccl_update, (version, metas), until its broadcast is
        # received; sleep() or another update cancels it (its broadcast is then drained and refused).
        self._nccl_pending: tuple[int, list] | None = None
        # The version a streamed (shm) or uncommitted NCCL update loaded, until commit_loaded_weights serves it.
        self._loaded_version: int | None = None
        # Watchdog state: monotonic time of the last engine step that returned (or of going busy), and whether a
        # generate is running. stalled_s() reads them without the lock.
        self._busy = False
        self._last_progress = time.monotonic()
        self._stopping = False

    # ---------------------------------------------------------------- generation
    @property
    def weight_version(self) -> int:
        """Version of the weights now serving: 0 = as loaded from model_dir, +1 per update (or the caller's)."""
        return self._version

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 cancel: threading.Event | None = None, deadline: float | None = None) -> list[list[Generation]]:
        """For each prompt (a list of token ids), `sampling.n` responses with their raw log-probs (nats).

        cancel: set it (from another thread) to stop the call; deadline: `time.monotonic()` by which it must end.
        Either raises GenerationCancelled, checked while waiting for the engine and between engine steps; the
        call's requests are then removed from vLLM, so nothing keeps the engine busy for a caller that left.
        """
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + sampling.max_tokens > self.cfg.max_model_len:
                raise ValueError(
                    f"prompt {i}: {len(p)} tokens + max_tokens {sampling.max_tokens} exceeds "
                    f"max_model_len {self.cfg.max_model_len}"
                )
            bad = [t for t in p if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        bad = [t for t in sampling.stop_token_ids
               if int(t) < 0 or (self.vocab_size is not None and int(t) >= self.vocab_size)]
        if bad:
            raise ValueError(f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        params = _sampling_params(sampling)
        self._acquire(cancel, deadline)
        try:
            self._check_serving()
            if not prompts:
                return []
            outputs = self._run([{"prompt_token_ids": p} for p in prompts], params, cancel, deadline)
            version = self._version
        finally:
            self._lock.release()
        results = []
        for out in outputs:
            gens = []
            for comp in sorted(out.outputs, key=lambda c: c.index):
                ids = list(comp.token_ids)
                lps: list[float] = []
                if sampling.logprobs:
                    # comp.logprobs[t] maps token id -> Logprob for step t; the sampled token is always present.
                    lps = [float(step[tok].logprob) for tok, step in zip(ids, comp.logprobs)]
                gens.append(Generation(ids, lps, comp.finish_reason or "length", weight_version=version))
            results.append(gens)
        if self.on_progress is not None:
            self.on_progress(len(prompts), len(prompts))
        return results

    def _acquire(self, cancel: threading.Event | None, deadline: float | None) -> None:
        """Take the engine lock, giving up (GenerationCancelled) when cancelled or past the deadline."""
        while not self._lock.acquire(timeout=0.2):
            self._raise_if_stopped(cancel, deadline, "waiting for the engine")

    def _raise_if_stopped(self, cancel: threading.Event | None, deadline: float | None, where: str) -> None:
        if self._stopping:
            raise GenerationCancelled(f"the engine is shutting down ({where})")
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled(f"cancelled by the caller ({where})")
        if deadline is not None and time.monotonic() > deadline:
            raise GenerationCancelled(f"deadline exceeded ({where})", timed_out=True)

    def _run(self, prompts: list[dict], params, cancel: threading.Event | None, deadline: float | None) -> list:
        """Add the requests and step vLLM until all finished (the lock held); returns vLLM's RequestOutputs in
        prompt order. On any exit but success every request in vLLM is aborted: a request vLLM half-added
        before raising (a seed >= 2^64 did) would otherwise leave it stepping forever, wedging every later call."""
        engine = self._llm.llm_engine
        self._abort_all()  # whatever an earlier failure left (nothing, normally)
        outputs = []
        ok = False
        self._busy, self._last_progress = True, time.monotonic()
        try:
            self._llm.enqueue(prompts, params, use_tqdm=False)
            while engine.has_unfinished_requests():
                self._raise_if_stopped(cancel, deadline, "generating")
                outputs.extend(o for o in engine.step() if o.finished)
                self._last_progress = time.monotonic()
            ok = True
        finally:
            self._busy = False
            if not ok:
                self._abort_all()
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return sorted(outputs, key=lambda o: int(o.request_id))  # vLLM numbers requests in the order added

    def _abort_all(self) -> None:
        """Remove every request from vLLM (the lock held: only this engine's calls add requests)."""
        engine = self._llm.llm_engine
        ids = list(engine.output_processor.request_states)
        if ids:
            logger.warning("aborting %d unfinished vLLM requests", len(ids))
            engine.abort_request(ids, internal=True)

    def stalled_s(self) -> float:
        """Seconds a running generate has gone without an engine step returning (0 when idle): the watchdog."""
        return time.monotonic() - self._last_progress if self._busy else 0.0

    def stop(self) -> None:
        """Make running and waiting generate calls end (GenerationCancelled) at their next check; for shutdown."""
        self._stopping = True

    def _check_serving(self) -> None:
        if self._sleeping:
            raise RuntimeError("the engine is asleep: call wake_up() before generate()")
        if self._weights_discarded:
            raise RuntimeError("the weights were discarded by a level-2 sleep: push a complete weight update "
                               "after wake_up() before generating")
        if self._inconsistent:
            raise RuntimeError(
                f"the last weight update failed part-way ({self._inconsistent}); weights are a mix of two "
                "versions: push a complete update before generating"
            )

    # ---------------------------------------------------------------- weights
    def check_weight(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> bool:
        """Check one tensor of an update (known name, shape, float); False = to be dropped (a tied model's head)."""
        return self._validator.check(name, shape, dtype)

    def check_finite(self, name: str, tensor: torch.Tensor) -> None:
        """Raise WeightUpdateError if the tensor holds NaN/inf."""
        self._validator.check_finite(name, tensor)

    def validate_weights(self, tensors: Iterable[tuple[str, Sequence[int], torch.dtype]]) -> None:
        """Check (name, shape, dtype) triples of a whole update without loading anything; raises WeightUpdateError."""
        seen = set()
        for name, shape, dtype in tensors:
            if name in seen:
                raise WeightUpdateError(f"weight {name!r} appears twice in one update")
            if self._validator.check(name, shape, dtype):
                seen.add(name)
        self._validator.check_complete(seen)

    def update_weights(self, buckets: Iterable[WeightBucket], version: int | None = None) -> int:
        """Load a complete set of HF-named tensors (in buckets) through vLLM's reload path; returns the new version.

        buckets: iterable of lists of (HF name, full tensor) covering every tensor of the checkpoint once.
        All buckets go into ONE vLLM reload (vLLM processes each layer once all its tensors arrived), then the
        tied head is repacked and the prefix cache reset (cached KV of old weights would be served silently).
        version: the version to report afterwards (must exceed the current one); default current + 1.
        With tensor_parallel_size > 1 vLLM runs its workers in other processes, which cannot receive tensors
        this way: use the NCCL path there (update_weights_from_nccl). Untested beyond TP=1 on CPU.
        Atomicity: if `buckets` is a list/tuple the whole update is validated before anything is loaded. A
        streamed iterator is validated tensor by tensor; a failure after loading began leaves the engine refusing
        to generate until a complete update succeeds.
        """
        new_version = target_weight_version(self._version, version)
        if isinstance(buckets, (list, tuple)):
            self.validate_weights((n, t.shape, t.dtype) for b in buckets for n, t in b)
            for b in buckets:
                for n, t in b:
                    self._validator.check_finite(n, t)
        with self._lock:
            if self._sleeping:
                raise RuntimeError("the engine is asleep: call wake_up() before update_weights()")
            self._cancel_nccl_pending("a weight update")
            seen: set[str] = set()
            started = False

            def stream() -> Iterator[tuple[str, torch.Tensor]]:
                nonlocal started
                for name, tensor in itertools.chain.from_iterable(buckets):
                    if name in seen:
                        raise WeightUpdateError(f"weight {name!r} appears twice in one update")
                    if not self._validator.check(name, tensor.shape, tensor.dtype):
                        continue
                    self._validator.check_finite(name, tensor)
                    seen.add(name)
                    started = True
                    yield name, tensor
                self._validator.check_complete(seen)

            return self._reload(
                lambda: self._llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": stream(), "is_checkpoint_format": True}),
                new_version, lambda: started)

    def _reload(self, run, new_version: int, started, *, commit: bool = True) -> int:
        """Run a reload (`run()`), then repack the tied head, reset the prefix cache and bump the version.
        commit=False: the weights are loaded but not served (generate refuses) until
        `commit_loaded_weights(new_version)`, as a streamed shm update is."""
        try:
            run()
            if self.tied:
                self._llm.collective_rpc(_refresh_tied_head)
        except Exception as e:
            if started():
                self._inconsistent = f"{type(e).__name__}: {e}"
                self._loaded_version = None
                self._llm.collective_rpc(_finish_aborted_reload)
            raise
        self._llm.reset_prefix_cache()
        if not commit:
            self._inconsistent = f"version {new_version} is loaded but not committed"
            self._loaded_version = new_version
            return new_version
        self._inconsistent = None
        self._weights_discarded = False
        self._loaded_version = None  # a loaded, uncommitted update is overwritten: it can no longer be committed
        self._version = new_version
        return new_version

    # ---------------------------------------------------------------- streamed, committed later (shm / IPC)
    def load_weights_stream(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load an update streamed tensor by tensor (HF names) without serving it: copied in place into the live
        weights where the engine allows (CPU: cpu_refit.py, one copy and the kernels' packing), else through vLLM's
        checkpoint-format reload. Either way the engine refuses to generate until `commit_loaded_weights(version)`
        (the driver commits every server of the run together). The caller validated the whole announcement first (`validate_announcement`); each
        tensor is checked again here. A failure part-way leaves the engine refusing to generate (weights are a
        mix) until a complete update is committed. Used by the shared-memory and CUDA IPC updates."""
        version = int(version)
        if version <= self._version:
            raise WeightUpdateError(f"target version {version} must exceed the serving version {self._version}")
        with self._lock:
            if self._sleeping:
                raise RuntimeError("the engine is asleep: call wake_up() before loading weights")
            self._inconsistent = f"an update to version {version} is being loaded"
            self._loaded_version = None
            seen: set[str] = set()

            def stream() -> Iterator[tuple[str, torch.Tensor]]:
                for name, tensor in tensors:
                    if name in seen:
                        raise WeightUpdateError(f"weight {name!r} appears twice in one update")
                    if not self._validator.check(name, tensor.shape, tensor.dtype):
                        continue
                    seen.add(name)
                    yield name, tensor
                self._validator.check_complete(seen)

            in_place = self.refit_in_place and self.refit_problem() is None
            try:
                if in_place:  # one copy into the live weights, only the packing redone (cpu_refit.py)
                    from megatron_trace.rollout.cpu_refit import refit_in_place

                    self.last_refit = self._llm.collective_rpc(refit_in_place, args=(stream(),))[0]
                else:
                    self._llm.collective_rpc(
                        "reload_weights", kwargs={"weights_iterator": stream(), "is_checkpoint_format": True})
                    if self.tied:
                        self._llm.collective_rpc(_refresh_tied_head)
                    self.last_refit = None
            except Exception as e:
                self._inconsistent = f"loading version {version} failed: {type(e).__name__}: {e}"
                if not in_place:
                    self._llm.collective_rpc(_finish_aborted_reload)
                raise
            self._llm.reset_prefix_cache()
            self._inconsistent = f"version {version} is loaded but not committed"
            self._loaded_version = version

    def refit_problem(self) -> str | None:
        """Why streamed updates cannot be copied in place into this engine (cpu_refit.py), or None; asked once."""
        if not hasattr(self, "_refit_problem"):
            if self.cfg.tensor_parallel_size != 1:
                self._refit_problem = f"tensor_parallel_size={self.cfg.tensor_parallel_size} (supported: 1)"
            else:
                from megatron_trace.rollout.cpu_refit import refit_plan_problem

                self._refit_problem = self._llm.collective_rpc(refit_plan_problem)[0]
            if self._refit_problem is not None:
                logger.info("streamed weight updates use vLLM's checkpoint-format reload: %s", self._refit_problem)
        return self._refit_problem

    def commit_loaded_weights(self, version: int) -> int:
        """Serve the version `load_weights_stream` (or `update_weights_from_nccl(commit=False)`) loaded; returns it."""
        with self._lock:
            if self._loaded_version != int(version):
                raise RuntimeError(f"commit of version {version}, but the loaded version is "
                                   f"{self._loaded_version}")
            self._version = int(version)
            self._loaded_version = None
            self._inconsistent = None
            self._weights_discarded = False  # a streamed update is complete (check_complete): the full reload
            return self._version

    # ---------------------------------------------------------------- NCCL fast path (GPU; untested here)
    def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Join the trainer's NCCL weight group (see nccl_weights.py); blocks until the trainer joins too."""
        self._llm.collective_rpc("init_weight_update_group",
                                 args=(master_address, int(master_port), int(rank_offset), int(world_size)))

    def validate_announcement(self, metas: Sequence[tuple[str, str, Sequence[int]]], version: int | None) -> int:
        """Check an NCCL update's announcement (names, dtype names, shapes) and target version; returns the version.
        Raises WeightUpdateError (a ValueError) when the update itself is bad."""
        from megatron_trace.rollout.nccl_weights import DTYPES

        new_version = target_weight_version(self._version, version)
        for name, dtype, _ in metas:
            if dtype not in DTYPES:
                raise WeightUpdateError(f"weight {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.validate_weights((n, tuple(s), DTYPES[d]) for n, d, s in metas)
        return new_version

    def prepare_nccl_update(self, metas: Sequence[tuple[str, str, Sequence[int]]], version: int | None) -> int:
        """Accept an NCCL update before its first byte moves: validate the announcement and the engine's state
        (awake), then remember it as the one update the next broadcast may carry; returns the target version.

        Every refusal happens here, while nothing has been broadcast: once the sender starts, a receiver that
        refuses would leave it blocked in NCCL. Raises WeightUpdateError (bad update) or RuntimeError (state).
        An engine left inconsistent by a failed update accepts it (a complete update is the repair).
        """
        with self._lock:
            if self._sleeping:
                raise RuntimeError("the engine is asleep: call wake_up() before an NCCL weight update")
            new_version = self.validate_announcement(metas, version)
            if self._nccl_pending is not None:
                logger.warning("NCCL update to version %d announced; dropping the unreceived announcement of "
                               "version %d", new_version, self._nccl_pending[0])
            self._nccl_pending = (new_version, _norm_metas(metas))
            return new_version

    def _cancel_nccl_pending(self, why: str) -> None:
        """Drop an announced, unreceived NCCL update: its broadcast, if it still comes, is drained and refused."""
        if self._nccl_pending is not None:
            logger.warning("%s cancels the announced NCCL update to version %d", why, self._nccl_pending[0])
            self._nccl_pending = None

    def cancel_nccl_update(self, why: str) -> None:
        """Drop the announced, unreceived NCCL update (its push was aborted): a later broadcast of it is refused."""
        with self._lock:
            self._cancel_nccl_pending(why)

    def drain_nccl_update(self, metas: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        """Receive a broadcast of `metas` and drop it, leaving the weights and any announced update alone (the
        server refused the transfer while its sender was already broadcasting: without receivers it would hang)."""
        metas = _norm_metas(metas)
        with self._lock:
            self._llm.collective_rpc("drain_weights_nccl", args=(metas,))

    def update_weights_from_nccl(
        self, metas: Sequence[tuple[str, str, Sequence[int]]], version: int | None = None, *, commit: bool = True
    ) -> int:
        """Receive the update accepted by `prepare_nccl_update` (same version and announcement), broadcast by
        trainer rank 0, through the same reload path as update_weights; returns the new version.

        Cannot be refused once prepared. An update that was not prepared is received and dropped (the sender is
        already broadcasting: leaving it without receivers would hang it), then refused.
        commit=False: loaded, not served, until `commit_loaded_weights(version)`: the trainer commits every server
        only once all of them received the update (one version across the run, or none).
        """
        metas = _norm_metas(metas)
        with self._lock:
            pending, self._nccl_pending = self._nccl_pending, None
            new_version = self._version + 1 if version is None else int(version)
            if pending != (new_version, metas):
                self._llm.collective_rpc("drain_weights_nccl", args=(metas,))
                what = "none" if pending is None else f"version {pending[0]} ({len(pending[1])} tensors)"
                raise RuntimeError(f"NCCL update to version {new_version} was not prepared (the prepared one is "
                                   f"{what}); its tensors were received and dropped: call prepare_nccl_update "
                                   "(POST /weights/nccl with validate_only) first")
            return self._reload(lambda: self._llm.collective_rpc("receive_weights_nccl", args=(metas,)),
                                new_version, lambda: True, commit=commit)

    def close_weight_group(self) -> None:
        """Leave the trainer's NCCL weight group (the trainer closes; a later init_weight_group forms a new one)."""
        with self._lock:
            self._cancel_nccl_pending("closing the weight group")
            self._llm.collective_rpc("close_weight_update_group")

    # ---------------------------------------------------------------- colocation
    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory for training: level 1 offloads weights to host memory, 2 discards them."""
        if not self.cfg.enable_sleep_mode:
            raise RuntimeError("sleep() needs EngineConfig(enable_sleep_mode=True) (a GPU feature of vLLM)")
        if level not in (1, 2):
            raise ValueError(f"sleep level={level}: expected 1 or 2")
        if not torch.cuda.is_available():  # colocated CPU runs: nothing to hand back, the state still counts
            with self._lock:
                self._sleeping = True
            logger.info("sleep(level=%d) accepted: CPU engine, no accelerator memory to free (costs nothing)", level)
            return
        with self._lock:
            self._cancel_nccl_pending("sleep()")
            if self._sleeping:
                return
            self._llm.sleep(level=level)
            self._sleeping = True
            if level == 2:  # vLLM drops the weights; wake_up gives back uninitialised memory
                self._weights_discarded = True

    def wake_up(self) -> None:
        """Re-allocate weights and KV cache after sleep(). After a level-2 sleep the weights are gone: generate
        refuses until a complete update (update_weights / update_weights_from_nccl) has been loaded."""
        if not self.cfg.enable_sleep_mode:
            raise RuntimeError("wake_up() needs EngineConfig(enable_sleep_mode=True) (a GPU feature of vLLM)")
        if not torch.cuda.is_available():
            with self._lock:
                self._sleeping = False
            logger.info("wake_up() accepted: CPU engine, nothing to re-allocate (costs nothing)")
            return
        with self._lock:
            if not self._sleeping:
                return
            self._llm.wake_up()
            self._llm.reset_prefix_cache()
            self._sleeping = False

    def close(self) -> None:
        """Release the engine (vLLM frees its memory when the LLM object goes away)."""
        with self._lock:
            llm, self._llm = getattr(self, "_llm", None), None
            if llm is not None:
                shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
                if shutdown is not None and hasattr(shutdown, "shutdown"):
                    shutdown.shutdown()
                del llm
