"""Learner-side losses: pure functions of tensors (torch only).

Every loss has the shape ``fn(inputs, *, hyperparams) -> LossOut``. A ``LossOut`` holds the
loss as named ``Term``s, each a (sum, count) pair: the sum carries grad, the count is the number
of units the term averages over (tokens, rows, pairs, gated tokens). Sums and counts are both
additive over micro-batches and ranks, so the learner can normalise every term by its *global*
count and get exactly the loss of one pass over the whole batch, however the batch was split
(a mean of per-micro-batch means is not that: it re-weights micro-batches). ``metrics`` maps
namespaced names to detached 0-d tensors (local to the call).

For one batch in one call a ``LossOut`` reads as the pair ``(loss, metrics)``:
``loss, metrics = grpo_loss(inp)``.

No config objects, no ``torch.distributed``, no logging: the learner owns all of that.
Shapes: B responses, T response positions (padded), K teacher top-k ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from protege.core.logprobs import tail_logprob  # shared with the teacher scorer, which computes the tail it sends

Metrics = dict[str, Tensor]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
# How the teacher's distribution reaches the loss (see dense_divergence):
#   sampled     — log π_T of the sampled token only (reverse KL, importance-weighted estimate)
#   topk        — the teacher's top-k log-probs plus one bucket for the rest of the vocabulary
#   topk_renorm — the top-k log-probs renormalised over K (KEPO's released approximation)
#   full        — whole rows over the vocabulary (exact)
ESTIMATORS = ("sampled", "topk", "topk_renorm", "full")

# exp() of a larger log-ratio overflows float32 and turns masked-out gradients into inf*0 = NaN.
# Tokens that far from 1 are clipped anyway; verl uses the same bound.
_MAX_LOG_RATIO = 20.0


@dataclass
class LossInputs:
    """Per-token inputs of the policy losses. Only ``logprobs`` and ``student_topk_logprobs``
    carry grad: every other tensor is a constant of the objective and is detached here, so a
    caller that passes a tensor still attached to a graph cannot send gradient into π_old, the
    reference or the teacher. Padded positions must hold finite values (they are multiplied by
    mask 0)."""

    logprobs: Tensor  # [B, T] log πθ(y_t|s_t) of the sampled tokens; carries grad
    old_logprobs: Tensor  # [B, T] log π_old of the same tokens (recomputed by the learner)
    mask: Tensor  # [B, T] float, 1.0 on response tokens, 0.0 on padding
    advantages: Tensor  # [B] (broadcast over T) or [B, T]
    ref_logprobs: Tensor | None = None  # [B, T] log π_ref; needed when kl_coef > 0
    teacher_logprobs: Tensor | None = None  # [B, T] log π_T of the sampled token (RLAD, OPD, KEPO)
    student_topk_logprobs: Tensor | None = None  # [B, T, K] log πθ at the teacher's top-k ids; grad
    teacher_topk_logprobs: Tensor | None = None  # [B, T, K] log π_T at its top-k ids
    teacher_tail_logprobs: Tensor | None = None  # [B, T] log(1 − Σ_k π_T), computed by the teacher in fp32
    student_full_logprobs: Tensor | None = None  # [B, T, V] log πθ over the vocabulary; grad
    teacher_full_logprobs: Tensor | None = None  # [B, T, V] log π_T over the vocabulary
    gate: Tensor | None = None  # [B] float/bool, 1 = response passes the KEPO quality gate
    behaviour_logprobs: Tensor | None = None  # [B, T] log π of the policy that sampled (the rollout engine's)
    ref_seq_logprobs: Tensor | None = None  # [B] a reference's sequence log-probs given whole (DPO, teacher reference)
    weight: Tensor | None = None  # [B] 1 = real row, 0 = padding row (kept for the collectives)

    def __post_init__(self) -> None:
        shape = self.logprobs.shape
        if self.logprobs.dim() != 2:
            raise ValueError(f"logprobs must be [B, T], got {tuple(shape)}.")
        for name in ("old_logprobs", "mask", "ref_logprobs", "teacher_logprobs", "behaviour_logprobs"):
            t = getattr(self, name)
            if t is not None and t.shape != shape:
                raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}.")
        if self.advantages.shape not in (shape[:1], shape):
            raise ValueError(f"advantages must be [B] or [B, T] = {tuple(shape)}, got {tuple(self.advantages.shape)}.")
        for name in (
            "student_topk_logprobs",
            "teacher_topk_logprobs",
            "student_full_logprobs",
            "teacher_full_logprobs",
        ):
            t = getattr(self, name)
            if t is not None and (t.dim() != 3 or t.shape[:2] != shape):
                raise ValueError(f"{name} must be [B, T, K] with [B, T] = {tuple(shape)}.")
        if self.teacher_tail_logprobs is not None and self.teacher_tail_logprobs.shape != shape:
            raise ValueError(f"teacher_tail_logprobs must have shape {tuple(shape)}.")
        for name in ("gate", "ref_seq_logprobs", "weight"):
            t = getattr(self, name)
            if t is not None and t.shape != shape[:1]:
                raise ValueError(f"{name} must be [B] = [{shape[0]}], got {tuple(t.shape)}.")
        for name in _CONSTANTS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.detach())
        self.mask = self.mask.to(self.logprobs.dtype)


_CONSTANTS = (
    "old_logprobs",
    "mask",
    "advantages",
    "ref_logprobs",
    "teacher_logprobs",
    "teacher_topk_logprobs",
    "teacher_tail_logprobs",
    "teacher_full_logprobs",
    "gate",
    "behaviour_logprobs",
    "ref_seq_logprobs",
    "weight",
)


@dataclass(frozen=True)
class Term:
    """One additive piece of a loss: ``coef · sum / count``. ``sum`` carries grad; ``count`` is
    the number of units it averages over. Both add up over micro-batches and ranks."""

    sum: Tensor  # []
    count: Tensor  # [] float
    coef: float = 1.0


@dataclass
class LossOut:
    """A loss as named terms plus its metrics; see the module docstring."""

    terms: dict[str, Term]
    metrics: Metrics = field(default_factory=dict)

    def normalised(self, counts: Mapping[str, Tensor] | None = None) -> Tensor:
        """Σ coef · sum / count over the terms, with each term's own count, or the given
        (global) ones. A count of 0 divides by 1: its sum is then 0 with the graph intact."""
        total = None
        for name, t in self.terms.items():
            c = t.count if counts is None else counts[name]
            v = t.sum / _nonzero(torch.as_tensor(c, dtype=t.sum.dtype, device=t.sum.device)) * t.coef
            total = v if total is None else total + v
        return total

    @property
    def value(self) -> Tensor:
        return self.normalised()

    def counts(self) -> dict[str, Tensor]:
        return {name: t.count.detach() for name, t in self.terms.items()}

    def scaled(self, coef: float) -> LossOut:
        return LossOut({n: replace(t, coef=t.coef * coef) for n, t in self.terms.items()}, self.metrics)

    # The pair view, for a batch trained in one call: ``loss, metrics = fn(...)``.
    def __iter__(self):
        return iter((self.value, self.metrics))

    def __getitem__(self, i: int):
        return (self.value, self.metrics)[i]


def _nonzero(x: Tensor) -> Tensor:
    # Denominator guard: where the count is 0 the numerator is a sum of L*0, so dividing by 1
    # gives 0 with the graph intact (dividing by 0 would give NaN forward and backward).
    return torch.where(x > 0, x, torch.ones_like(x))


def aggregate(
    per_token: Tensor,  # [B, T]
    mask: Tensor,  # [B, T]
    mode: str,
    *,
    max_len: int | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    dp_size: int = 1,
) -> Tensor:  # []
    """Reduce a per-token loss to a scalar (verl ``agg_loss`` names).

    - "token-mean": Σ L·m / Σ m over the whole batch (DAPO).
    - "seq-mean-token-mean": mean over rows with ≥1 token of each row's token mean (GRPO
      Eq. 1); rows with no tokens are left out of the mean, not counted as NaN or 0.
    - "seq-mean-token-sum-norm": Σ L·m / (B·max_len), max_len defaulting to T (Dr. GRPO);
      pass the generation limit as max_len for Dr. GRPO's true constant.
    An all-masked input gives exactly 0 with the graph intact.

    Data-parallel use: pass the count over all ranks (``global_tokens`` for token-mean,
    ``global_seqs`` for the sequence modes) and ``dp_size``; the result is multiplied by
    dp_size because DDP/ZeRO average gradients over ranks, so the per-rank losses then sum to
    the global loss, whatever the split of tokens between ranks.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"Unknown loss_agg mode {mode!r}; valid modes: {', '.join(AGG_MODES)}.")
    if global_tokens is not None and mode != "token-mean":
        raise ValueError("global_tokens applies to loss_agg 'token-mean' only; use global_seqs.")
    if global_seqs is not None and mode == "token-mean":
        raise ValueError("global_seqs applies to the seq-mean modes only; use global_tokens.")
    mask = mask.to(per_token.dtype)
    weighted = per_token * mask
    if mode == "token-mean":
        denom = mask.sum() if global_tokens is None else per_token.new_tensor(float(global_tokens))
        loss = weighted.sum() / _nonzero(denom)
    elif mode == "seq-mean-token-mean":
        tokens = mask.sum(dim=-1)  # [B]
        row_mean = weighted.sum(dim=-1) / _nonzero(tokens)  # empty rows: 0/1 = 0
        if global_seqs is None:
            n = (tokens > 0).sum().to(per_token.dtype)
        else:
            n = per_token.new_tensor(float(global_seqs))
        loss = row_mean.sum() / _nonzero(n)
    else:
        length = per_token.shape[-1] if max_len is None else max_len
        n = per_token.shape[0] if global_seqs is None else global_seqs
        loss = weighted.sum() / max(float(n) * length, 1.0)
    return loss * dp_size


def term(per_token: Tensor, mask: Tensor, mode: str, *, max_len: int | None = None, coef: float = 1.0) -> Term:
    """``aggregate`` as an additive (sum, count) pair: sum / count is aggregate's value on this
    input, and the pairs of any split of the rows add up to the pair of the whole.

    - "token-mean": (Σ L·m, Σ m).
    - "seq-mean-token-mean": (Σ over rows of each row's token mean, rows with ≥1 token).
    - "seq-mean-token-sum-norm": (Σ L·m, rows with ≥1 token × max_len). Rows without tokens
      are padding here and are not counted (aggregate counts every row), so the learner must
      pass the generation limit as max_len: the padded width T differs between micro-batches.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"Unknown loss_agg mode {mode!r}; valid modes: {', '.join(AGG_MODES)}.")
    mask = mask.to(per_token.dtype)
    weighted = per_token * mask
    if mode == "token-mean":
        return Term(weighted.sum(), mask.sum().detach(), coef)
    tokens = mask.sum(dim=-1)
    rows = (tokens > 0).to(per_token.dtype).sum().detach()
    if mode == "seq-mean-token-mean":
        return Term((weighted.sum(dim=-1) / _nonzero(tokens)).sum(), rows, coef)
    length = per_token.shape[-1] if max_len is None else max_len
    return Term(weighted.sum(), rows * float(length), coef)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Detached token-mean, for metrics."""
    return aggregate(x.detach().to(mask.dtype), mask, "token-mean")


def _ratio(log_ratio: Tensor) -> Tensor:
    return log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL(πθ||π_ref) estimate from the sampled token (Schulman's k1/k2/k3, verl names).

    k1 = logp − ref; k2 = ½(logp − ref)²; k3 = exp(ref − logp) − (ref − logp) − 1, the
    non-negative estimator of DeepSeekMath. k3 is clamped to [−10, 10] as verl's
    ``low_var_kl`` (and its exponent to ±20) so one outlier token cannot dominate the loss.
    """
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        neg = (-diff).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return (neg.exp() - neg - 1).clamp(-10.0, 10.0)
    raise ValueError(f"Unknown kl_estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}.")


def clipped_surrogate(
    log_ratio: Tensor,  # [B, T] log ρ
    adv: Tensor,  # [B, 1] or [B, T]
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, Tensor]:  # ([B, T] per-token loss, [B, T] bool clipped)
    """PPO clipped surrogate with decoupled bounds: −min(ρA, clip(ρ, 1−eps_low, 1+eps_high)A).

    ``clipped`` marks tokens where the clipped term is strictly smaller, i.e. it is the one
    selected and the token gets no gradient (same test as verl's ``pg_clipfrac``).
    """
    ratio = _ratio(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    is_clipped = clipped < unclipped
    # where() rather than minimum(): minimum() splits the gradient between equal branches.
    return -torch.where(is_clipped, clipped, unclipped), is_clipped


def tis_weights(inp: LossInputs, cap: float | None) -> tuple[Tensor | None, Metrics]:
    """Truncated importance sampling against the behaviour policy (Yao et al. 2025, "Your efficient
    RL framework secretly brings you off-policy RL training"; Espeholt et al. 2018's truncation):
    per token w = min(π_old / π_behaviour, cap), a constant multiplying the per-token loss.

    Rollouts generated one step behind (max_staleness ≥ 1), or by an engine whose numerics differ
    from the learner's, are not samples of π_old; the PPO ratio is taken against π_old, so without
    w the update is biased towards what the stale policy liked. Truncating at ``cap`` bounds the
    variance. Metrics: the raw ratio's mean and the fraction of tokens truncated.
    """
    if cap is None or inp.behaviour_logprobs is None:
        return None, {}
    if cap <= 0:
        raise ValueError(f"tis cap must be positive, got {cap}.")
    raw = _ratio(inp.old_logprobs - inp.behaviour_logprobs)
    m = inp.mask
    return raw.clamp(max=cap), {
        "tis/ratio_mean": _masked_mean(raw, m),
        "tis/truncated_frac": _masked_mean(raw > cap, m),
    }


def _pg_loss(
    inp: LossInputs,
    log_ratio: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    loss_agg: str,
    max_len: int | None,
    kl_coef: float,
    kl_estimator: str,
    tis_cap: float | None = None,
    gate_log_ratio: Tensor | None = None,
) -> LossOut:
    """The clipped policy-gradient loss shared by GRPO and RLAD; they differ only in log ρ, or
    (``gate_log_ratio``, RLAD's gate variant) in a second ratio that only decides which tokens
    are clipped."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"Unknown kl_estimator {kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}.")
    if kl_coef > 0 and inp.ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs in LossInputs (the reference policy pass).")
    adv = inp.advantages.detach()
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    pg, is_clipped = clipped_surrogate(log_ratio, adv, eps_low, eps_high)
    gated = None
    if gate_log_ratio is not None:  # a token the gate's ratio clips keeps its value, not its gradient
        gated = clipped_surrogate(gate_log_ratio, adv, eps_low, eps_high)[1]
        pg = torch.where(gated, pg.detach(), pg)
        is_clipped = is_clipped | gated
    per_token, kl = pg, None
    if inp.ref_logprobs is not None:
        # Without a penalty the KL is still reported, computed off the graph.
        logp = inp.logprobs if kl_coef > 0 else inp.logprobs.detach()
        kl = kl_penalty(logp, inp.ref_logprobs, kl_estimator)
        if kl_coef > 0:
            per_token = pg + kl_coef * kl
    w, tis_metrics = tis_weights(inp, tis_cap)
    if w is not None:
        per_token = per_token * w
    m = inp.mask
    pg_term = term(per_token, m, loss_agg, max_len=max_len)
    zero = pg_term.sum.new_zeros(()).detach()
    metrics = {
        "loss/pg": aggregate(pg.detach(), m, loss_agg, max_len=max_len),
        "loss/kl": zero if kl is None else aggregate(kl.detach(), m, loss_agg, max_len=max_len),
        "loss/clip_frac": _masked_mean(is_clipped, m),
        "loss/ratio_mean": _masked_mean(_ratio(log_ratio.detach()), m),
        # verl's ppo_kl: mean of (old − logp), the drift since rollout.
        "loss/approx_kl_old": _masked_mean(inp.old_logprobs - inp.logprobs, m),
        **tis_metrics,
    }
    if gated is not None:
        metrics["loss/gated_frac"] = _masked_mean(gated, m)
    return LossOut({"pg": pg_term}, metrics)


def grpo_loss(
    inp: LossInputs,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    loss_agg: str = "token-mean",
    max_len: int | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    tis_cap: float | None = None,
) -> LossOut:
    """GRPO: PPO-clipped ratio ρ = πθ/π_old times a group-relative advantage, plus an optional
    KL-to-reference loss term. DeepSeekMath (arXiv 2402.03300) Eq. for J_GRPO.

    Deviations from DeepSeekMath, all selectable:
    - Decoupled clip bounds eps_low/eps_high (DAPO clip-higher, arXiv 2503.14476); the
      defaults 0.2/0.28 are DAPO's. eps_low == eps_high gives the symmetric PPO clip.
    - Default aggregation "token-mean" (DAPO) instead of the paper's 1/|o_i| per sequence
      ("seq-mean-token-mean"); "seq-mean-token-sum-norm" with max_len is Dr. GRPO
      (arXiv 2503.20783), combined with group_advantages(std_norm=False).
    - KL weight defaults to 0 (DAPO, Dr. GRPO); DeepSeekMath used 0.04 with k3. k3 is
      clamped to [−10, 10] as in verl.
    - log ρ is clamped to ±20 before exp() for float safety; no dual-clip.
    - The advantage is an input (see advantages.py); [B, T] advantages allow process rewards.
    - ``tis_cap``: truncated importance weights against the behaviour policy (tis_weights),
      for rollouts one step stale; off (None) by default here.
    """
    return _pg_loss(
        inp,
        inp.logprobs - inp.old_logprobs,
        eps_low=eps_low,
        eps_high=eps_high,
        loss_agg=loss_agg,
        max_len=max_len,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        tis_cap=tis_cap,
    )


def rlad_loss(
    inp: LossInputs,
    *,
    alpha: float = 0.5,
    clamp: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    loss_agg: str = "token-mean",
    max_len: int | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    tis_cap: float | None = None,
    trust_region: str = "ratio",
) -> LossOut:
    """RLAD / TRRD (arXiv 2602.22495): GRPO with the trust-region ratio anchored to a mix of
    π_old and the teacher, per sampled token:

        log ρ = α(log πθ − log π_old) + (1−α)·clamp(log πθ − log π_T, −c, c)

    Eq. 3 with the Appendix B clamp (c = 1). α = 1 is plain GRPO: the teacher term is then
    not computed at all, so loss and gradients equal grpo_loss bit for bit. The v2 paper's
    §4.1 says the reverse ("α=0 recovers GRPO"); that contradicts Eq. 3 and Appendix C, and
    we follow Eq. 3.

    The trust region only acts when θ moves away from π_old within a batch, i.e. with several
    updates per rollout batch (learner.updates_per_step > 1 or learner.mini_batches > 1, as the
    paper's PPO setup runs). With one update, every token is at θ = π_old, the first factor is 1
    and the loss only re-weights the GRPO gradient: a weak student's correct but improbable
    tokens (log πθ − log π_T ≤ −c, clamp active, so only the α term carries gradient) get weight
    α·e^{−c(1−α)} ≈ 0.30 (c = 1, α = 0.5), while tokens it is already sure of keep ≈ 1. That is
    rich-get-richer: entropy collapses and groups go all-equal, so use several updates per batch.

    Deviations: aggregation defaults to "token-mean" (Eq. 4 writes seq-mean-token-mean;
    select it with loss_agg); the KL-to-reference weight β, never given in the paper,
    defaults to 0; the clamp is a plain clamp, so outside ±c the teacher term passes no
    gradient and the update is scaled by α; log ρ is clamped to ±20 before exp().

    ``trust_region="gate"`` is our variant, not the paper's objective: GRPO's ratio πθ/π_old
    carries the gradient (with its own clip), and the TRRD ratio above only decides which tokens
    are clipped as well. At θ = π_old that is GRPO's gradient without the tokens TRRD's region
    excludes: with A > 0, tokens the student rates above the teacher, log πθ − log π_T >
    ln(1+ε_high)/(1−α) (0.49 at the defaults); with A < 0, tokens it rates below the teacher,
    log πθ − log π_T < ln(1−ε_low)/(1−α) (−0.45). So no re-weighting of improbable correct
    tokens, only "do not reward what the teacher rejects, do not punish what it favours".
    """
    if trust_region not in ("ratio", "gate"):
        raise ValueError(f"trust_region must be 'ratio' or 'gate', got {trust_region!r}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if clamp <= 0:
        raise ValueError(f"clamp must be positive, got {clamp}.")
    teacher = inp.teacher_logprobs
    if alpha == 1.0:
        log_ratio = inp.logprobs - inp.old_logprobs  # exactly grpo_loss's expression
    else:
        if teacher is None:
            raise ValueError("rlad_loss with alpha < 1 needs teacher_logprobs in LossInputs.")
        teacher_lr = (inp.logprobs - teacher).clamp(-clamp, clamp)
        log_ratio = alpha * (inp.logprobs - inp.old_logprobs) + (1.0 - alpha) * teacher_lr
    gate = None
    if trust_region == "gate" and alpha < 1.0:
        log_ratio, gate = inp.logprobs - inp.old_logprobs, log_ratio.detach()
    out = _pg_loss(
        inp,
        log_ratio,
        gate_log_ratio=gate,
        eps_low=eps_low,
        eps_high=eps_high,
        loss_agg=loss_agg,
        max_len=max_len,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        tis_cap=tis_cap,
    )
    metrics = out.metrics
    if teacher is None:
        metrics["rlad/teacher_logratio_mean"] = metrics["rlad/clamp_frac"] = inp.mask.new_zeros(())
    else:
        gap = (inp.logprobs - teacher).detach()
        metrics["rlad/teacher_logratio_mean"] = _masked_mean(gap, inp.mask)
        metrics["rlad/clamp_frac"] = _masked_mean(gap.abs() > clamp, inp.mask)
    return out


def _categorical_divergence(s: Tensor, t: Tensor, divergence: str, jsd_beta: float) -> Tensor:
    """Divergence between two categoricals given as log-probs over the same buckets [..., N]."""
    if divergence == "reverse_kl":  # KL(S||T)
        return (s.exp() * (s - t)).sum(-1)
    if divergence == "forward_kl" or jsd_beta == 0.0:  # KL(T||S); TRL endpoint β=0
        return (t.exp() * (t - s)).sum(-1)
    if jsd_beta == 1.0:  # TRL endpoint: β=1 → KL(S||T)
        return (s.exp() * (s - t)).sum(-1)
    log_m = torch.logaddexp(t + math.log(jsd_beta), s + math.log1p(-jsd_beta))
    kl_t = (t.exp() * (t - log_m)).sum(-1)
    kl_s = (s.exp() * (s - log_m)).sum(-1)
    return jsd_beta * kl_t + (1.0 - jsd_beta) * kl_s


def dense_divergence(inp: LossInputs, divergence: str, estimator: str, jsd_beta: float = 0.5) -> Tensor:  # [B, T]
    """Per-token divergence between student and teacher from the teacher's dense signal.

    - "full": both whole rows over the vocabulary: the exact divergence.
    - "topk": the teacher's top-k ids plus one tail bucket holding the rest of the vocabulary,
      for the student (1 − Σ_k πθ) and the teacher (sent by the teacher, computed in fp32). The
      (K+1)-bucket divergence is a lower bound of the full one (a coarsening can only lose
      divergence) and equals it when the tail holds no mass; it needs K + 1 numbers per token
      instead of V.
    - "topk_renorm": both renormalised over the K ids (no tail): KEPO's released top-k
      approximation; it ignores how much mass the student puts outside the teacher's support.
    Gradients flow through the student's log-probs only. jsd is the generalised JSD(β) of GKD
    (arXiv 2306.13649) with TRL's endpoints (β=0 → KL(T||S), β=1 → KL(S||T)).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}.")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}.")
    if estimator == "full":
        if inp.student_full_logprobs is None or inp.teacher_full_logprobs is None:
            raise ValueError("estimator 'full' needs student_full_logprobs and teacher_full_logprobs.")
        s, t = inp.student_full_logprobs, inp.teacher_full_logprobs.to(inp.student_full_logprobs.dtype)
    elif estimator in ("topk", "topk_renorm"):
        if inp.student_topk_logprobs is None or inp.teacher_topk_logprobs is None:
            raise ValueError(f"estimator {estimator!r} needs student_topk_logprobs and teacher_topk_logprobs.")
        if inp.student_topk_logprobs.shape != inp.teacher_topk_logprobs.shape:
            raise ValueError("student_topk_logprobs and teacher_topk_logprobs must have the same shape.")
        s, t = inp.student_topk_logprobs, inp.teacher_topk_logprobs.to(inp.student_topk_logprobs.dtype)
        if estimator == "topk_renorm":
            s, t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        else:
            t_tail = inp.teacher_tail_logprobs if inp.teacher_tail_logprobs is not None else tail_logprob(t)
            s = torch.cat([s, tail_logprob(s)[..., None]], dim=-1)
            t = torch.cat([t, t_tail.to(s.dtype)[..., None]], dim=-1)
    else:
        raise ValueError(f"estimator {estimator!r} is not a dense one; valid: topk, topk_renorm, full.")
    return _categorical_divergence(s, t, divergence, jsd_beta)


def _distill_per_token(inp: LossInputs, divergence: str, jsd_beta: float, estimator: str = "auto") -> Tensor:
    """KEPO's distillation term per token. ``estimator`` "auto" keeps the defaults of earlier
    versions: the sampled-token estimator for reverse_kl, top-k renormalised otherwise."""
    if estimator == "auto":
        estimator = "sampled" if divergence == "reverse_kl" else "topk_renorm"
    if estimator != "sampled":
        return dense_divergence(inp, divergence, estimator, jsd_beta)
    if divergence != "reverse_kl":
        raise ValueError(f"the sampled-token estimator gives reverse_kl only, not {divergence!r}; use topk or full.")
    if inp.teacher_logprobs is None:
        raise ValueError("divergence 'reverse_kl' needs teacher_logprobs in LossInputs.")
    # KL(πθ||πT) = E_θ[log πθ − log πT] has gradient E_θ[(log πθ − log πT)·∇log πθ]
    # (the extra E_θ[∇log πθ] term is 0). Samples come from π_old, so weight by ρ = πθ/π_old:
    # ∇(ρ·sg[d]) = ρ·d·∇log πθ, and E_old[ρ·d·∇log πθ] = ∇KL. The value ρ·d is the
    # importance-weighted k1 estimate of the KL itself.
    d = (inp.logprobs - inp.teacher_logprobs).detach()
    return _ratio(inp.logprobs - inp.old_logprobs) * d


def kepo_loss(
    inp: LossInputs,
    *,
    distill_coef: float = 1.0,
    divergence: str = "reverse_kl",
    jsd_beta: float = 0.5,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    loss_agg: str = "token-mean",
    max_len: int | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    estimator: str = "auto",
    tis_cap: float | None = None,
) -> LossOut:
    """KEPO (arXiv 2602.00400; code github.com/Corleno/KEPO): GRPO plus quality-gated
    distillation. Only responses with ``inp.gate`` = 1 (reward ≥ τ, decided by the caller)
    are distilled; the term is a token-mean over their tokens:

        loss = grpo_loss + distill_coef · Σ D_t·m_t·g_b / Σ m_t·g_b

    The distillation term is its own ``Term``, so its denominator is the gated-token count of
    the whole batch however it is split into micro-batches and ranks.

    D is "reverse_kl", "forward_kl" = Σ p_T (log p_T − log p_S), or the generalised JSD(β) of
    GKD (arXiv 2306.13649) as TRL's generalized_jsd_loss: m = β p_T + (1−β) p_S,
    JSD = β KL(p_T||m) + (1−β) KL(p_S||m), with TRL's endpoints β=0 → KL(T||S),
    β=1 → KL(S||T). ``estimator`` says what of the teacher's distribution it sees
    (dense_divergence, the same code as OPD's): "auto" is the sampled-token estimator for
    reverse_kl and the top-k renormalised over K for the others. Knowledge-enhanced
    exploration (teacher hints) is driver-side.

    Deviations from the released code: (1) its divergence is JSD(0.5) over the full
    vocabulary; we offer the teacher's top-k ids, renormalised over K, or the sampled-token
    reverse KL (the default, for remote teachers that return one logprob per token);
    (2) an empty gate gives a distillation term of exactly 0 instead of 0/0 = NaN;
    (3) the RL part is our clipped GRPO with token-mean by default (the code takes one step
    per batch, so ρ ≡ 1 and no clipping, and uses seq-mean-token-mean); (4) the gate is an
    input (the code gates on accuracy + format ≥ τ); (5) distill_coef (the code fixes 1).
    """
    if inp.gate is None:
        raise ValueError("kepo_loss needs gate in LossInputs ([B], 1 = reward >= tau).")
    out = grpo_loss(
        inp,
        eps_low=eps_low,
        eps_high=eps_high,
        loss_agg=loss_agg,
        max_len=max_len,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        tis_cap=tis_cap,
    )
    gate = inp.gate.to(inp.mask.dtype)
    per_token = _distill_per_token(inp, divergence, jsd_beta, estimator)
    # Its own term: its count is the gated tokens of the whole batch, not the policy term's tokens.
    distill = term(per_token, inp.mask * gate.unsqueeze(-1), "token-mean", coef=distill_coef)
    out.terms["distill"] = distill
    out.metrics["kepo/gate_frac"] = gate.mean()
    out.metrics["kepo/distill"] = (distill.sum / _nonzero(distill.count)).detach()
    return out


def opd_loss(
    inp: LossInputs,
    *,
    coef: float = 1.0,
    loss_agg: str = "token-mean",
    max_len: int | None = None,
    estimator: str = "sampled",
    tis_cap: float | None = None,
) -> LossOut:
    """On-policy distillation: per-token reverse KL to the teacher on the student's samples,
    estimated from the sampled token. The per-token advantage is A_t = sg(log π_T − log π_old)
    and the surrogate −(πθ/π_old)·A_t, so on policy the gradient is −A_t ∇log πθ, whose
    expectation is ∇KL(πθ||πT) (Agarwal et al.'s GKD setting, arXiv 2306.13649, with the
    sampled-token estimator used by most on-policy distillation code).

    ``estimator`` "topk" or "full" instead minimises the per-token reverse KL over the teacher's
    top-k plus a tail bucket, or over the whole vocabulary (dense_divergence), on the student's
    own states: Σ_v πθ(v|s_t)(log πθ − log π_T), differentiated exactly instead of sampled.
    That is the estimator of GKD's on-policy setting; the sampled one has the same expectation but,
    with a peaked teacher (wrong tokens at log π_T ≈ −15), a variance that swamps its signal.

    Deviations: "sampled" is the default (as in most on-policy distillation code) though the
    dense estimators learn faster where the teacher's rows are available; no clipping, so keep
    to one or few updates per batch; log ρ clamped to ±20. Mix with GRPO through grpo_opd_loss.
    """
    if estimator != "sampled":
        kl = dense_divergence(inp, "reverse_kl", estimator)
        out = LossOut({"opd": term(kl, inp.mask, loss_agg, max_len=max_len, coef=coef)})
        out.metrics = {"opd/loss": out.value.detach(), "opd/reverse_kl": _masked_mean(kl, inp.mask)}
        return out
    if inp.teacher_logprobs is None:
        raise ValueError("opd_loss needs teacher_logprobs in LossInputs.")
    adv = inp.teacher_logprobs - inp.old_logprobs
    per_token = -_ratio(inp.logprobs - inp.old_logprobs) * adv
    w, tis_metrics = tis_weights(inp, tis_cap)  # the sampled estimator is an expectation over tokens
    if w is not None:
        per_token = per_token * w
    out = LossOut({"opd": term(per_token, inp.mask, loss_agg, max_len=max_len, coef=coef)})
    out.metrics = {
        "opd/loss": out.value.detach(),
        "opd/reverse_kl": _masked_mean(inp.old_logprobs - inp.teacher_logprobs, inp.mask),
        **tis_metrics,
    }
    return out


def grpo_opd_loss(
    inp: LossInputs,
    *,
    opd_coef: float,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    loss_agg: str = "token-mean",
    max_len: int | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    estimator: str = "sampled",
    tis_cap: float | None = None,
) -> LossOut:
    """grpo_loss + opd_loss(coef=opd_coef), with both metric sets."""
    g = grpo_loss(
        inp,
        eps_low=eps_low,
        eps_high=eps_high,
        loss_agg=loss_agg,
        max_len=max_len,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        tis_cap=tis_cap,
    )
    o = opd_loss(inp, coef=opd_coef, loss_agg=loss_agg, max_len=max_len, estimator=estimator, tis_cap=tis_cap)
    return LossOut({**g.terms, **o.terms}, {**g.metrics, **o.metrics})


def dpo_loss(
    policy_chosen: Tensor,  # [B] Σ_t log πθ(y_w)
    policy_rejected: Tensor,  # [B] Σ_t log πθ(y_l)
    ref_chosen: Tensor,  # [B] Σ_t log π_ref(y_w)
    ref_rejected: Tensor,  # [B] Σ_t log π_ref(y_l)
    *,
    beta: float = 0.1,
    weight: Tensor | None = None,  # [B] 1 = real pair, 0 = padding pair (kept for the collectives)
) -> LossOut:
    """DPO (arXiv 2305.18290): mean of −log σ(β[(πc − rc) − (πr − rr)]) over sequence-level
    log-prob sums, via F.logsigmoid for stability at large margins.

    The reference may be the initial student or the teacher (teacher-as-reference
    distillation, as in LLaVA-MoD); this function does not care. Deviations: none in the
    objective; the reward metrics are β-scaled implicit rewards, as in the paper. ``weight``
    leaves padding pairs out of the mean (and out of the pair count).
    """
    if not (policy_chosen.shape == policy_rejected.shape == ref_chosen.shape == ref_rejected.shape):
        raise ValueError("dpo_loss inputs must all have the same shape [B].")
    chosen_reward = beta * (policy_chosen - ref_chosen.detach())
    rejected_reward = beta * (policy_rejected - ref_rejected.detach())
    margin = chosen_reward - rejected_reward
    w = torch.ones_like(margin).detach() if weight is None else weight.detach().to(margin.dtype)
    loss = Term((-F.logsigmoid(margin) * w).sum(), w.sum())
    n = _nonzero(w.sum())

    def mean(x: Tensor) -> Tensor:  # over real pairs
        return (x.detach() * w).sum() / n

    metrics = {
        "dpo/reward_margin": mean(margin),
        "dpo/accuracy": mean((margin > 0).to(margin.dtype)),
        "dpo/chosen_reward": mean(chosen_reward),
        "dpo/rejected_reward": mean(rejected_reward),
    }
    return LossOut({"dpo": loss}, metrics)


def distill_loss(
    inp: LossInputs,
    *,
    divergence: str = "forward_kl",
    estimator: str = "topk",
    jsd_beta: float = 0.5,
    loss_agg: str = "token-mean",
) -> LossOut:
    """Offline distillation (supervised KD: Hinton et al., arXiv 1503.02531; GKD's token-level
    form with λ = 0, arXiv 2306.13649): the per-token divergence between student and teacher on
    the data's responses, from the teacher's dense signal (dense_divergence), token-mean.

    The states are the data's, not the student's, so nothing is sampled and no importance
    weight applies: the loss is differentiated exactly. Deviations: the teacher's row is its
    top-k plus a tail bucket (estimator "topk") instead of its whole softmax unless "full" is
    asked; the default divergence is the forward KL KL(π_T‖πθ), the classic KD objective.
    """
    div = dense_divergence(inp, divergence, estimator, jsd_beta)
    out = LossOut({"distill": term(div, inp.mask, loss_agg)})
    out.metrics = {"distill/loss": out.value.detach(), f"distill/{divergence}": _masked_mean(div.detach(), inp.mask)}
    return out


def sft_loss(logprobs: Tensor, mask: Tensor) -> LossOut:
    """Supervised fine-tuning: token-mean negative log-likelihood over masked tokens.
    logprobs [B, T] are log πθ of the target tokens; mask [B, T]."""
    out = LossOut({"nll": term(-logprobs, mask.detach(), "token-mean")})
    out.metrics = {"sft/nll": out.value.detach()}
    return out


def sequence_logprobs(logprobs: Tensor, mask: Tensor) -> Tensor:  # [B]
    """Masked sum over T of per-token log-probs [B, T]: the sequence log-likelihood DPO uses."""
    return (logprobs * mask.to(logprobs.dtype)).sum(dim=-1)
