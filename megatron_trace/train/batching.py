"""From a rollout batch to the micro-batches of one optimizer step, padded or packed.

A *sample* is one response with everything the loss needs. Its student sequence is `prompt + response` and its
teacher sequence `privileged prompt + response`; the logit at position P-1+t predicts response token t, so
student row `P_s - 1 + t` and teacher row `P_t - 1 + t` both score the student's token t (teacher position t
scores the student's token t).

Two layouts, chosen by `optim.max_tokens_per_microbatch`:
- padded (0): `micro_batch_size` sequences per micro-batch, each right-padded to one length for the whole step
  (pipeline stages exchange fixed-size activations); samples sorted by length first so padding stays small.
- packed (> 0): sequences are grouped into micro-batches of at most that many tokens (best-fit decreasing,
  deterministic, balanced over DP ranks) and laid back to back in ONE row per micro-batch, with per-sequence
  position ids and `cu_seqlens` (sequence boundaries) so attention stays inside each sequence (train/packing.py).
  Under pipeline parallelism rows are right-padded to one length for the step (stages exchange fixed shapes),
  at most the budget; on a single stage each row ends at its own tokens (a multiple of 8). The number of
  micro-batches per step varies with the lengths; the loss normalisation does not (the trainer divides by
  global token and response counts, whatever the grouping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_trace.routes import Route

__all__ = ["Sample", "RolloutBatch", "StepBatches", "build_microbatches", "build_packed_microbatches",
           "make_step_batches", "pack_token_budget", "split_for_data_parallel", "padded_length"]


@dataclass
class Sample:
    """One response of a GRPO group (plain lists: broadcast between ranks with pickle)."""

    prompt_ids: list[int]  # [P_s] student prompt
    response_ids: list[int]  # [L]
    sampler_logprobs: list[float]  # [L] the rollout engine's raw log-probs (nats)
    routes: list[int]  # [L] Route ids
    advantage: float  # group-normalised advantage of this response
    reward: float
    group: int  # index of its problem in the step's batch
    teacher_prompt_ids: list[int] | None = None  # [P_t] privileged prompt; None when no KL row
    finish_reason: str = "stop"

    @property
    def num_kl_rows(self) -> int:
        return sum(1 for r in self.routes if r != Route.PG)


@dataclass
class RolloutBatch:
    """A step's experience, made on the driver rank and broadcast to every rank."""

    samples: list[Sample]
    metrics: dict[str, float] = field(default_factory=dict)  # rollout / reward / annotate metrics
    data_position: int = 0  # problems consumed so far (for resume)


def padded_length(n: int, multiple: int = 8) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def split_for_data_parallel(samples: list[Sample], dp_size: int, dp_rank: int) -> list[Sample]:
    """This DP rank's share: samples sorted by length then dealt round-robin, so shares have similar token
    counts. Every rank sees the same global batch, so every rank computes the same split."""
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].prompt_ids) + len(samples[i].response_ids), i))
    return [samples[i] for i in order[dp_rank::dp_size]]


def _validate(samples: list[Sample], teacher: bool) -> None:
    for i, s in enumerate(samples):
        if len(s.routes) != len(s.response_ids) or len(s.sampler_logprobs) not in (0, len(s.response_ids)):
            raise ValueError(f"sample {i}: routes/sampler_logprobs do not match the response length")
        if teacher and s.num_kl_rows and s.teacher_prompt_ids is None:
            raise ValueError(f"sample {i} has KL rows but no teacher prompt")


def _has_teacher_row(s: Sample) -> bool:
    return s.teacher_prompt_ids is not None and s.num_kl_rows > 0


def _loss_fields(entries: list[tuple[Sample, int, int | None]]) -> dict:
    """The loss tensors of a micro-batch. entries: (sample, offset of its student sequence in the flattened
    [b * s] positions, offset of its teacher sequence in the flattened teacher positions or None).

    Empty responses add no token and no entry to response_lengths (the loss divides by |y|)."""
    rows, targets, logps, advs, routes, resp_idx, lengths, t_rows = [], [], [], [], [], [], [], []
    for s, offset, t_offset in entries:
        L = len(s.response_ids)
        if L == 0:
            continue
        rows.append(torch.arange(L, dtype=torch.long) + (offset + len(s.prompt_ids) - 1))
        targets.append(torch.tensor(s.response_ids, dtype=torch.long))
        logps.append(torch.tensor(s.sampler_logprobs or [0.0] * L, dtype=torch.float32))
        advs.append(torch.full((L,), float(s.advantage), dtype=torch.float32))
        r = torch.tensor(s.routes, dtype=torch.long)
        routes.append(r)
        resp_idx.append(torch.full((L,), len(lengths), dtype=torch.long))
        lengths.append(L)
        if t_offset is not None and s.teacher_prompt_ids is not None:
            span_t = torch.nonzero(r != Route.PG).flatten()
            t_rows.append(span_t + (len(s.teacher_prompt_ids) - 1) + t_offset)

    def cat(xs, dt):
        return torch.cat(xs) if xs else torch.zeros(0, dtype=dt)

    routes_t = cat(routes, torch.long)
    kl_rows = torch.nonzero(routes_t != Route.PG).flatten()
    out = {
        "rows": cat(rows, torch.long),
        "targets": cat(targets, torch.long),
        "sampler_logprobs": cat(logps, torch.float32),
        "advantages": cat(advs, torch.float32),
        "routes": routes_t,
        "response_index": cat(resp_idx, torch.long),
        "response_lengths": torch.tensor(lengths, dtype=torch.float32),
        "kl_rows": kl_rows,
        "kl_reverse": routes_t[kl_rows] == Route.RKL,
        "teacher_rows": cat(t_rows, torch.long),
    }
    return out


def build_microbatches(samples: list[Sample], *, micro_batch_size: int, seq_length: int,
                       teacher_seq_length: int | None = None, pad_id: int = 0,
                       min_microbatches: int = 1) -> list[dict]:
    """Fixed-shape (padded) micro-batches of `samples`.

    Each dict holds, for b = micro_batch_size sequences of s = seq_length tokens:
      tokens, position_ids [b, s]; rows [T] (indices into the flattened [b*s] logits of the positions that
      predict response tokens); targets [T]; sampler_logprobs, advantages [T] (fp32); routes [T];
      response_index [T] (0..R-1 within the micro-batch); response_lengths [R]; kl_rows [K] (indices into T of
      the FKL/RKL tokens, in order); kl_reverse [K] bool;
    and when teacher_seq_length is given: teacher_tokens, teacher_position_ids [b, s_t]; teacher_rows [K]
    (indices into the flattened teacher [b*s_t] positions, aligned with kl_rows).
    Empty padding sequences fill the last micro-batch; at least `min_microbatches` are returned (padding
    micro-batches have T = 0 and contribute nothing).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    _validate(samples, teacher_seq_length is not None)
    for i, s in enumerate(samples):
        total = len(s.prompt_ids) + len(s.response_ids)
        if total > seq_length:
            raise ValueError(f"sample {i}: prompt+response = {total} tokens > seq_length {seq_length}")
        if teacher_seq_length is not None and s.num_kl_rows:
            if len(s.teacher_prompt_ids) + len(s.response_ids) > teacher_seq_length:
                raise ValueError(f"sample {i}: teacher sequence longer than teacher_seq_length {teacher_seq_length}")
    n_mb = max(min_microbatches, -(-len(samples) // micro_batch_size))
    out = []
    for m in range(n_mb):
        chunk = samples[m * micro_batch_size:(m + 1) * micro_batch_size]
        tokens = torch.full((micro_batch_size, seq_length), pad_id, dtype=torch.long)
        t_tokens = None
        if teacher_seq_length is not None:
            t_tokens = torch.full((micro_batch_size, teacher_seq_length), pad_id, dtype=torch.long)
        entries = []
        for j, s in enumerate(chunk):
            seq = s.prompt_ids + s.response_ids
            tokens[j, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            t_offset = None
            if t_tokens is not None and _has_teacher_row(s):
                tseq = s.teacher_prompt_ids + s.response_ids
                t_tokens[j, :len(tseq)] = torch.tensor(tseq, dtype=torch.long)
                t_offset = j * teacher_seq_length
            entries.append((s, j * seq_length, t_offset))
        mb = {"tokens": tokens,
              "position_ids": torch.arange(seq_length, dtype=torch.long).expand(micro_batch_size, -1).contiguous()}
        mb.update(_loss_fields(entries))
        teacher_rows = mb.pop("teacher_rows")
        if t_tokens is not None:
            mb["teacher_tokens"] = t_tokens
            mb["teacher_position_ids"] = torch.arange(teacher_seq_length, dtype=torch.long).expand(
                micro_batch_size, -1).contiguous()
            mb["teacher_rows"] = teacher_rows
            if teacher_rows.numel() != mb["kl_rows"].numel():
                raise AssertionError("teacher rows and KL rows disagree")  # a sample lacks its teacher prompt
        out.append(mb)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Token-budget micro-batches (packing)

def _packed_size(s: Sample, teacher: bool) -> int:
    """Tokens a sample takes in a packed micro-batch: its student sequence, or its teacher sequence when that is
    longer and the teacher pass runs (both rows of a micro-batch must fit the budget). 0 for an empty response
    (nothing to score: it is not laid out)."""
    if not s.response_ids:
        return 0
    n = len(s.prompt_ids) + len(s.response_ids)
    if teacher and _has_teacher_row(s):
        n = max(n, len(s.teacher_prompt_ids) + len(s.response_ids))
    return n


def _best_fit(free: list[int], size: int) -> int | None:
    """Index of the bin with the least free room that still holds `size` (lowest index on ties), or None."""
    best = None
    for b, room in enumerate(free):
        if room >= size and (best is None or room < free[best]):
            best = b
    return best


def pack_token_budget(sizes: list[int], max_tokens: int, dp_size: int = 1) -> list[list[list[int]]]:
    """Group items into micro-batches of at most `max_tokens` tokens, the same number on every DP rank.

    sizes: tokens of each item (0 = not laid out). Returns [dp rank][micro-batch] -> item indices, in the
    order they are laid out. Deterministic (a function of sizes only: every rank computes the same plan).
    1. Best-fit decreasing over all items gives the number of micro-batches n; each rank gets m = ceil(n / dp).
    2. Items (largest first, index on ties) go to the DP rank with the fewest tokens so far that has room, into
       its best-fitting micro-batch; if no rank has room, m grows by one and step 2 starts over. With dp = 1
       this is exactly best-fit decreasing. Micro-batches left empty (fewer items than micro-batches) are
       padding micro-batches.
    An item longer than `max_tokens` raises ValueError naming both numbers.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    for i, n in enumerate(sizes):
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens > optim.max_tokens_per_microbatch = {max_tokens}: raise "
                             f"the budget to at least {n} (a sequence is never split across micro-batches)")
    order = sorted((i for i, n in enumerate(sizes) if n > 0), key=lambda i: (-sizes[i], i))
    free: list[int] = []
    for i in order:
        b = _best_fit(free, sizes[i])
        if b is None:
            free.append(max_tokens - sizes[i])
        else:
            free[b] -= sizes[i]
    m = max(1, -(-len(free) // dp_size))
    while True:
        plan = [[[] for _ in range(m)] for _ in range(dp_size)]
        room = [[max_tokens] * m for _ in range(dp_size)]
        load = [0] * dp_size
        placed = True
        for i in order:
            for r in sorted(range(dp_size), key=lambda r: (load[r], r)):
                b = _best_fit(room[r], sizes[i])
                if b is not None:
                    plan[r][b].append(i)
                    room[r][b] -= sizes[i]
                    load[r] += sizes[i]
                    break
            else:
                placed = False
                break
        if placed:
            return plan
        m += 1


def _cu_seqlens(lengths: list[int], row: int) -> torch.Tensor:
    """Sequence boundaries of a packed row [n + 1] int32, the padding tail (if any) as one more sequence."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    if bounds[-1] < row:
        bounds.append(row)
    return torch.tensor(bounds, dtype=torch.int32)


def _pack_row(seqs: list[list[int]], row: int, pad_id: int) -> dict:
    tokens = torch.full((1, row), pad_id, dtype=torch.long)
    positions = torch.zeros((1, row), dtype=torch.long)
    offset = 0
    for seq in seqs:
        tokens[0, offset:offset + len(seq)] = torch.tensor(seq, dtype=torch.long)
        positions[0, offset:offset + len(seq)] = torch.arange(len(seq))
        offset += len(seq)
    positions[0, offset:] = torch.arange(row - offset)  # the padding tail is a sequence of its own
    cu = _cu_seqlens([len(s) for s in seqs], row)
    return {"tokens": tokens, "position_ids": positions, "cu_seqlens": cu,
            "max_seqlen": int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else row}


def build_packed_microbatches(samples: list[Sample], groups: list[list[int]], *, seq_length: int,
                              teacher_seq_length: int | None = None, pad_id: int = 0,
                              fixed_length: bool = True) -> list[dict]:
    """One packed micro-batch per group of sample indices (see pack_token_budget).

    Each dict holds the keys of build_microbatches with b = 1 (rows index the single row of s positions), plus
    cu_seqlens [n + 1] int32 (sequence boundaries in the row, padding tail last) and max_seqlen (int); with
    teacher_seq_length also teacher_cu_seqlens and teacher_max_seqlen. The teacher row holds only the samples with
    KL rows. Empty responses are not laid out.
    fixed_length (pipelines: stages exchange fixed-size activations): every row has s = seq_length (teacher rows
    teacher_seq_length); otherwise each row is padded only to a multiple of 8 of its own tokens (at most
    seq_length), so a single stage never computes the tail the longest row sets.
    """
    _validate(samples, teacher_seq_length is not None)
    out = []
    for g, group in enumerate(groups):
        chunk = [samples[i] for i in group if samples[i].response_ids]
        seqs = [s.prompt_ids + s.response_ids for s in chunk]
        used = sum(len(x) for x in seqs)
        if used > seq_length:
            raise ValueError(f"micro-batch {g}: {used} tokens > seq_length {seq_length}")
        entries, t_seqs, offset, t_offset = [], [], 0, 0
        for s, seq in zip(chunk, seqs):
            teacher_at = None
            if teacher_seq_length is not None and _has_teacher_row(s):
                teacher_at = t_offset
                t_seqs.append(s.teacher_prompt_ids + s.response_ids)
                t_offset += len(t_seqs[-1])
            entries.append((s, offset, teacher_at))
            offset += len(seq)
        mb = _pack_row(seqs, seq_length if fixed_length else min(padded_length(used), seq_length), pad_id)
        mb.update(_loss_fields(entries))
        teacher_rows = mb.pop("teacher_rows")
        if teacher_seq_length is not None:
            if t_offset > teacher_seq_length:
                raise ValueError(f"micro-batch {g}: {t_offset} teacher tokens > teacher_seq_length "
                                 f"{teacher_seq_length}")
            t_row = teacher_seq_length if fixed_length else min(padded_length(t_offset), teacher_seq_length)
            t = _pack_row(t_seqs, t_row, pad_id)
            mb.update(teacher_tokens=t["tokens"], teacher_position_ids=t["position_ids"],
                      teacher_cu_seqlens=t["cu_seqlens"], teacher_max_seqlen=t["max_seqlen"],
                      teacher_rows=teacher_rows)
            if teacher_rows.numel() != mb["kl_rows"].numel():
                raise AssertionError("teacher rows and KL rows disagree")
        out.append(mb)
    return out


# ---------------------------------------------------------------------------------------------------------------
# A step's micro-batches, either layout

@dataclass
class StepBatches:
    """This DP rank's micro-batches of one step and the shapes the schedule needs.

    stats (identical on every rank, computed from the global plan): padding_frac = padded tokens / processed
    tokens of the student pass over all DP ranks; microbatches = micro-batches per DP rank (the most of any
    rank); teacher_padding_frac likewise for the teacher pass when it runs."""

    microbatches: list[dict]
    seq_length: int
    micro_batch_size: int  # rows per micro-batch (1 when packed)
    teacher_seq_length: int | None = None
    stats: dict[str, float] = field(default_factory=dict)


def _padding_frac(real: int, processed: int) -> float:
    return 1.0 - real / processed if processed else 0.0


def make_step_batches(samples: list[Sample], *, dp_size: int, dp_rank: int, micro_batch_size: int,
                      max_tokens_per_microbatch: int = 0, with_teacher: bool = False,
                      pad_id: int = 0, fixed_row_length: bool = True) -> StepBatches:
    """The micro-batches of `samples` (the GLOBAL batch, the same on every rank) for DP rank `dp_rank`:
    padded (`max_tokens_per_microbatch` = 0, `micro_batch_size` sequences each) or packed (token budget).
    fixed_row_length: False (no pipeline) lets each packed row end at its own tokens (a multiple of 8) instead
    of the step's longest row; seq_length is then the longest row. The padded layout is unchanged."""
    if not samples:
        raise ValueError("make_step_batches needs at least one sample")
    _validate(samples, with_teacher)
    student = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    teacher = [len(s.teacher_prompt_ids) + len(s.response_ids) if _has_teacher_row(s) else 0 for s in samples]
    if with_teacher and not any(teacher):
        with_teacher = False
    budget = max_tokens_per_microbatch
    if budget <= 0:
        seq_length = padded_length(max(student))
        t_seq = padded_length(max(teacher)) if with_teacher else None
        local = split_for_data_parallel(samples, dp_size, dp_rank)
        mbs = build_microbatches(local, micro_batch_size=micro_batch_size, seq_length=seq_length,
                                 teacher_seq_length=t_seq, pad_id=pad_id)
        per_rank = [max(1, -(-len(samples[r::dp_size]) // micro_batch_size)) for r in range(dp_size)]
        rows = sum(per_rank) * micro_batch_size
        stats = {"padding_frac": _padding_frac(sum(student), rows * seq_length), "microbatches": float(max(per_rank))}
        if with_teacher:
            stats["teacher_padding_frac"] = _padding_frac(sum(teacher), rows * t_seq)
        return StepBatches(mbs, seq_length, micro_batch_size, t_seq, stats)

    plan = pack_token_budget([_packed_size(s, with_teacher) for s in samples], budget, dp_size)
    groups = [g for rank in plan for g in rank]
    laid_out = [i for g in groups for i in g if samples[i].response_ids]

    def row_length(lengths: list[int]) -> int:
        longest = max((sum(lengths[i] for i in g if samples[i].response_ids) for g in groups), default=0)
        return min(padded_length(longest), max(budget, longest))

    def processed(lengths: list[int], row: int) -> int:
        """Positions the pass computes over every micro-batch of every DP rank."""
        if fixed_row_length:
            return len(groups) * row
        return sum(min(padded_length(sum(lengths[i] for i in g if samples[i].response_ids)), row) for g in groups)

    seq_length = row_length(student)
    t_seq = row_length(teacher) if with_teacher else None
    mbs = build_packed_microbatches(samples, plan[dp_rank], seq_length=seq_length, teacher_seq_length=t_seq,
                                    pad_id=pad_id, fixed_length=fixed_row_length)
    stats = {"padding_frac": _padding_frac(sum(student[i] for i in laid_out), processed(student, seq_length)),
             "microbatches": float(len(plan[0]))}
    if with_teacher:
        stats["teacher_padding_frac"] = _padding_frac(sum(teacher[i] for i in laid_out), processed(teacher, t_seq))
    return StepBatches(mbs, seq_length, 1, t_seq, stats)
