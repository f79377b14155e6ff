"""Capacity planner: per-GPU memory and step-time split of a TRACE run, from the model config, the layout and
stated hardware rates. No GPU and no model are needed; every number is a closed-form estimate.

Memory (bytes per GPU, worst pipeline stage):
- weights: this rank's parameters x (2 bf16 | 4 fp32). A rank holds (decoder layers of its stage) / tp, the
  replicated RMSNorm weights in full, and (V_padded x h) / tp for the embedding (first stage) and the output
  layer (last stage; with tied embeddings and PP > 1 the last stage keeps its own copy, as Megatron does).
- grads: Megatron's DDP grad buffer, fp32 (main grads) = 4 bytes per rank parameter, not sharded.
- optimizer: Adam exp_avg + exp_avg_sq (8 bytes) + the fp32 master copy with bf16 params (4 bytes), divided by DP
  with the distributed optimizer (ZeRO-1).
- activations: elements per token per layer kept for backward (see `_activation_elems_per_token`), x the tokens
  of one micro-batch, x the micro-batches in flight on the first stage under 1F1B (min(pp, microbatches)).
  Full recompute keeps only each layer's input (h) plus one layer's working set.
- student logits: the output layer's [mbs x seq, V_padded / tp] logits (compute dtype), then for the response
  rows only (mbs x response_len): the padding-masked copy the loss reads and its gradient (compute dtype) and
  the loss's fp32 scratch (`LOSS_WORKSPACE_BUFFERS` x min(rows, chunk_rows) x V/tp).
- teacher logits (span-sparse): the teacher's output layer runs on span rows only; rows = this rank's
  responses (or `teacher_microbatches_per_pass` micro-batches' at a time, as the trainer's
  `teacher.microbatches_per_pass` does) x response_len x span_fraction, fp32, held from the teacher pass to the
  student's backward.
- teacher snapshot: a copy of the rank's weights when the teacher is refreshed less often than every step.
- vLLM (colocated or on separate nodes): the engine reserves gpu_memory_utilization x GPU memory for its weights
  (bf16, / rollout_tp) and KV cache (the rest); the planner reports how many concurrent sequences fit. A colocated
  engine asleep (sleep_level 1 or 2) holds neither while the trainer trains (1 GiB of context and workspace
  stays); a second table gives the training GPU while it generates (the trainer's weights, grads and optimizer
  state plus the engine's whole reservation), and both must fit.
- runtime: a fixed per-GPU allowance (CUDA context, NCCL buffers, allocator fragmentation).

Step time (seconds): rollout (decode at memory bandwidth: every step reads the weights and the KV cache),
teacher (forward of the privileged prompt + response), train (forward + backward [+ recompute]) at a stated
model-FLOPs utilisation, weight sync (bf16 weights over NVLink within a node, or the
inter-node network to separate rollout nodes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from megatron_trace.models.qwen3 import load_hf_config, padded_vocab_size

__all__ = ["Hardware", "PlanConfig", "Plan", "plan", "GIB", "rank_param_counts", "format_plan"]

GIB = 1024 ** 3
LOSS_WORKSPACE_BUFFERS = 2  # fp32 [chunk_rows, V/tp] scratch buffers of loss.vocab_parallel.token_stats
LOSS_CHUNK_ROWS = 1024  # its default chunk_rows


@dataclass
class Hardware:
    """Stated rates of one accelerator and its links. Defaults: NVIDIA H100 SXM 80 GB, 400 Gb/s per GPU."""

    name: str = "H100-SXM-80GB"
    memory_gib: float = 79.1  # usable device memory
    bf16_tflops: float = 989.0  # dense peak
    mfu: float = 0.35  # achieved fraction of peak in training / teacher forward
    hbm_gbps: float = 3350.0  # memory bandwidth, GB/s
    decode_efficiency: float = 0.6  # achieved fraction of memory bandwidth while decoding
    nvlink_gbps: float = 450.0  # per GPU, one direction, GB/s
    network_gbps: float = 50.0  # inter-node per GPU, GB/s (400 Gb/s InfiniBand)
    pcie_gbps: float = 25.0  # host <-> GPU per GPU, GB/s (vLLM sleep level 1 offloads weights over it)
    runtime_gib: float = 3.0  # CUDA context, NCCL buffers, allocator slack; 0 on CPU (measured separately)


@dataclass
class PlanConfig:
    """One run layout. dp = nodes x gpus_per_node / (tp x pp) over the training GPUs."""

    model: str = "qwen3-8b"  # shipped config name or an HF folder
    nodes: int = 1  # training nodes
    gpus_per_node: int = 8
    tp: int = 4
    pp: int = 1
    rollout: Literal["colocated", "separate"] = "colocated"
    rollout_nodes: int = 0  # separate: nodes running vLLM only
    rollout_tp: int = 0  # vLLM tensor parallel size; 0 = tp
    rollout_engines: int = 0  # vLLM engines decoding in parallel; 0 = one per rollout_tp GPUs of the rollout GPUs
    gpu_memory_utilization: float = 0.5  # vLLM's share of a GPU
    # Colocated engines sleep while the trainer trains (rollout.sleep_level): 1 offloads their weights to host
    # memory, 2 frees them (the next update overwrites them); either frees the KV cache. 0 = never sleep.
    sleep_level: int = 2
    prompts_per_step: int = 128
    group_size: int = 8
    prompt_len: int = 512  # mean prompt tokens
    privileged_extra_len: int = 1024  # extra tokens of the teacher's prompt (reference solution + labels)
    response_len: int = 8192  # mean response tokens (max_response_tokens is the worst case)
    micro_batch_size: int = 1
    bf16: bool = True
    distributed_optimizer: bool = True
    recompute: Optional[Literal["selective", "full"]] = "selective"
    flash_attention: bool = True  # fused attention (TE/flash): no [heads, s, s] scores kept; False on CPU
    span_fraction: float = 0.25  # annotator coverage cap: share of response tokens with teacher logits
    teacher_refresh_steps: int = 1  # 1 = live weights (no snapshot)
    # The trainer's teacher.microbatches_per_pass: teacher span logits are held for this many micro-batches at a
    # time, each group followed by its student pass; 0 = all of a rank's micro-batches at once.
    teacher_microbatches_per_pass: int = 0
    # The longest response of a step (rollout.max_response_tokens); 0 = response_len. Padded micro-batches pad
    # every row to prompt_len + max_response_len; packed ones do not.
    max_response_len: int = 0
    # The trainer's optim.max_tokens_per_microbatch: > 0 packs sequences into micro-batches of this many tokens,
    # so activations, logits and step time follow the mean sequence (prompt_len + response_len), not the longest.
    max_tokens_per_microbatch: int = 0

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "tp", "pp", "prompts_per_step", "group_size", "prompt_len",
                     "response_len", "micro_batch_size", "teacher_refresh_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if (self.nodes * self.gpus_per_node) % (self.tp * self.pp):
            raise ValueError(f"tp x pp = {self.tp * self.pp} does not divide the {self.nodes * self.gpus_per_node} "
                             "training GPUs")
        if self.rollout == "separate" and self.rollout_nodes < 1:
            raise ValueError("rollout=separate needs rollout_nodes >= 1")
        if self.max_response_len < 0 or self.max_tokens_per_microbatch < 0:
            raise ValueError("max_response_len and max_tokens_per_microbatch must be >= 0")
        if self.max_response_len and self.max_response_len < self.response_len:
            raise ValueError(f"max_response_len={self.max_response_len} < the mean response_len={self.response_len}")
        if not 0.0 <= self.span_fraction <= 1.0:
            raise ValueError(f"span_fraction={self.span_fraction} must be in [0, 1]")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level={self.sleep_level}: expected 0, 1 or 2")
        if not 0.0 < self.gpu_memory_utilization < 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1)")

    @property
    def dp(self) -> int:
        return self.nodes * self.gpus_per_node // (self.tp * self.pp)

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def padded_seq_len(self) -> int:
        """Tokens per row of a padded micro-batch: the step's longest sequence."""
        return self.prompt_len + (self.max_response_len or self.response_len)


@dataclass
class Plan:
    config: PlanConfig
    hardware: Hardware
    params_total: int
    params_rank: int  # parameters on the most loaded training rank
    memory: dict[str, float]  # bytes per training GPU while training, by component (incl. "total")
    rollout_memory: dict[str, float]  # bytes per rollout GPU (colocated: the vLLM share on a training GPU)
    kv_tokens_per_engine: int  # KV cache capacity of one vLLM engine, tokens
    concurrent_sequences: int  # sequences one engine decodes at once
    time: dict[str, float]  # seconds per step by phase (incl. "total"; teacher only while lambda > 0)
    engines: int = 1
    rollout_tp: int = 1
    warnings: list[str] = field(default_factory=list)
    # colocated: bytes per training GPU while its engine generates (the trainer's weights, grads and optimizer
    # stay; activations and logits are gone; the engine is awake with its whole reservation)
    generation_memory: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"config": asdict(self.config), "hardware": asdict(self.hardware), "params_total": self.params_total,
                "params_rank": self.params_rank, "memory_bytes": self.memory,
                "rollout_memory_bytes": self.rollout_memory,
                "kv_tokens_per_engine": self.kv_tokens_per_engine, "concurrent_sequences": self.concurrent_sequences,
                "generation_memory_bytes": self.generation_memory, "time_s": self.time, "warnings": self.warnings}


def _dims(hf: dict) -> dict:
    h, heads, kv = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    d = hf.get("head_dim", h // heads)
    return dict(h=h, heads=heads, kv=kv, d=d, hq=heads * d, hkv=kv * d, ffn=hf["intermediate_size"],
                layers=hf["num_hidden_layers"], vocab=hf["vocab_size"], tied=bool(hf.get("tie_word_embeddings")))


def rank_param_counts(hf: dict, tp: int, pp: int) -> dict[str, int]:
    """Parameters per rank of the first and last pipeline stage (the two heaviest): {"first", "last", "layer"}.

    Matrices are split over tp; RMSNorm weights (input, pre-MLP, q/k norms, final) are replicated.
    """
    m = _dims(hf)
    if m["layers"] % pp:
        raise ValueError(f"pp={pp} does not divide the {m['layers']} layers")
    if m["heads"] % tp or m["kv"] % tp and tp % m["kv"]:
        raise ValueError(f"tp={tp} does not divide {m['heads']} heads / {m['kv']} kv heads")
    h = m["h"]
    matrices = h * m["hq"] + 2 * h * m["hkv"] + m["hq"] * h + 3 * h * m["ffn"]
    norms = 2 * h + 2 * m["d"]
    layer = matrices // tp + norms
    vocab_rows = padded_vocab_size(m["vocab"], tp) // tp
    emb = vocab_rows * h
    per_stage = (m["layers"] // pp) * layer
    if pp == 1:
        first = last = per_stage + emb + (0 if m["tied"] else emb) + h
    else:
        first = per_stage + emb
        last = per_stage + emb + h  # output layer (or the tied embedding's copy) + final norm
    return {"first": first, "last": last, "layer": layer}


def _activation_elems_per_token(m: dict, tp: int, seq: int, recompute: Optional[str], flash: bool) -> float:
    """Activation elements kept for backward per token per layer (sequence parallel off: norms replicated).

    Attention block: norm input (h) + QKV input (h) [replicated] + q/k/v out (hq + 2 hkv) + rotated q, k
    (hq + hkv) + attention inputs (hq + 2 hkv) + attention output (hq) [split over tp]; unfused attention adds
    the scores and softmax (2 x heads x seq, fp32 counted as 2 elements each -> x 2).
    MLP block: norm input (h) + fc1 input (h) [replicated] + gate, up (2 ffn) + silu(gate) (ffn) + down input
    (ffn) [split]. Selective recompute drops the core-attention tensors (q/k/v inputs and the scores).
    """
    h, hq, hkv, ffn, heads = m["h"], m["hq"], m["hkv"], m["ffn"], m["heads"]
    replicated = 4 * h
    core = (hq + 2 * hkv) + (0 if flash else 2 * 2 * heads * seq)
    split = (hq + 2 * hkv) + (hq + hkv) + hq + 4 * ffn + (0 if recompute == "selective" else core)
    return replicated + split / tp


def plan(cfg: PlanConfig, hw: Hardware | None = None) -> Plan:
    """Estimate memory per GPU and the step-time split of `cfg` on `hw` (see the module docstring)."""
    hw = hw or Hardware()
    hf = load_hf_config(cfg.model)
    m = _dims(hf)
    from megatron_trace.models.qwen3 import qwen3_param_count

    total = qwen3_param_count(hf)["total"]
    counts = rank_param_counts(hf, cfg.tp, cfg.pp)
    p_rank = max(counts["first"], counts["last"])
    wbytes = 2 if cfg.bf16 else 4
    abytes = 2 if cfg.bf16 else 4  # activations in the compute dtype
    warnings: list[str] = []

    # ---- training memory (per GPU, worst stage)
    mem: dict[str, float] = {}
    mem["weights"] = p_rank * wbytes
    mem["grads"] = p_rank * 4
    opt_per_param = 8 + (4 if cfg.bf16 else 0)
    mem["optimizer"] = p_rank * opt_per_param / (cfg.dp if cfg.distributed_optimizer else 1)
    responses = cfg.prompts_per_step * cfg.group_size
    if responses % cfg.dp:
        warnings.append(f"{responses} responses per step do not split evenly over dp={cfg.dp}")
    local_seqs = math.ceil(responses / cfg.dp)
    budget = cfg.max_tokens_per_microbatch
    if budget:
        # packed: micro-batches of `budget` tokens holding budget / seq_len mean sequences, no padding rows
        longest = cfg.padded_seq_len + cfg.privileged_extra_len
        if budget < longest:
            warnings.append(f"max_tokens_per_microbatch={budget} < the longest teacher sequence {longest} "
                            "(prompt + privileged extra + max response): such a step raises")
        seqs_per_mb = budget / cfg.seq_len
        microbatches = math.ceil(local_seqs / seqs_per_mb)
        mb_tokens = budget
        attn_seq = cfg.seq_len if cfg.flash_attention else budget  # THD: per sequence; mask path: whole row
        processed_seq = cfg.seq_len  # compute per sequence
    else:
        seqs_per_mb = cfg.micro_batch_size
        microbatches = math.ceil(local_seqs / cfg.micro_batch_size)
        mb_tokens = cfg.micro_batch_size * cfg.padded_seq_len
        attn_seq = cfg.padded_seq_len
        processed_seq = cfg.padded_seq_len  # padding is computed too
    in_flight = min(cfg.pp, microbatches)
    layers_stage = m["layers"] // cfg.pp
    if cfg.recompute == "full":
        per_tok = layers_stage * m["h"] + _activation_elems_per_token(m, cfg.tp, attn_seq, None, cfg.flash_attention)
    else:
        per_tok = layers_stage * _activation_elems_per_token(m, cfg.tp, attn_seq, cfg.recompute, cfg.flash_attention)
    mem["activations"] = per_tok * mb_tokens * in_flight * abytes
    vocab_rank = padded_vocab_size(m["vocab"], cfg.tp) // cfg.tp
    rows = seqs_per_mb * cfg.response_len
    mem["student_logits"] = vocab_rank * (mb_tokens * abytes + rows * 2 * abytes
                                          + LOSS_WORKSPACE_BUFFERS * min(rows, LOSS_CHUNK_ROWS) * 4)
    per_pass = cfg.teacher_microbatches_per_pass
    held = local_seqs if per_pass == 0 else min(local_seqs, per_pass * seqs_per_mb)
    span_rows = held * cfg.response_len * cfg.span_fraction
    mem["teacher_logits"] = span_rows * vocab_rank * 4
    mem["teacher_snapshot"] = mem["weights"] if cfg.teacher_refresh_steps > 1 else 0.0

    # ---- vLLM
    rtp = cfg.rollout_tp or cfg.tp
    if m["kv"] % rtp and rtp % m["kv"]:
        warnings.append(f"rollout_tp={rtp} does not divide the {m['kv']} kv heads")
    vllm_weights = total * 2 / rtp
    reserve = cfg.gpu_memory_utilization * hw.memory_gib * GIB
    kv_bytes = max(0.0, reserve - vllm_weights - 1.0 * GIB)  # 1 GiB: vLLM's activation/graph workspace
    kv_per_token = 2 * m["layers"] * max(1, m["kv"] // rtp) * m["d"] * 2  # K and V, bf16, per GPU
    kv_tokens = int(kv_bytes // kv_per_token)
    rollout_mem = {"vllm_weights": vllm_weights, "kv_cache": kv_bytes, "runtime": hw.runtime_gib * GIB}
    rollout_mem["total"] = sum(rollout_mem.values())
    asleep = cfg.rollout == "colocated" and cfg.sleep_level > 0
    if cfg.rollout == "colocated":
        # asleep while training: no KV cache, no weights on the GPU (offloaded or freed); vLLM's CUDA context and
        # workspace stay (1 GiB). Awake (sleep_level 0): the whole reservation.
        mem["vllm_asleep" if asleep else "vllm_reserved"] = 1.0 * GIB if asleep else reserve
    mem["runtime"] = hw.runtime_gib * GIB
    mem["total"] = sum(mem.values())
    if mem["total"] > hw.memory_gib * GIB:
        warnings.append(f"training GPUs need {mem['total'] / GIB:.1f} GiB > {hw.memory_gib} GiB: does not fit "
                        "(more TP/PP, the distributed optimizer, full recompute, a smaller micro-batch, or "
                        "separate rollout nodes)")
    gen_mem: dict[str, float] = {}
    if cfg.rollout == "colocated":
        gen_mem = {k: mem[k] for k in ("weights", "grads", "optimizer", "teacher_snapshot", "runtime")}
        gen_mem["vllm_reserved"] = reserve
        gen_mem["total"] = sum(gen_mem.values())
        if gen_mem["total"] > hw.memory_gib * GIB:
            warnings.append(f"while generating, training GPUs need {gen_mem['total'] / GIB:.1f} GiB > "
                            f"{hw.memory_gib} GiB: does not fit (lower gpu_memory_utilization, more TP, the "
                            "distributed optimizer)")
    if kv_tokens < cfg.seq_len:
        warnings.append(f"vLLM KV cache holds {kv_tokens} tokens < one sequence of {cfg.seq_len}: raise "
                        "gpu_memory_utilization or rollout_tp")

    # ---- step time
    rollout_gpus = (cfg.rollout_nodes if cfg.rollout == "separate" else cfg.nodes) * cfg.gpus_per_node
    engines = cfg.rollout_engines or max(1, rollout_gpus // rtp)
    seqs_per_engine = math.ceil(responses / engines)
    concurrent = max(1, min(seqs_per_engine, kv_tokens // max(1, cfg.seq_len)))
    waves = math.ceil(seqs_per_engine / concurrent)
    bw = hw.hbm_gbps * 1e9 * hw.decode_efficiency
    avg_ctx = cfg.prompt_len + cfg.response_len / 2
    per_iter_mem = (vllm_weights + concurrent * avg_ctx * kv_per_token) / bw
    per_iter_flops = 2 * total * concurrent / rtp / (hw.bf16_tflops * 1e12 * hw.mfu)
    t_rollout = waves * cfg.response_len * max(per_iter_mem, per_iter_flops)
    train_gpus = cfg.nodes * cfg.gpus_per_node
    rate = train_gpus * hw.bf16_tflops * 1e12 * hw.mfu
    attn_per_token = 2 * 2 * m["layers"] * m["hq"] * (processed_seq / 2)  # QK^T and PV, causal mean context
    fwd_per_token = 2 * total + attn_per_token
    tokens = responses * processed_seq
    # forward + backward (2 forwards' worth); log p_old is the same forward's detached log-prob (one update per
    # rollout batch), so no extra pass; full recompute repeats the forward.
    passes = 3 + (1 if cfg.recompute == "full" else 0)
    t_train = passes * fwd_per_token * tokens / rate
    t_teacher = fwd_per_token * responses * (processed_seq + cfg.privileged_extra_len) / rate
    sync_bytes = total * 2
    if cfg.rollout == "colocated":
        t_sync = sync_bytes / cfg.tp / (hw.nvlink_gbps * 1e9) + sync_bytes / rtp / (hw.hbm_gbps * 1e9)
    else:
        t_sync = sync_bytes / (hw.network_gbps * 1e9)
    time = {"rollout": t_rollout, "teacher": t_teacher, "train": t_train, "sync": t_sync}
    if asleep:  # level 1 moves the engine's weights to host memory and back; level 2 only frees and re-maps
        time["sleep_wake"] = 2 * vllm_weights / (hw.pcie_gbps * 1e9) if cfg.sleep_level == 1 else 0.0
    time["total"] = sum(time.values())
    return Plan(cfg, hw, total, p_rank, mem, rollout_mem, kv_tokens, concurrent, time, engines, rtp, warnings,
                gen_mem)


def format_plan(p: Plan) -> str:
    """A Markdown table of the plan: memory per GPU (GiB) and the step-time split (s)."""
    c = p.config
    lines = [f"## {c.model}: {c.nodes} x {c.gpus_per_node} GPUs ({p.hardware.name}), TP={c.tp} PP={c.pp} DP={c.dp}, "
             f"rollout {c.rollout}" + (f" on {c.rollout_nodes} nodes" if c.rollout == "separate" else "")
             + f", {p.engines} vLLM engine(s) at TP={p.rollout_tp}"
             + (f", asleep (level {c.sleep_level}) while training" if c.rollout == "colocated" and c.sleep_level
                else ""),
             "",
             f"{p.params_total / 1e9:.2f} B parameters, {p.params_rank / 1e9:.3f} B on the heaviest rank; "
             f"{c.prompts_per_step} prompts x {c.group_size} responses, {c.prompt_len} + {c.response_len} tokens, "
             f"micro-batch {c.micro_batch_size}, {'bf16' if c.bf16 else 'fp32'}, recompute {c.recompute}, "
             f"distributed optimizer {'on' if c.distributed_optimizer else 'off'}.",
             "", "| training GPU memory | GiB |", "|---|---:|"]
    lines += [f"| {k} | {v / GIB:.2f} |" for k, v in p.memory.items() if k != "total"]
    lines += [f"| **total** | **{p.memory['total'] / GIB:.2f}** |", ""]
    if p.generation_memory:
        lines += ["| training GPU memory while generating | GiB |", "|---|---:|"]
        lines += [f"| {k} | {v / GIB:.2f} |" for k, v in p.generation_memory.items() if k != "total"]
        lines += [f"| **total** | **{p.generation_memory['total'] / GIB:.2f}** |", ""]
    lines += ["| vLLM memory per rollout GPU | GiB |", "|---|---:|"]
    lines += [f"| {k} | {v / GIB:.2f} |" for k, v in p.rollout_memory.items()]
    lines += ["", f"KV cache: {p.kv_tokens_per_engine:,} tokens per engine -> {p.concurrent_sequences} sequences "
              "decoded "
              "at once.", "", "| step phase | s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in p.time.items() if k != "total"]
    lines += [f"| **total** | **{p.time['total']:.1f}** |", "",
              "(teacher runs only while the KL weight is above 0.)"]
    lines += [f"\n**WARNING**: {w}" for w in p.warnings]
    return "\n".join(lines) + "\n"
