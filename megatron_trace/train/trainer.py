"""The TRACE trainer: one SPMD program under torchrun, every rank runs `Trainer(cfg).run()`.

A step (docs/design.md, "The step"):
    batch   = driver: rollout -> reward -> annotate -> route          (global rank 0, then broadcast)
    teacher = privileged forward on span rows                          (while lambda_k > 0)
    loss    = routed TRACE loss, forward/backward through the pipeline (Megatron schedule, TP/PP/DP)
    step    = Megatron optimizer step
    sync    = Megatron shards -> HF tensors -> generation engine       (weight bridge, in buckets)
    log     = metrics to stdout / JSONL / TensorBoard / wandb
`train.mode: sft` runs the supervised warm-start on the reference solutions instead (same model, optimizer,
checkpoints and logging).
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.distributed as dist

from megatron_trace.config import TraceConfig, load_run_tokenizer, to_dict, validate_run_config
from megatron_trace.distributed import collectives
from megatron_trace.loss.reductions import SUM, MeanOf, reduce_metrics
from megatron_trace.loss.trace_loss import ExposureTracker, TraceLoss
from megatron_trace.loss.vocab_parallel import token_stats
from megatron_trace.routes import Route
from megatron_trace.train.batching import RolloutBatch, Sample, make_step_batches
from megatron_trace.train.metrics import MetricsLogger, RunProgress, Timer
from megatron_trace.train.step import build_model_and_optimizer, forward_backward, optimizer_step, zero_grad
from megatron_trace.train.teacher_probe import probe_due, probe_teacher

__all__ = ["Trainer"]

# The supervised warm-start's token-mean NLL: its metrics and their reductions.
SFT_REDUCTIONS = {"tokens": SUM, "nll_sum": SUM, "entropy_sum": SUM, "loss": SUM,
                  "nll": MeanOf("nll_sum", "tokens"), "entropy": MeanOf("entropy_sum", "tokens")}


class _StepFailure:
    """What the driver broadcasts instead of a batch when its part of a step failed: every rank raises it."""

    def __init__(self, message: str):
        self.message = message


class Trainer:
    """Builds every component from `cfg` (collective: call on every rank). `start_rollout=False` leaves out the
    generation engine, reward workers and annotator (tests and benchmarks drive `update` with a given batch).

    Each builder registers what it started with `_closes`; `close()` releases everything in reverse order."""

    def __init__(self, cfg: TraceConfig, *, start_rollout: bool = True):
        self.cfg = cfg
        self._closers: list = []
        self.engine = None
        self.colocated = None  # rollout.placement colocated: this rank's part of the per-node servers
        self.nccl = None  # rollout.weight_sync nccl, driver: rank 0's end of the NCCL weight group (NcclPusher)
        self.experience = None
        self.logger = None
        self.layout = self._build_distributed()
        self.tokenizer = load_run_tokenizer(cfg)
        # Fails (naming the field) before any model is built.
        self.hf_config = validate_run_config(cfg, world_size=self.layout.world_size, tokenizer=self.tokenizer)
        self.is_driver = self.layout.rank == 0
        # Data (read once, file:line in every error) and the checkpoint folder, also before any model is built.
        self.problems = self._build_data()
        resume_from = self._resolve_resume()
        self._build_vocabulary()
        self.model, self.optimizer = self._build_model()
        self.loss = TraceLoss(cfg.loss)
        self.exposure = ExposureTracker()
        self.teacher = self._build_teacher()
        self.step, self.data_position = 0, 0
        self._resume(resume_from)
        self.progress, self.logger = self._build_logging(resume_from)
        self.timer = Timer(on_phase=self.progress.phase)
        if cfg.train.mode == "trace" and start_rollout:
            self.engine, self.experience = self._build_rollout()
            if cfg.rollout.external_urls:  # external servers start from other weights: push ours
                self.sync_weights()

    # ------------------------------------------------------------------------------------------------ builders

    def _closes(self, close) -> None:
        """Register `close` (no arguments) to run at `close()`, before everything registered earlier."""
        self._closers.append(close)

    def _build_distributed(self):
        from megatron_trace.distributed import destroy_distributed, initialize_distributed

        p, seed = self.cfg.parallel, self.cfg.train.seed
        layout = initialize_distributed(tp=p.tp, pp=p.pp, cp=p.cp, seed=seed)
        self._closes(destroy_distributed)
        random.seed(seed)
        np.random.seed(seed)
        return layout

    def _build_vocabulary(self) -> None:
        """The model's vocabulary on this TP rank, and the pad id of the sequences."""
        from megatron_trace.models.qwen3 import padded_vocab_size

        tp = self.cfg.parallel.tp
        self.vocab_size = int(self.hf_config["vocab_size"])
        self.padded_vocab = padded_vocab_size(self.vocab_size, tp)
        self.shard_width = self.padded_vocab // tp
        self.vocab_start = self.layout.tp_rank * self.shard_width
        # Padded vocabulary columns (Megatron pads to a multiple of 128 x tp) must take no probability mass:
        # the loss sees them at a logit of -1e9 (exp underflows to exactly 0; no inf, so no NaN in p log p).
        valid = max(0, min(self.shard_width, self.vocab_size - self.vocab_start))
        self.vocab_padding = None
        if valid < self.shard_width:
            self.vocab_padding = torch.arange(self.shard_width) >= valid
        pad = self.tokenizer.pad_token_id
        # Padding positions are never scored, but they are embedded: keep the id inside the model's vocabulary.
        self.pad_id = int(pad) if pad is not None and pad < self.vocab_size else 0

    def _build_model(self):
        """Model chunks and optimizer, from `model.load` or a seeded random init."""
        from megatron_trace.models.qwen3 import qwen3_transformer_config

        cfg, p, o = self.cfg, self.cfg.parallel, self.cfg.optim
        dtype = torch.bfloat16 if cfg.model.bf16 else torch.float32
        self.tcfg = qwen3_transformer_config(self.hf_config, tp=p.tp, pp=p.pp, cp=p.cp, params_dtype=dtype,
                                             bf16=cfg.model.bf16, recompute=cfg.model.recompute)
        lr = cfg.sft.lr if cfg.train.mode == "sft" else o.lr
        model, optimizer = build_model_and_optimizer(
            self.hf_config, self.tcfg, lr=lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
            use_distributed_optimizer=p.use_distributed_optimizer, bf16=cfg.model.bf16)
        if cfg.model.load:
            from megatron_trace.train.checkpointing import load_model_weights

            load_model_weights(cfg.model.load, model, self.hf_config)
            optimizer.reload_model_params()  # main (fp32) copies of the loaded params
        return model, optimizer

    def _build_teacher(self):
        """The privileged teacher (runs that distill only)."""
        if not (self.cfg.train.mode == "trace" and self.cfg.distills):
            return None
        from megatron_trace.models.qwen3 import build_qwen3_model
        from megatron_trace.train.teacher import Teacher

        t = self.cfg.teacher
        return Teacher(self.model, refresh_steps=t.refresh_steps, sparse_output=t.sparse_output,
                       build_snapshot=lambda: build_qwen3_model(self.hf_config, config=self.tcfg))

    def _build_data(self):
        """The problems, read once, each prompt counted in tokens against the room the run gives it (before any
        model is built: a problem too long for it would otherwise fail the run only when drawn)."""
        from megatron_trace.data.dataset import check_prompt_tokens, load_problems
        from megatron_trace.data.prompts import build_prompt_ids, privileged_messages, student_messages

        cfg = self.cfg
        problems = load_problems(cfg.data)
        thinking = cfg.rollout.enable_thinking

        def student(p):
            return build_prompt_ids(self.tokenizer, student_messages(p.problem), enable_thinking=thinking)

        if cfg.train.mode == "sft":  # a prompt must leave at least one target token within sft.max_seq_len
            check_prompt_tokens(problems, student, cfg.sft.max_seq_len - 1,
                                f"tokens a prompt may take (sft.max_seq_len={cfg.sft.max_seq_len} - 1)")
            if cfg.sft.privileged_format:
                check_prompt_tokens(
                    problems, lambda p: build_prompt_ids(self.tokenizer, privileged_messages(p.problem, p.solution),
                                                         enable_thinking=thinking),
                    cfg.sft.max_seq_len - 1, f"tokens a privileged prompt may take (sft.max_seq_len="
                                             f"{cfg.sft.max_seq_len} - 1, sft.privileged_format)")
        else:  # the generation engine refuses prompt + max_tokens > max_model_len
            r = cfg.rollout
            check_prompt_tokens(problems, student, r.max_model_len - r.max_response_tokens,
                                f"tokens a prompt may take (rollout.max_model_len={r.max_model_len} - "
                                f"rollout.max_response_tokens={r.max_response_tokens})")
        return problems

    def _resolve_resume(self) -> str | None:
        """The checkpoint to resume from (None: a fresh start), checked before any model is built: a fresh start
        refuses a checkpoint folder holding another run's checkpoints unless checkpoint.overwrite."""
        from megatron_trace.train.checkpointing import resolve_resume

        ckpt = self.cfg.checkpoint
        return resolve_resume(ckpt.resume, self.cfg.checkpoint_dir, overwrite=ckpt.overwrite)

    def _resume(self, resume_from: str | None) -> None:
        """Load checkpoint `resume_from` (if any) into every component."""
        if resume_from:
            from megatron_trace.train.checkpointing import load_checkpoint

            self.load_state_dict(load_checkpoint(resume_from, self.model, self.optimizer,
                                                 teacher_chunks=self.teacher.snapshot if self.teacher else None))

    def _build_logging(self, resume_from: str | None):
        """The progress bar (every rank; drawn on the driver) and the metrics logger (driver only)."""
        cfg, p = self.cfg, self.cfg.parallel
        progress = RunProgress(cfg.train.steps, initial=self.step, desc=cfg.train.mode,
                               enabled=self.is_driver and cfg.logging.progress)
        self._closes(progress.close)
        if not self.is_driver:
            return progress, None
        logger = MetricsLogger(cfg.logging.output_dir, tensorboard=cfg.logging.tensorboard,
                               wandb_project=cfg.logging.wandb_project, run_config=to_dict(cfg),
                               print_every=cfg.logging.print_every,
                               # metrics.jsonl is appended to, never truncated, unless overwriting
                               resume=resume_from is not None or not cfg.checkpoint.overwrite,
                               write_line=progress.write)
        self._closes(logger.close)
        if resume_from is not None:
            logger.truncate_after(self.step - 1)
        print(f"[megatron-trace] {cfg.train.mode} run: world {self.layout.world_size} = tp {p.tp} x pp {p.pp} "
              f"x cp {p.cp} x dp {self.layout.dp}; {len(self.problems)} problems; "
              f"{'resuming from ' + resume_from if resume_from else 'fresh start'} at step {self.step}",
              flush=True)
        return progress, logger

    def _build_rollout(self):
        """Driver: the generation engine (started from the current weights), reward workers and annotator, as an
        ExperienceMaker. Other ranks take part in the weight export the engine start may need and get (None,
        None)."""
        from megatron_trace.rollout.launch import start_engine

        cfg = self.cfg
        if cfg.rollout.placement == "colocated":
            from megatron_trace.rollout.colocated import ColocatedServers

            # every node starts its own servers (collective); the driver drives them all as one pool
            self.colocated = ColocatedServers.start(cfg, self._export_rollout_model)
            self._closes(self.colocated.close)  # the driver's pool, and the servers this rank owns
            if not self.is_driver:
                return None, None
            engine = self.colocated.pool
        elif not self.is_driver:
            start_engine(cfg, self._export_rollout_model, driver=False)
            return None, None
        else:
            engine = start_engine(cfg, self._export_rollout_model)
            self._closes(engine.close)
            self._build_weight_sync(engine)
        engine.on_progress = self.progress.counter("rollout")

        from megatron_trace.annotate.config import build_annotator
        from megatron_trace.rewards.batch import RewardScorer
        from megatron_trace.train.experience import ExperienceMaker

        scorer = RewardScorer(cfg.reward.name, workers=cfg.reward.workers)
        annotator = build_annotator(cfg.annotate, engine=engine, tokenizer=self.tokenizer,
                                    max_model_len=cfg.rollout.max_model_len) if cfg.distills else None
        experience = ExperienceMaker(cfg, self.tokenizer, engine, scorer, annotator)
        self._closes(experience.close)
        if annotator is not None:
            annotator.on_progress = self.progress.counter("annotate")
        return engine, experience

    def _build_weight_sync(self, engine) -> None:
        """Driver, `rollout.weight_transport` nccl: form the NCCL weight group with every server of `engine`, once
        per run (left again in close(), before the engine stops). Other transports need no set-up."""
        if self.cfg.rollout.weight_transport != "nccl":
            return
        import socket

        from megatron_trace.distributed.setup import free_ports
        from megatron_trace.sync.nccl_push import NcclPusher, clients_of

        r = self.cfg.rollout
        clients, names = clients_of(engine)
        # Servers beside rank 0 reach it on loopback; external ones at the address this host is known by.
        address = (r.advertise_host or socket.getfqdn()) if r.external_urls else "127.0.0.1"
        # Rank 0 broadcasts from the device its collectives use (its CUDA device under NCCL).
        self.nccl = NcclPusher(clients, names=names, workers_per_server=r.tensor_parallel_size,
                               master_address=address, master_port=free_ports(1)[0],
                               device=collectives.comm_device() or torch.device("cpu"))
        self._closes(self.nccl.close)
        self.nccl.init()

    # ------------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The trainer's own state beside the model and optimizer: data position, exposure, teacher snapshot."""
        return {"data_position": self.data_position, "exposure": self.exposure.state_dict(),
                "kl_weight_next": self.kl_weight(self.step),
                "teacher_snapshot_step": self.teacher.snapshot_step if self.teacher else None,
                "mode": self.cfg.train.mode}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.exposure.load_state_dict(state["exposure"])
        if self.teacher is not None:
            self.teacher.snapshot_step = state.get("teacher_snapshot_step")

    def _export_rollout_model(self, out_dir: str) -> None:
        """Collective: write the current policy as an HF folder (config, safetensors, tokenizer) for the
        generation engine to start from."""
        from megatron_trace.sync.hf_export import save_hf_folder

        save_hf_folder(self.model[0], self.hf_config, out_dir, tokenizer=self.tokenizer,
                       bucket_bytes=int(self.cfg.rollout.weight_bucket_mb * 2**20))

    # ------------------------------------------------------------------------------------------------ data

    def _next_problems(self, n: int):
        """The next n problems of a seeded per-epoch shuffle; position survives resume."""
        out = []
        for _ in range(n):
            epoch, index = divmod(self.data_position, len(self.problems))
            order = np.random.default_rng(self.cfg.train.seed + epoch).permutation(len(self.problems))
            out.append(self.problems[int(order[index])])
            self.data_position += 1
        return out

    # ------------------------------------------------------------------------------------------------ steps

    def run(self) -> None:
        """Train to `train.steps`, then release everything (engine, workers, process groups)."""
        try:
            self.train()
        finally:
            self.close()

    def train(self) -> None:
        """The step loop: log every step, checkpoint every `save_every` steps and at the end."""
        cfg = self.cfg
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            metrics = self.sft_step() if cfg.train.mode == "sft" else self.trace_step()
            metrics["time/step"] = time.perf_counter() - t0
            if metrics.get("tokens_generated"):
                metrics["tokens_per_s"] = metrics["tokens_generated"] / metrics["time/step"]
            elif metrics.get("tokens"):
                metrics["tokens_per_s"] = metrics["tokens"] / metrics["time/step"]
            if self.logger is not None:
                self.logger.log(self.step, metrics)
            self.progress.step_done()
            self.step += 1
            every = cfg.checkpoint.save_every
            if (every and self.step % every == 0) or self.step == cfg.train.steps:
                self.save()

    def save(self) -> str:
        from megatron_trace.train.checkpointing import save_checkpoint

        return save_checkpoint(self.cfg.checkpoint_dir, self.step, self.model, self.optimizer, self.state_dict(),
                               teacher_chunks=self.teacher.snapshot if self.teacher else None,
                               save_optimizer=self.cfg.checkpoint.save_optimizer,
                               keep_last=self.cfg.checkpoint.keep_last, hf_config=self.hf_config)

    def _broadcast(self, obj):
        box = [obj]
        collectives.broadcast_object_list(box, src=0)
        return box[0]

    def kl_weight(self, step: int) -> float:
        return self.cfg.loss.kl_weight(step) if self.cfg.distills else 0.0

    def trace_step(self) -> dict:
        cfg = self.cfg
        step = self.step
        kl_weight = self.kl_weight(step)
        batch = None
        if self.is_driver:
            try:
                with self.timer("rollout"):
                    if self.colocated is not None:
                        self.colocated.wake_up()
                    problems = self._next_problems(cfg.rollout.prompts_per_step)
                    batch = self.experience.make(problems, step=step, kl_weight=kl_weight, timer=self.timer,
                                                 next_problems=self._next_problems)
                    batch.data_position = self.data_position
                if probe_due(cfg.teacher.probe_every, step):
                    with self.timer("probe"):  # same weights as the rollouts: before this step's update
                        batch.metrics.update(probe_teacher(self.experience, problems, step=step))
                if self.colocated is not None and batch.samples:  # (no update follows an empty batch)
                    with self.timer("sleep"):
                        self.colocated.sleep()  # hand the GPUs' memory to training
            except Exception as e:  # noqa: BLE001 - every rank stops with it (not left waiting in the broadcast)
                batch = _StepFailure(f"step {step}: rollout failed: {type(e).__name__}: {e}")
        batch: RolloutBatch = self._broadcast(batch)
        if isinstance(batch, _StepFailure):
            raise RuntimeError(batch.message)
        self.data_position = batch.data_position
        metrics = dict(batch.metrics)
        metrics["lambda"] = kl_weight
        metrics["tokens_generated"] = float(sum(len(s.response_ids) for s in batch.samples))
        if batch.samples:
            metrics.update(self.update(batch.samples, kl_weight))
            with self.timer("sync"):
                self.sync_weights()
        else:
            metrics["skipped_update"] = 1.0  # dynamic sampling left nothing to learn from
        metrics["exposure"] = self.exposure.value
        metrics.update(self.timer.pop())
        metrics["time/rollout"] = metrics.get("time/rollout", 0.0) - sum(
            metrics.get(f"time/{k}", 0.0) for k in ("reward", "annotate"))
        return metrics

    def update(self, samples: list[Sample], kl_weight: float) -> dict:
        """The optimizer steps of one rollout batch (collective; every rank passes the same global `samples`).

        optim.global_batch_size 0 and epochs 1: one step, log p_old = this forward's log-prob, detached (ratio 1).
        Otherwise the batch is split into mini-batches (train.minibatch); before the first step one no-grad
        forward per mini-batch gives log p_old (rollout.recompute_old_logprobs; else the sampler's), then each
        epoch takes one optimizer step per mini-batch (teacher pass, routed loss, step), so from the second step
        on the ratio differs from 1 and the PPO clip acts. Returns global metrics, `optimizer_steps` included.
        """
        from megatron_trace.train.minibatch import combine_step_metrics, minibatch_indices

        o = self.cfg.optim
        parts = minibatch_indices(len(samples), o.global_batch_size, seed=self.cfg.train.seed * 7_919 + self.step)
        if len(parts) == 1 and o.epochs == 1:
            metrics = self._step_minibatch(self._prepare_minibatch(samples, kl_weight), kl_weight)
            metrics["optimizer_steps"] = 1.0
        else:
            prepared = [self._prepare_minibatch([samples[i] for i in part], kl_weight) for part in parts]
            if self.cfg.rollout.recompute_old_logprobs:
                with self.timer("old_logprobs"):
                    for prep in prepared:
                        self._store_old_logprobs(prep)
            steps = [self._step_minibatch(prep, kl_weight) for _ in range(o.epochs) for prep in prepared]
            metrics = combine_step_metrics(steps, TraceLoss.reductions, epochs=o.epochs)
            for key in ("padding_frac", "teacher_padding_frac", "microbatches"):  # per optimizer step: the mean
                if all(key in m for m in steps):
                    metrics[key] = sum(m[key] for m in steps) / len(steps)
        # one exposure update per rollout batch (lambda_k is a per-rollout-step quantity)
        if metrics["tokens"] > 0:
            self.exposure.update(kl_weight if metrics["kl_active"] else 0.0, metrics["span_tokens"],
                                 metrics["tokens"])
        return metrics

    def _prepare_minibatch(self, samples: list[Sample], kl_weight: float) -> dict:
        """This rank's micro-batches of one mini-batch plus what its steps need (global counts, lengths)."""
        cfg = self.cfg
        lay = self.layout
        with_teacher = self.teacher is not None and kl_weight > 0 and any(s.num_kl_rows for s in samples)
        batches = make_step_batches(samples, dp_size=lay.dp, dp_rank=lay.dp_rank,
                                    micro_batch_size=cfg.optim.micro_batch_size,
                                    max_tokens_per_microbatch=cfg.optim.max_tokens_per_microbatch,
                                    with_teacher=with_teacher, pad_id=self.pad_id, fixed_row_length=lay.pp > 1)
        return {"mbs": batches.microbatches, "seq_length": batches.seq_length,
                "teacher_seq": batches.teacher_seq_length, "micro_batch_size": batches.micro_batch_size,
                "stats": batches.stats, "with_teacher": with_teacher,
                "num_tokens": float(sum(len(s.response_ids) for s in samples)),
                "num_responses": float(len(samples))}

    def _store_old_logprobs(self, prep: dict) -> None:
        """No-grad forward of the current (pre-update) weights: mb["old_logprobs"] [T] on each micro-batch of
        the last pipeline stage (the only one that computes the loss)."""
        tp_group = self.layout.tp_group() if self.layout.tp > 1 else None

        def logprobs(logits: torch.Tensor, mb: dict):
            rows = mb["rows"]
            if rows.numel() == 0:
                return logits.sum() * 0.0, logits.new_zeros(0)
            stats = token_stats(self._rows(logits, rows), mb["targets"], vocab_start=self.vocab_start,
                                group=tp_group, kernels=self.cfg.loss.kernels)
            return logits.sum() * 0.0, stats.logprob.detach().float().cpu()

        with torch.no_grad():
            out = forward_backward(self.model, prep["mbs"], logprobs, seq_length=prep["seq_length"],
                                   micro_batch_size=prep["micro_batch_size"], forward_only=True)
        for mb, lp in zip(prep["mbs"], out):
            mb["old_logprobs"] = lp

    def _step_minibatch(self, prep: dict, kl_weight: float) -> dict:
        """Teacher pass (if any span), routed loss forward/backward and one optimizer step on a prepared
        mini-batch. Returns global metrics."""
        cfg = self.cfg
        mbs, seq_length, teacher_seq = prep["mbs"], prep["seq_length"], prep["teacher_seq"]
        micro_batch_size = prep["micro_batch_size"]
        with_teacher = prep["with_teacher"]
        prepare = None
        if with_teacher:
            self.teacher.maybe_refresh(self.step)

            def prepare(group: list[dict]) -> None:
                with self.timer("teacher"):
                    if cfg.loss.fused_output_layer:  # hidden rows + output weight; the loss makes the logits
                        for mb, out in zip(group, self.teacher.hidden_rows(
                                group, micro_batch_size=micro_batch_size, seq_length=teacher_seq)):
                            if out is not None:
                                mb["teacher_hidden"], mb["teacher_weight"] = out
                        return
                    for mb, logits in zip(group, self.teacher.logits(
                            group, micro_batch_size=micro_batch_size, seq_length=teacher_seq)):
                        if logits is not None:
                            mb["teacher_logits"] = self._mask_vocab_padding(logits)
        if cfg.loss.check_values:
            self._check_loss_inputs(mbs, kl_weight if with_teacher else 0.0, with_teacher)
        loss_fn = self._routed_loss_fn(kl_weight if with_teacher else 0.0, with_teacher, prep["num_tokens"],
                                       prep["num_responses"])
        metrics = self._forward_backward_step(mbs, loss_fn, TraceLoss.reductions, seq_length, prepare=prepare,
                                              group_size=cfg.teacher.microbatches_per_pass,
                                              micro_batch_size=micro_batch_size)
        metrics["kl_active"] = 1.0 if with_teacher else 0.0
        metrics.update(prep["stats"])  # padding_frac, microbatches (train/batching.py)
        return metrics

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_padding is None:
            return logits
        return logits.masked_fill(self.vocab_padding.to(logits.device), -1e9)

    def _rows(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Student logits of the response rows with vocabulary padding masked: [T, vocab/tp]."""
        return self._mask_vocab_padding(logits.reshape(-1, logits.shape[-1]).index_select(0, rows))

    def _token_stats(self, output: torch.Tensor, mb: dict, tp_group, *, use_kl: bool = False,
                     kl_clip: float | None = None):
        """token_stats of the micro-batch's response rows (and its teacher rows with use_kl). output: the model's
        logits [b, s, vocab/tp], or under loss.fused_output_layer its hidden states [b, s, H] (the output layer then
        runs inside the loss; see train/output_layer.py)."""
        kl = dict(kl_rows=mb["kl_rows"], kl_reverse=mb["kl_reverse"], kl_clip=kl_clip) if use_kl else {}
        if not self.cfg.loss.fused_output_layer:
            teacher = dict(teacher_logits=mb["teacher_logits"], **kl) if use_kl else {}
            return token_stats(self._rows(output, mb["rows"]), mb["targets"], vocab_start=self.vocab_start,
                               group=tp_group, kernels=self.cfg.loss.kernels, **teacher)
        from megatron_trace.loss.fused_output import fused_output_token_stats
        from megatron_trace.train.output_layer import OUTPUT_WEIGHT

        hidden = output.reshape(-1, output.shape[-1]).index_select(0, mb["rows"])
        teacher = dict(teacher_hidden=mb["teacher_hidden"], teacher_weight=mb["teacher_weight"], **kl) if use_kl \
            else {}
        return fused_output_token_stats(hidden, mb[OUTPUT_WEIGHT], mb["targets"], vocab_start=self.vocab_start,
                                        group=tp_group, vocab_size=self.vocab_size, kernels=self.cfg.loss.kernels,
                                        **teacher)

    def _output_context(self):
        """The model_context of forward_backward: under loss.fused_output_layer the model returns hidden states."""
        if not self.cfg.loss.fused_output_layer:
            return None
        from megatron_trace.train.output_layer import output_hidden_states

        return output_hidden_states

    def _routed_loss_fn(self, kl_weight: float, with_teacher: bool, num_tokens: float, num_responses: float):
        tp_group = self.layout.tp_group() if self.layout.tp > 1 else None
        recompute_old = self.cfg.rollout.recompute_old_logprobs
        kl_clip = self.cfg.loss.kl_clip
        fused = self.cfg.loss.fused_output_layer
        grad_in_forward = fused and self.cfg.loss.fused_output_grad == "in_forward"

        def loss_fn(logits: torch.Tensor, mb: dict):
            rows = mb["rows"]
            if rows.numel() == 0:  # a padding micro-batch
                return logits.sum() * 0.0, {}
            teacher = mb.get("teacher_hidden" if fused else "teacher_logits") if with_teacher else None
            use_kl = teacher is not None and mb["kl_rows"].numel() > 0
            # One update per rollout batch: the trainer's recomputed log p_old is this very forward's log-prob
            # under unchanged weights, detached (old None; no second pass needed); with several optimizer steps
            # per batch, log p_old comes from the no-grad forward before the first.
            if "old_logprobs" in mb:
                old = mb["old_logprobs"]
            else:
                old = None if recompute_old else mb["sampler_logprobs"]
            routes = mb["routes"] if use_kl else torch.full_like(mb["routes"], int(Route.PG))
            kl_rows = mb["kl_rows"] if use_kl else mb["kl_rows"][:0]
            # value checks run once per step (loss.check_values), not here: no host sync per micro-batch
            loss_rows = self.loss.rows(num_rows=rows.numel(), old_logprob=old, advantages=mb["advantages"],
                                       routes=routes, response_index=mb["response_index"],
                                       response_lengths=mb["response_lengths"],
                                       loss_mask=torch.ones(rows.numel(), device=rows.device), kl_rows=kl_rows,
                                       kl_weight=kl_weight, num_tokens=num_tokens, num_responses=num_responses,
                                       sampler_logprob=mb["sampler_logprobs"], check_values=False)
            if grad_in_forward:
                loss, stats = self._fused_output_loss(logits, mb, tp_group, loss_rows, use_kl=use_kl,
                                                      kl_clip=kl_clip)
                return loss, loss_rows.loss(stats)[1]  # the metrics of the (detached) statistics
            stats = self._token_stats(logits, mb, tp_group, use_kl=use_kl, kl_clip=kl_clip)
            return loss_rows.loss(stats)

        return loss_fn

    def _fused_output_loss(self, hidden: torch.Tensor, mb: dict, tp_group, loss_rows, *, use_kl: bool,
                           kl_clip: float | None):
        """loss.fused_output_grad in_forward: (loss, token statistics) of the micro-batch's response rows, with the
        output layer, the statistics and the routed loss's gradient in one forward pass (fused_output_loss)."""
        from megatron_trace.loss.fused_output import fused_output_loss
        from megatron_trace.train.output_layer import OUTPUT_WEIGHT

        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb["rows"])
        teacher = dict(teacher_hidden=mb["teacher_hidden"], teacher_weight=mb["teacher_weight"],
                       kl_rows=mb["kl_rows"], kl_reverse=mb["kl_reverse"], kl_clip=kl_clip) if use_kl else {}
        return fused_output_loss(rows, mb[OUTPUT_WEIGHT], mb["targets"], loss_rows.row_loss(),
                                 vocab_start=self.vocab_start, group=tp_group, vocab_size=self.vocab_size,
                                 kernels=self.cfg.loss.kernels, **teacher)

    def _check_loss_inputs(self, mbs: list[dict], kl_weight: float, with_teacher: bool) -> None:
        """loss.check_values: the value checks of every micro-batch's loss inputs, once per step before the
        micro-batch loop (they read tensor values on the host, which the loop itself never does)."""
        from megatron_trace.loss.vocab_parallel import check_token_stats_values

        for i, mb in enumerate(mbs):
            rows = mb["rows"].numel()
            if rows == 0:
                continue
            kl_rows = mb["kl_rows"] if with_teacher else mb["kl_rows"][:0]
            routes = mb["routes"] if with_teacher else torch.full_like(mb["routes"], int(Route.PG))
            try:
                check_token_stats_values(mb["targets"], self.vocab_size, kl_rows, rows)
                in_response = torch.ones(rows, dtype=torch.bool, device=mb["rows"].device)
                span = (routes == int(Route.FKL)) | (routes == int(Route.RKL))
                if self.cfg.loss.mode == "grpo":
                    span = torch.zeros_like(span)
                self.loss.check_values(routes=routes, response_index=mb["response_index"],
                                       response_lengths=mb["response_lengths"], in_response=in_response, span=span,
                                       kl_rows=kl_rows, kl_weight=kl_weight)
            except ValueError as e:
                raise ValueError(f"step {self.step}, micro-batch {i} (loss.check_values): {e}") from e

    def _forward_backward_step(self, mbs: list[dict], loss_fn, reductions: dict, seq_length: int, *,
                               micro_batch_size: int, prepare=None, group_size: int = 0) -> dict:
        """Zero grads, forward/backward over `mbs`, optimizer step; returns the loss's metrics reduced as
        `reductions` declares (megatron_trace.loss.reductions), plus grad_norm and update_skipped.

        With `prepare` (the teacher pass), micro-batches go in groups of `group_size` (0 = all at once): each
        group gets its teacher logits, then its student forward/backward, then drops the teacher logits, so at
        most one group's `[rows, vocab/tp]` teacher logits are alive. Gradients accumulate across the groups;
        megatron's finalize (the DP all-reduce) runs after the last group only.
        """
        zero_grad(self.model, self.optimizer)
        size = group_size if (prepare is not None and group_size > 0) else len(mbs)
        groups = [mbs[i:i + size] for i in range(0, len(mbs), size)]
        out = []
        for index, group in enumerate(groups):
            if prepare is not None:
                prepare(group)
            with self.timer("train"):
                out += forward_backward(self.model, group, loss_fn, seq_length=seq_length,
                                        micro_batch_size=micro_batch_size,
                                        finalize_grads=index == len(groups) - 1,
                                        model_context=self._output_context())
            for mb in group:
                for key in ("teacher_logits", "teacher_hidden", "teacher_weight"):
                    mb.pop(key, None)
        with self.timer("train"):
            ok, grad_norm, _ = optimizer_step(self.optimizer)
        # The loss is computed on the last pipeline stage, identically on its TP ranks: TP rank 0 of the last
        # stage contributes, so each micro-batch counts once.
        metrics = reduce_metrics(out, reductions, contribute=self.layout.is_last_stage and self.layout.tp_rank == 0)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_skipped"] = 0.0 if ok else 1.0
        return metrics

    def sync_weights(self) -> None:
        """Push the updated policy into the generation engine (collective; the driver talks to the engine;
        colocated: every node refreshes its own servers, the driver commits them all). The transport is
        `rollout.weight_transport` (what `rollout.weight_sync` resolved to): shm (colocated), nccl, http or
        in process."""
        from megatron_trace.sync.weight_bridge import export_hf_buckets

        bucket_bytes = int(self.cfg.rollout.weight_bucket_mb * 2**20)
        if self.colocated is not None:
            from megatron_trace.sync.shm_push import announce_model
            from megatron_trace.sync.weight_bridge import params_dtype_of

            announce = announce_model(self.hf_config, params_dtype_of(self.model[0]))
            leader = self._shm_direct_leader()
            if leader is None:  # the bridge gathers each parameter onto the node's leader
                self.colocated.sync(lambda dsts: export_hf_buckets(self.model[0], self.hf_config,
                                                                   bucket_bytes=bucket_bytes, dsts=dsts), announce)
                return
            from megatron_trace.sync.shm_direct import write_buckets

            if not hasattr(self, "_shm_mappings"):
                self._shm_mappings: dict = {}  # the node's segments stay mapped from one refresh to the next

            def direct(dsts):  # every rank of the leader's TP group writes its own shards into the node's segments
                if leader < 0:
                    return iter(())
                acquire = self.colocated.pusher.acquire if self.layout.rank == leader else None
                return write_buckets(self.model[0], self.hf_config, bucket_bytes=bucket_bytes,
                                     group=self.layout.tp_group(), leader=leader, acquire=acquire,
                                     tp_rank=self.layout.tp_rank, tp_size=self.layout.tp,
                                     mappings=self._shm_mappings)

            self.colocated.sync(direct, announce, written=True)
            return
        if self.cfg.rollout.weight_transport == "nccl":
            self._sync_weights_nccl(bucket_bytes)
            return
        buckets = export_hf_buckets(self.model[0], self.hf_config, bucket_bytes=bucket_bytes, dst=0)
        if self.is_driver:
            self.engine.update_weights(buckets)
        else:
            for _ in buckets:
                pass

    def _shm_direct_leader(self) -> int | None:
        """Whether the colocated refresh can skip the gather (sync/shm_direct.py), the same answer on every rank:
        None when it cannot (pipeline or context parallelism, GPU parameters, a TP group spanning two nodes);
        else the node leader this rank's TP group writes for, or -1 when its group holds none (another
        data-parallel replica of the node). Collective once (one MIN all-reduce), then cached."""
        if hasattr(self, "_direct_leader"):
            return self._direct_leader
        lay = self.layout
        leaders = sorted(self.colocated.leaders)
        ranks = dist.get_process_group_ranks(lay.tp_group()) if lay.tp > 1 else [lay.rank]

        def node(r: int) -> int:  # torchrun numbers ranks node by node: a rank's node leader is the last one <= it
            return max(x for x in leaders if x <= r)

        ok = lay.pp == 1 and lay.cp == 1 and next(self.model[0].parameters()).device.type == "cpu" \
            and len({node(r) for r in ranks}) == 1
        flag = torch.tensor([1 if ok else 0], dtype=torch.long)
        collectives.all_reduce(flag, op=dist.ReduceOp.MIN)
        mine = [r for r in ranks if r in leaders]
        self._direct_leader = None if not int(flag[0]) else (mine[0] if mine else -1)
        return self._direct_leader

    def _sync_weights_nccl(self, bucket_bytes: int) -> None:
        """sync_weights over the NCCL weight group (sync/nccl_push.py), collective: the driver announces the update
        to every server before anything is exported, every rank takes part in the export while the driver
        broadcasts it, and every server is committed only if all of them received it. A failure is raised on every
        rank with the driver's message (naming the server); the servers keep their previous version."""
        from megatron_trace.rollout.client import drain
        from megatron_trace.sync.nccl_push import WeightSyncError
        from megatron_trace.sync.weight_bridge import export_announcement, export_hf_buckets, params_dtype_of

        metas = export_announcement(self.hf_config, params_dtype_of(self.model[0]))
        error, target = None, None
        if self.is_driver:
            try:
                if self.nccl is None:
                    raise RuntimeError("the NCCL weight group was never formed (Trainer._build_weight_sync)")
                target = self.nccl.announce(metas)
            except Exception as e:  # noqa: BLE001 - every rank raises it below, before exporting anything
                error = f"{type(e).__name__}: {e}"
        error = self._broadcast(error)
        if error is None:
            buckets = export_hf_buckets(self.model[0], self.hf_config, bucket_bytes=bucket_bytes, dst=0)
            if self.is_driver:
                try:
                    self.nccl.push(buckets, target, metas)  # drains the export on failure
                except Exception as e:  # noqa: BLE001
                    error = f"{type(e).__name__}: {e}"
            else:
                drain(iter(buckets))
            error = self._broadcast(error)
        if error is not None:
            raise WeightSyncError(f"step {self.step}: weight sync (rollout.weight_sync nccl) failed: {error}")

    # ------------------------------------------------------------------------------------------------ SFT

    def sft_step(self) -> dict:
        """Supervised warm-start: token-mean NLL of the reference solution after the student prompt (and, with
        sft.privileged_format, after the privileged prompt too)."""
        cfg = self.cfg
        samples = self._broadcast(self._sft_samples() if self.is_driver else None)
        batches = make_step_batches(samples, dp_size=self.layout.dp, dp_rank=self.layout.dp_rank,
                                    micro_batch_size=cfg.optim.micro_batch_size,
                                    max_tokens_per_microbatch=cfg.optim.max_tokens_per_microbatch,
                                    pad_id=self.pad_id, fixed_row_length=self.layout.pp > 1)
        num_tokens = float(sum(len(s.response_ids) for s in samples))
        tp_group = self.layout.tp_group() if self.layout.tp > 1 else None

        def loss_fn(logits, mb):
            if mb["rows"].numel() == 0:
                return logits.sum() * 0.0, {}
            stats = self._token_stats(logits, mb, tp_group)
            nll = -stats.logprob.sum()
            with torch.no_grad():
                metrics = {"tokens": nll.new_tensor(float(stats.logprob.numel())), "nll_sum": nll.detach(),
                           "entropy_sum": stats.entropy.detach().sum(), "loss": nll.detach() / num_tokens}
            return nll / num_tokens, metrics

        metrics = self._forward_backward_step(batches.microbatches, loss_fn, SFT_REDUCTIONS, batches.seq_length,
                                              micro_batch_size=batches.micro_batch_size)
        metrics.update(self.timer.pop())
        metrics.update(batches.stats)
        return {k: metrics[k] for k in ("loss", "nll", "entropy", "grad_norm", "tokens", "time/train",
                                        "padding_frac", "microbatches")}

    def _sft_samples(self) -> list[Sample]:
        from megatron_trace.data.prompts import build_prompt_ids, privileged_messages, student_messages

        cfg = self.cfg
        thinking = cfg.rollout.enable_thinking
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        n = cfg.sft.batch_size // (2 if cfg.sft.privileged_format else 1)
        out = []
        for p in self._next_problems(max(1, n)):
            target = self.tokenizer.encode(p.solution, add_special_tokens=False) + [eos]
            prompts = [build_prompt_ids(self.tokenizer, student_messages(p.problem), enable_thinking=thinking)]
            if cfg.sft.privileged_format:
                prompts.append(build_prompt_ids(self.tokenizer, privileged_messages(p.problem, p.solution),
                                                enable_thinking=thinking))
            for prompt in prompts:
                room = cfg.sft.max_seq_len - len(prompt)
                if room < 1:
                    raise ValueError(f"sft.max_seq_len={cfg.sft.max_seq_len} leaves no room after a "
                                     f"{len(prompt)}-token prompt (problem {p.id})")
                resp = target[:room]
                out.append(Sample(prompt_ids=prompt, response_ids=resp, sampler_logprobs=[],
                                  routes=[int(Route.PG)] * len(resp), advantage=0.0, reward=0.0, group=len(out)))
        return out

    # ------------------------------------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Release everything the builders started, in reverse order (engine and workers before the logger,
        process groups last); idempotent."""
        while self._closers:
            self._closers.pop()()
        self.engine = self.experience = self.logger = self.colocated = self.nccl = None
