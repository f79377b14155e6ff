"""The TRACE objective (docs/design.md, "The loss"): GRPO on every response token, down-weighted on span tokens,
plus the teacher KL on span tokens, with the KL weight lambda_k annealed to 0.

For a response y with span tokens S_y (FKL route on key spans of correct responses, RKL route on error spans of
incorrect ones):

    L = [ sum_{t not in S} l_PG(t) + (1 - lambda_k / w0) sum_{t in S} l_PG(t) ] / num_tokens
      + lambda_k * sum_y [ (1 / |y|) sum_{t in S_y} D_t ] / num_responses

l_PG is the clipped surrogate (grpo.clipped_surrogate), D_t the (clipped) forward or reverse KL of the token's row
(vocab_parallel.token_stats). num_tokens / num_responses are the counts of the *global* batch (all micro-batches
and data-parallel ranks), so the caller sums the micro-batch losses' gradients and gets the batch token-mean; both
default to the local counts.

`LossConfig` is the `loss:` section of the run config (defined here, composed by megatron_trace/config.py);
`TraceLoss(cfg)` is the loss as a callable returning the loss and its metrics as tensors, with the metrics'
reductions declared in `TraceLoss.reductions` (megatron_trace/loss/reductions.py).

Baselines: `all_token_routes` (on-policy self-distillation on every token: no spans) and `random_span_routes`
(spans placed at random with the annotator's coverage); the loss is the same, only the routes differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from megatron_trace.config_base import ConfigError
from megatron_trace.loss.grpo import approx_kl_terms, clipped_surrogate, truncated_is_weights
from megatron_trace.loss.reductions import MAX, SUM, MeanOf, Reduction
from megatron_trace.loss.schedule import kl_weight_at, last_active_step, pg_weight_on_kl_tokens
from megatron_trace.loss.vocab_parallel import TokenStats
from megatron_trace.routes import Route, routes_from_spans

__all__ = ["LossConfig", "TraceLoss", "TraceRows", "ExposureTracker", "all_token_routes", "random_span_routes"]


@dataclass
class LossConfig:
    """The loss, its KL schedule and the GRPO advantage settings (the run config's `loss:` section)."""

    # Which tokens are distilled is set under annotate.spans (coverage_cap; fkl: key spans of correct responses
    # take forward KL; rkl: error spans of incorrect responses take reverse KL).
    # trace: routed (annotator spans); all_token_opd: every token distilled (baseline); random_spans: random
    # spans of the annotator's coverage (baseline); grpo: no distillation at all.
    mode: Literal["trace", "all_token_opd", "random_spans", "grpo"] = "trace"
    w0: float = 0.5  # initial KL weight lambda_0; 0 = no KL
    warmup_steps: int = 10  # W: lambda_k = w0 for k < W
    decay_steps: int = 30  # D: then lambda_k = w0 * max(0, 1 - (k - W + 1) / D), 0 from step W + D - 1 (D 0: at W)
    # anneal: the schedule above; constant: lambda_k = w0 at every step (the KL channel never switches off)
    kl_schedule: Literal["anneal", "constant"] = "anneal"
    # PG weight on tokens that carry a KL row: anneal = 1 - lambda_k / w0 (TRACE), full = 1 (GRPO + KL), off = 0
    # (pure distillation on those tokens). Tokens without a KL row always take PG weight 1 (loss/schedule.py).
    pg_on_kl_tokens: Literal["anneal", "full", "off"] = "anneal"
    # Truncated importance weights min(pi_old / pi_sampler, tis_cap) on the PG loss, correcting the sampler/trainer
    # log-prob mismatch (verl's tis_imp_ratio_cap); None = off. Needs rollout.recompute_old_logprobs.
    tis_cap: Optional[float] = None
    kl_clip: Optional[float] = 0.05  # per-vocab-entry clip c of the KL terms (nats); None = exact KL
    eps_low: float = 0.2  # PPO/GRPO clip range below 1: rho >= 1 - eps_low
    eps_high: float = 0.28  # and above 1 (DAPO clip-higher): rho <= 1 + eps_high
    normalize_std: bool = True  # divide group-centred rewards by the group std
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (no GRPO signal)
    overlong_buffer: Optional[int] = None  # DAPO soft overlong penalty over the last N tokens; None = off
    overlong_penalty: float = 1.0
    # Run the output layer inside the loss, chunk by chunk (loss/fused_output.py): [rows, vocab/tp] logits are
    # never stored, for the student nor the teacher's span rows; the matmuls are recomputed in exchange.
    fused_output_layer: bool = False
    # How the fused output layer gets its gradient. in_forward: the routed loss is a sum over rows (TraceRows), so
    # each logit block's gradient is formed as soon as the block is reduced over the vocab shards and turned at
    # once into hidden-state / weight gradients (loss/fused_output.fused_output_loss: every block multiplied out
    # once; two or three all-reduces per block). recompute: backward multiplies every block out again (three
    # all-reduces per call; fused_output_token_stats).
    fused_output_grad: Literal["in_forward", "recompute"] = "in_forward"
    # How the vocabulary-wide math of the loss runs (log-prob, entropy, KL and their gradients over [rows, vocab/tp];
    # loss/vocab_parallel.py): compiled (torch.compile: one fused loop per kernel, inductor's C++ on CPU, Triton on
    # GPU; compiled once per process, tens of seconds on CPU), eager (the same functions op by op: a pass over the
    # rows per op), auto (compiled on GPU, eager on CPU, where small test vocabularies never repay a compile).
    kernels: Literal["auto", "compiled", "eager"] = "auto"
    # Debug: check the values of every micro-batch's loss inputs once per step, before the micro-batch loop
    # (targets inside the vocabulary, kl_rows in range and equal to the span positions, route ids, response
    # indices and lengths). Costs host syncs; off, the micro-batch loop reads no tensor value on the host.
    check_values: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.w0, bool) or not (isinstance(self.w0, (int, float)) and math.isfinite(self.w0)
                                             and self.w0 >= 0):
            raise ConfigError(f"w0: must be a finite number >= 0, got {self.w0!r}")
        for name in ("warmup_steps", "decay_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}: must be an integer >= 0, got {value!r}")
        if not 0 <= self.eps_low < 1:
            raise ConfigError(f"eps_low: must be in [0, 1), got {self.eps_low!r}")
        if not self.eps_high >= 0:
            raise ConfigError(f"eps_high: must be >= 0, got {self.eps_high!r}")
        if self.kl_clip is not None and not self.kl_clip > 0:
            raise ConfigError(f"kl_clip: must be > 0 or null, got {self.kl_clip!r}")
        if self.mode not in ("trace", "all_token_opd", "random_spans", "grpo"):
            raise ConfigError(f"mode: {self.mode!r} is not one of trace, all_token_opd, random_spans, grpo")
        if self.kl_schedule not in ("anneal", "constant"):
            raise ConfigError(f"kl_schedule: {self.kl_schedule!r} is not one of anneal, constant")
        if self.pg_on_kl_tokens not in ("anneal", "full", "off"):
            raise ConfigError(f"pg_on_kl_tokens: {self.pg_on_kl_tokens!r} is not one of anneal, full, off")
        if self.kernels not in ("auto", "compiled", "eager"):
            raise ConfigError(f"kernels: {self.kernels!r} is not one of auto, compiled, eager")
        if self.fused_output_grad not in ("in_forward", "recompute"):
            raise ConfigError(f"fused_output_grad: {self.fused_output_grad!r} is not one of in_forward, recompute")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ConfigError(f"tis_cap: must be > 0 or null, got {self.tis_cap!r}")

    def kl_weight(self, step: int) -> float:
        """lambda_k for 0-based training step `step` (loss.schedule.kl_weight_at). Paper defaults: 0.5, 10, 30."""
        return kl_weight_at(step, w0=self.w0, warmup_steps=self.warmup_steps, decay_steps=self.decay_steps,
                            kind=self.kl_schedule)

    @property
    def last_active_step(self) -> int | None:
        """Last step with lambda_k > 0 (-1 if none, None if never 0); after it annotation and teacher are skipped."""
        return last_active_step(w0=self.w0, warmup_steps=self.warmup_steps, decay_steps=self.decay_steps,
                                kind=self.kl_schedule)


def _check_1d(name: str, t: torch.Tensor, n: int) -> None:
    if not isinstance(t, torch.Tensor) or t.shape != (n,):
        raise ValueError(f"{name} must be [{n}], got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")


class TraceLoss:
    """The TRACE loss of one micro-batch, built from its config: `loss, metrics = TraceLoss(cfg)(stats, ...)`.

    Metrics are 0-d detached tensors: additive sums and counts (the sums already divided by the global counts
    where the loss is), reduced as `TraceLoss.reductions` declares (megatron_trace.loss.reductions).
    """

    reductions: dict[str, Reduction] = {
        **{k: SUM for k in ("tokens", "pg_tokens", "fkl_tokens", "rkl_tokens", "span_tokens", "clipped_tokens",
                            "loss", "pg_loss", "kl_loss", "kl_fkl_sum", "kl_rkl_sum", "entropy_sum",
                            "entropy_pg_sum", "entropy_fkl_sum", "entropy_rkl_sum", "logprob_mismatch_sum",
                            "approx_kl_sum")},
        "kl_weight": MAX,
        "entropy": MeanOf("entropy_sum", "tokens"), "entropy_pg": MeanOf("entropy_pg_sum", "pg_tokens"),
        "entropy_fkl": MeanOf("entropy_fkl_sum", "fkl_tokens"), "entropy_rkl": MeanOf("entropy_rkl_sum", "rkl_tokens"),
        "kl_fkl": MeanOf("kl_fkl_sum", "fkl_tokens"), "kl_rkl": MeanOf("kl_rkl_sum", "rkl_tokens"),
        "frac_pg": MeanOf("pg_tokens", "tokens"), "frac_fkl": MeanOf("fkl_tokens", "tokens"),
        "frac_rkl": MeanOf("rkl_tokens", "tokens"), "clip_frac": MeanOf("clipped_tokens", "tokens"),
        "logprob_mismatch": MeanOf("logprob_mismatch_sum", "tokens"),
        "approx_kl": MeanOf("approx_kl_sum", "tokens"),
    }

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def __call__(self, stats: TokenStats, *, old_logprob: torch.Tensor | None, advantages: torch.Tensor,
                 routes: torch.Tensor, response_index: torch.Tensor, response_lengths: torch.Tensor,
                 loss_mask: torch.Tensor, kl_rows: torch.Tensor, kl_weight: float, num_tokens: float | None = None,
                 num_responses: float | None = None, sampler_logprob: torch.Tensor | None = None,
                 check_values: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss scalar and its metrics.

        stats: token_stats of the student rows: logprob [T], entropy [T], kl [K] (kl[k] is D of row kl_rows[k]).
        old_logprob [T]: log p_old (the sampler's, or recomputed; None = this forward's log-prob, detached: ratio
        1); advantages [T]: each token's response advantage; routes [T] int Route ids; response_index [T] int in
        [0, R): the response of each token; response_lengths [R]: |y| (response tokens); loss_mask [T]: 1 on
        response tokens; kl_rows [K]: exactly the positions with route FKL/RKL, ascending; kl_weight: lambda_k in
        [0, w0]; num_tokens / num_responses: global-batch counts (default: local); sampler_logprob [T]: the
        sampler's log-probs, for the `logprob_mismatch` metric (default: old_logprob).
        check_values: also run the checks that read tensor values (host syncs: route ids, kl_rows = the span
        positions, response indices/lengths); the trainer's hot path turns them off and runs them once per step
        under loss.check_values (see `rows`).
        """
        if stats.logprob.dim() != 1:
            raise ValueError(f"stats.logprob must be [T], got shape {tuple(stats.logprob.shape)}")
        if stats.kl.dim() != 1:
            raise ValueError(f"stats.kl must be [K], got shape {tuple(stats.kl.shape)}")
        _check_1d("kl_rows", kl_rows, stats.kl.shape[0])
        rows = self.rows(num_rows=stats.logprob.shape[0], old_logprob=old_logprob, advantages=advantages,
                         routes=routes, response_index=response_index, response_lengths=response_lengths,
                         loss_mask=loss_mask, kl_rows=kl_rows, kl_weight=kl_weight, num_tokens=num_tokens,
                         num_responses=num_responses, sampler_logprob=sampler_logprob, check_values=check_values,
                         dtype=stats.logprob.dtype)
        return rows.loss(stats)

    def rows(self, *, num_rows: int, old_logprob: torch.Tensor | None, advantages: torch.Tensor,
             routes: torch.Tensor, response_index: torch.Tensor, response_lengths: torch.Tensor,
             loss_mask: torch.Tensor, kl_rows: torch.Tensor, kl_weight: float, num_tokens: float | None = None,
             num_responses: float | None = None, sampler_logprob: torch.Tensor | None = None,
             check_values: bool = True, dtype: torch.dtype = torch.float32) -> "TraceRows":
        """The loss of one micro-batch before its token statistics exist (arguments as __call__, num_rows = T):
        its per-row weights, as a TraceRows whose `loss(stats)` is __call__'s result and whose `row_loss()` feeds
        the fused output layer's gradient-in-forward (loss/fused_output.fused_output_loss)."""
        cfg = self.cfg
        T = num_rows
        if cfg.tis_cap is not None and sampler_logprob is None:
            raise ValueError("cfg.tis_cap needs sampler_logprob (the rollout engine's log-probs)")
        if sampler_logprob is None:
            if old_logprob is None:
                raise ValueError("sampler_logprob is needed when old_logprob is None (this forward's log-prob)")
            sampler_logprob = old_logprob
        for name, t in (("old_logprob", old_logprob), ("advantages", advantages), ("routes", routes),
                        ("response_index", response_index), ("loss_mask", loss_mask),
                        ("sampler_logprob", sampler_logprob)):
            if t is not None or name != "old_logprob":
                _check_1d(name, t, T)
        if response_lengths.dim() != 1:
            raise ValueError(f"response_lengths must be [R], got shape {tuple(response_lengths.shape)}")
        R = response_lengths.shape[0]
        if kl_rows.dim() != 1:
            raise ValueError(f"kl_rows must be [K], got shape {tuple(kl_rows.shape)}")
        if not 0.0 <= kl_weight <= cfg.w0:
            raise ValueError(f"kl_weight={kl_weight} must be in [0, w0={cfg.w0}] (span tokens' GRPO weight would "
                             f"be negative)")
        mask = loss_mask.to(dtype)
        in_response = loss_mask > 0
        if cfg.mode == "grpo":
            span = torch.zeros_like(in_response)
            is_fkl = is_rkl = span
        else:
            is_fkl = routes == int(Route.FKL)
            is_rkl = routes == int(Route.RKL)
            span = is_fkl | is_rkl
        if check_values:
            self.check_values(routes=routes, response_index=response_index, response_lengths=response_lengths,
                              in_response=in_response, span=span, kl_rows=kl_rows, kl_weight=kl_weight)

        n_tokens = float(mask.sum()) if num_tokens is None else float(num_tokens)
        n_responses = float(R) if num_responses is None else float(num_responses)
        if n_tokens <= 0 or n_responses <= 0:
            raise ValueError(f"num_tokens and num_responses must be positive, got {n_tokens}, {n_responses}")
        # GRPO on every response token, span tokens weighted per loss.pg_on_kl_tokens (anneal: 1 - lambda_k / w0;
        # with w0 = 0 there is no KL channel, lambda_k is always 0, and every token keeps weight 1).
        span_scale = pg_weight_on_kl_tokens(kl_weight, cfg.w0, cfg.pg_on_kl_tokens)
        weight = torch.where(span, torch.full_like(mask, span_scale), torch.ones_like(mask)) * mask
        use_kl = cfg.mode != "grpo" and kl_rows.shape[0] > 0
        # KL on span tokens: lambda_k * sum_y (1/|y|) sum_{t in S_y} D_t / num_responses, one weight per KL row
        inv_len = 1.0 / response_lengths.to(dtype)[response_index[kl_rows]] if use_kl else None
        return TraceRows(cfg=cfg, kl_weight=float(kl_weight), n_tokens=n_tokens, n_responses=n_responses,
                         weight=weight, mask=mask, in_response=in_response, span=span, is_fkl=is_fkl,
                         is_rkl=is_rkl, kl_rows=kl_rows, use_kl=use_kl, inv_len=inv_len, old_logprob=old_logprob,
                         advantages=advantages, sampler_logprob=sampler_logprob)

    def check_values(self, *, routes, response_index, response_lengths, in_response, span, kl_rows,
                     kl_weight) -> None:
        """The checks that read tensor values (host syncs): route ids, response indices and lengths, span routes
        inside the loss mask, kl_rows = the span positions in order, all-token routing."""
        cfg = self.cfg
        R = response_lengths.shape[0]
        if response_index.numel() and bool(((response_index < 0) | (response_index >= R)).any()):
            raise ValueError(f"response_index must be in [0, R={R})")
        if R and bool((response_lengths <= 0).any()):
            raise ValueError("response_lengths must be positive")
        if bool(((routes < int(Route.PG)) | (routes > int(Route.RKL))).any()):
            raise ValueError(f"routes must hold Route ids {[int(r) for r in Route]}")
        if cfg.mode == "grpo":
            return
        if bool((span & ~in_response).any()):
            raise ValueError("span routes (FKL/RKL) on tokens outside the loss mask")
        expected_rows = span.nonzero().squeeze(-1)
        if expected_rows.shape != kl_rows.shape or not torch.equal(expected_rows, kl_rows.to(expected_rows)):
            raise ValueError(f"kl_rows must be exactly the FKL/RKL positions in order: {expected_rows.numel()} "
                             f"span tokens, {kl_rows.numel()} kl_rows")
        # once annealed (lambda_k = 0) the baseline is GRPO on every token and the trainer stops routing spans
        if cfg.mode == "all_token_opd" and kl_weight > 0 and bool((in_response & ~span).any()):
            raise ValueError("mode all_token_opd: every response token must be routed FKL/RKL "
                             "(use all_token_routes)")


@dataclass
class TraceRows:
    """The routed loss of one micro-batch as a sum over rows (TraceLoss.rows): each token's PG term depends on its
    own log-prob only, each KL row's term is a fixed weight times its KL, and nothing in the loss has an entropy
    gradient -- which is what lets the fused output layer form the gradient in its forward pass.

    weight [T]: each token's PG weight (mask x span scale); inv_len [K] (None without KL): 1 / |y| of each KL
    row's response; old_logprob [T] or None (this forward's log-prob, detached).
    """

    cfg: LossConfig
    kl_weight: float
    n_tokens: float
    n_responses: float
    weight: torch.Tensor
    mask: torch.Tensor
    in_response: torch.Tensor
    span: torch.Tensor
    is_fkl: torch.Tensor
    is_rkl: torch.Tensor
    kl_rows: torch.Tensor
    use_kl: bool
    inv_len: Optional[torch.Tensor]
    old_logprob: Optional[torch.Tensor]
    advantages: torch.Tensor
    sampler_logprob: torch.Tensor

    def _old(self, logprob: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return logprob.detach() if self.old_logprob is None else self.old_logprob[s:e]

    def pg_terms(self, logprob: torch.Tensor, s: int = 0, e: int | None = None):
        """Weighted clipped-surrogate terms of rows s:e (logprob [n] their log-probs; not yet divided by the token
        count) and the clip mask: ([n], [n] bool)."""
        e = self.weight.shape[0] if e is None else e
        cfg = self.cfg
        old = self._old(logprob, s, e)
        per_token, clipped = clipped_surrogate(logprob, old, self.advantages[s:e], eps_low=cfg.eps_low,
                                               eps_high=cfg.eps_high)
        if cfg.tis_cap is not None:  # truncated importance weights for the sampler/trainer mismatch
            per_token = per_token * truncated_is_weights(old, self.sampler_logprob[s:e], cfg.tis_cap)
        weight = self.weight[s:e]
        # where(), not a product, so garbage (even NaN) on masked-out positions cannot leak into the loss.
        return torch.where(weight != 0, per_token * weight, torch.zeros_like(per_token)), clipped

    def kl_coef(self) -> torch.Tensor | None:
        """[K] weight of each KL row in the loss (lambda_k / |y| / num_responses), None without KL."""
        return self.kl_weight * self.inv_len / self.n_responses if self.use_kl else None

    def row_loss(self):
        """This loss as a RowLoss (loss/fused_output.py): the same value and gradient as `loss`."""
        from megatron_trace.loss.fused_output import RowLoss

        return RowLoss(student=lambda logprob, entropy, s, e: self.pg_terms(logprob, s, e)[0] / self.n_tokens,
                       kl_coef=self.kl_coef())

    def loss(self, stats: TokenStats) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of the token statistics (TraceLoss.__call__)."""
        logprob, entropy, kl = stats.logprob, stats.entropy, stats.kl
        T = self.weight.shape[0]
        for name, t in (("stats.logprob", logprob), ("stats.entropy", entropy)):
            _check_1d(name, t, T)
        _check_1d("stats.kl", kl, self.kl_rows.shape[0])
        terms, clipped = self.pg_terms(logprob)
        pg_loss = terms.sum() / self.n_tokens
        if self.use_kl:
            kl_loss = self.kl_weight * (kl * self.inv_len.to(kl.dtype)).sum() / self.n_responses
        else:
            kl_loss = pg_loss.new_zeros(())
        loss = pg_loss + kl_loss
        return loss, self.metrics(stats, loss, pg_loss, kl_loss, clipped)

    def metrics(self, stats: TokenStats, loss, pg_loss, kl_loss, clipped) -> dict[str, torch.Tensor]:
        """The micro-batch's metrics: 0-d detached tensors (TraceLoss.reductions)."""
        with torch.no_grad():
            logprob = stats.logprob.detach()
            kl_d = stats.kl.detach()
            ent = stats.entropy.detach()
            zero = ent.new_zeros(())
            in_response, span, is_fkl, is_rkl = self.in_response, self.span, self.is_fkl, self.is_rkl
            fkl_rows = is_fkl[self.kl_rows] if self.use_kl else None
            pg_tokens = in_response & ~span
            tokens = in_response.sum().to(ent.dtype)
            n_fkl, n_rkl = is_fkl.sum().to(ent.dtype), is_rkl.sum().to(ent.dtype)
            old = logprob if self.old_logprob is None else self.old_logprob

            def masked_sum(x, m):  # where(), not boolean indexing: no host sync for the selected count
                return torch.where(m, x, torch.zeros_like(x)).sum()

            return {
                "tokens": tokens, "pg_tokens": pg_tokens.sum().to(ent.dtype), "fkl_tokens": n_fkl,
                "rkl_tokens": n_rkl, "span_tokens": n_fkl + n_rkl,
                "clipped_tokens": (clipped & in_response).sum().to(ent.dtype),
                "loss": loss.detach(), "pg_loss": pg_loss.detach(), "kl_loss": kl_loss.detach(),
                "kl_weight": torch.full((), float(self.kl_weight), dtype=ent.dtype, device=ent.device),
                "kl_fkl_sum": masked_sum(kl_d, fkl_rows) if self.use_kl else zero,
                "kl_rkl_sum": masked_sum(kl_d, ~fkl_rows) if self.use_kl else zero,
                "entropy_sum": ent.sum(), "entropy_pg_sum": masked_sum(ent, pg_tokens),
                "entropy_fkl_sum": masked_sum(ent, is_fkl), "entropy_rkl_sum": masked_sum(ent, is_rkl),
                "logprob_mismatch_sum": (logprob - self.sampler_logprob).abs().sum(),
                "approx_kl_sum": (approx_kl_terms(logprob, old) * self.mask).sum(),
            }


class ExposureTracker:
    """Running privileged-gradient exposure  E_k = sum_{j <= k} lambda_j^2 * (span tokens_j / response tokens_j).

    lambda_j * span_fraction_j is the share of step j's token objective driven by the privileged teacher; squaring
    lambda makes E measure accumulated gradient *energy* (the KL gradient scales with lambda, its squared norm with
    lambda^2), a single number to compare runs that differ in schedule, coverage or route (all-token OPD has span
    fraction 1, plain GRPO 0). Call `update` once per optimizer step with the step's global-batch counts.
    """

    def __init__(self) -> None:
        self.value = 0.0
        self.steps = 0

    def update(self, kl_weight: float, span_tokens: float, tokens: float) -> float:
        if tokens <= 0:
            raise ValueError(f"tokens must be positive, got {tokens}")
        if not 0 <= span_tokens <= tokens:
            raise ValueError(f"span_tokens={span_tokens} must be in [0, tokens={tokens}]")
        self.value += float(kl_weight) ** 2 * float(span_tokens) / float(tokens)
        self.steps += 1
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.steps = int(state["steps"])


def all_token_routes(loss_mask: torch.Tensor, correct: bool, *, reverse_on_incorrect: bool = False) -> torch.Tensor:
    """Routes of the all-token self-distillation baseline for one response: every response token (loss_mask [L]
    nonzero) is FKL; with `reverse_on_incorrect`, tokens of an incorrect response are RKL instead. Returns [L]."""
    if loss_mask.dim() != 1:
        raise ValueError(f"loss_mask must be [L], got shape {tuple(loss_mask.shape)}")
    every = loss_mask.bool()
    if correct or not reverse_on_incorrect:
        return routes_from_spans(every, True, fkl=True)
    return routes_from_spans(every, False, rkl=True)


def random_span_routes(span_mask: torch.Tensor, correct: bool, *, loss_mask: torch.Tensor | None = None,
                       fkl: bool = True, rkl: bool = False) -> torch.Tensor:
    """Routes of the random-span baseline for one response: `span_mask` [L] holds random spans with the
    annotator's coverage (megatron_trace.annotate); routing is as for annotator spans. Returns [L]."""
    if span_mask.dim() != 1:
        raise ValueError(f"span_mask must be [L], got shape {tuple(span_mask.shape)}")
    if loss_mask is not None:
        if loss_mask.shape != span_mask.shape:
            raise ValueError(f"loss_mask {tuple(loss_mask.shape)} and span_mask {tuple(span_mask.shape)} differ")
        if bool((span_mask.bool() & ~loss_mask.bool()).any()):
            raise ValueError("random spans cover tokens outside the response (loss_mask)")
    return routes_from_spans(span_mask.bool(), correct, fkl=fkl, rkl=rkl)
