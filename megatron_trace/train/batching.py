"""From a rollout batch to fixed-shape micro-batches for Megatron's pipeline schedule.

A *sample* is one response with everything the loss needs. Its student sequence is `prompt + response` and its
teacher sequence `privileged prompt + response`; the logit at position P-1+t predicts response token t, so
student row `P_s - 1 + t` and teacher row `P_t - 1 + t` both score the student's token t (teacher position t
scores the student's token t).

Micro-batches are right-padded to one sequence length for the whole step (pipeline stages exchange fixed-size
activations); samples are sorted by length first so padding stays small (padding-aware batching).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_trace.routes import Route

__all__ = ["Sample", "RolloutBatch", "build_microbatches", "split_for_data_parallel", "padded_length"]


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


def _rows(prompt_len: int, length: int, offset: int) -> torch.Tensor:
    return torch.arange(prompt_len - 1, prompt_len - 1 + length, dtype=torch.long) + offset


def build_microbatches(samples: list[Sample], *, micro_batch_size: int, seq_length: int,
                       teacher_seq_length: int | None = None, pad_id: int = 0,
                       min_microbatches: int = 1) -> list[dict]:
    """Fixed-shape micro-batches of `samples`.

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
    for i, s in enumerate(samples):
        total = len(s.prompt_ids) + len(s.response_ids)
        if total > seq_length:
            raise ValueError(f"sample {i}: prompt+response = {total} tokens > seq_length {seq_length}")
        if len(s.routes) != len(s.response_ids) or len(s.sampler_logprobs) not in (0, len(s.response_ids)):
            raise ValueError(f"sample {i}: routes/sampler_logprobs do not match the response length")
        if teacher_seq_length is not None and s.num_kl_rows:
            if s.teacher_prompt_ids is None:
                raise ValueError(f"sample {i} has KL rows but no teacher prompt")
            if len(s.teacher_prompt_ids) + len(s.response_ids) > teacher_seq_length:
                raise ValueError(f"sample {i}: teacher sequence longer than teacher_seq_length {teacher_seq_length}")
    n_mb = max(min_microbatches, -(-len(samples) // micro_batch_size))
    out = []
    for m in range(n_mb):
        chunk = samples[m * micro_batch_size:(m + 1) * micro_batch_size]
        tokens = torch.full((micro_batch_size, seq_length), pad_id, dtype=torch.long)
        rows, targets, logps, advs, routes, resp_idx, lengths = [], [], [], [], [], [], []
        t_tokens = t_rows = None
        if teacher_seq_length is not None:
            t_tokens = torch.full((micro_batch_size, teacher_seq_length), pad_id, dtype=torch.long)
            t_rows = []
        for j, s in enumerate(chunk):
            seq = s.prompt_ids + s.response_ids
            tokens[j, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            L = len(s.response_ids)
            rows.append(_rows(len(s.prompt_ids), L, j * seq_length))
            targets.append(torch.tensor(s.response_ids, dtype=torch.long))
            logps.append(torch.tensor(s.sampler_logprobs or [0.0] * L, dtype=torch.float32))
            advs.append(torch.full((L,), float(s.advantage), dtype=torch.float32))
            routes.append(torch.tensor(s.routes, dtype=torch.long))
            resp_idx.append(torch.full((L,), j, dtype=torch.long))
            lengths.append(L)
            if t_tokens is not None and s.teacher_prompt_ids is not None:
                tseq = s.teacher_prompt_ids + s.response_ids
                t_tokens[j, :len(tseq)] = torch.tensor(tseq, dtype=torch.long)
                r = torch.tensor(s.routes, dtype=torch.long)
                span_t = torch.nonzero(r != Route.PG).flatten()
                t_rows.append(span_t + (len(s.teacher_prompt_ids) - 1) + j * teacher_seq_length)
        cat = (lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt))
        routes_t = cat(routes, torch.long)
        kl_rows = torch.nonzero(routes_t != Route.PG).flatten()
        mb = {
            "tokens": tokens,
            "position_ids": torch.arange(seq_length, dtype=torch.long).expand(micro_batch_size, -1).contiguous(),
            "rows": cat(rows, torch.long),
            "targets": cat(targets, torch.long),
            "sampler_logprobs": cat(logps, torch.float32),
            "advantages": cat(advs, torch.float32),
            "routes": routes_t,
            "response_index": cat(resp_idx, torch.long),
            "response_lengths": torch.tensor(lengths, dtype=torch.float32),
            "kl_rows": kl_rows,
            "kl_reverse": routes_t[kl_rows] == Route.RKL,
        }
        if t_tokens is not None:
            mb["teacher_tokens"] = t_tokens
            mb["teacher_position_ids"] = torch.arange(teacher_seq_length, dtype=torch.long).expand(
                micro_batch_size, -1).contiguous()
            mb["teacher_rows"] = cat(t_rows, torch.long)
            if mb["teacher_rows"].numel() != kl_rows.numel():
                raise AssertionError("teacher rows and KL rows disagree")  # a sample lacks its teacher prompt
        out.append(mb)
    return out
