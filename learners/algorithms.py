"""Where algorithms differ, in two functions, each one explicit ``match`` (docs/design.md).

- ``build_rows`` (driver side, credit assignment): responses + rewards + teacher scores →
  TrainRows with advantages, gates, pairs.
- ``compute_loss`` (learner side): LossInputs → the algorithm's loss from learners/losses.py.

With the spec variant's ``needs()`` (core/spec.py: where the responses come from, what the
teacher sends, whether a reference or groups are needed) these are the only places that know
an algorithm by name: the driver, launcher, learner and data loading read the declarations.
A new algorithm is one spec variant, one case here in each function, and one loss.
"""

from __future__ import annotations

from typing import Any

import torch

from protege.core.records import Rollout, TeacherScores, TrainRow
from protege.learners import losses
from protege.learners.advantages import dynamic_sampling_mask, group_advantages, online_dpo_pairs


def build_rows(
    algo: Any,
    responses: list[Rollout],
    rewards: list[float] | None,
    group_size: int,
    teacher: list[TeacherScores] | None = None,
    quality: list[float] | None = None,
) -> tuple[list[TrainRow], dict[str, float]]:
    """Credit assignment. ``responses`` are what the step trains on (``needs().responses``):
    the student's samples group-major (G consecutive per prompt), the data's answers or the
    teacher's generations (one per prompt), or the data's preference pairs (chosen, rejected,
    chosen, ...). ``rewards`` is None when the responses were not scored. ``quality``: each
    response's accuracy reward alone (the first reward's raw value), what KEPO's quality gate
    compares with τ; the combined reward stands in when it is not given."""
    metrics: dict[str, float] = {}
    teacher = teacher if teacher is not None else [None] * len(responses)
    match algo.type:
        case "grpo" | "rlad":
            return _group_rows(
                responses,
                rewards,
                group_size,
                teacher,
                std_norm=algo.adv_std_norm,
                dynamic_sampling=algo.dynamic_sampling,
            )
        case "kepo":  # the quality gate opens the distillation term on responses that reach τ
            gates = [1.0 if r >= algo.gate_threshold else 0.0 for r in (quality if quality is not None else rewards)]
            rows, metrics = _group_rows(
                responses,
                rewards,
                group_size,
                teacher,
                std_norm=algo.adv_std_norm,
                dynamic_sampling=algo.dynamic_sampling,
                gates=gates,
            )
            metrics["kepo/gate_open_frac"] = sum(row.gate for row in rows) / max(1, len(rows))
            return rows, metrics
        case "opd":  # advantages only feed the GRPO part, when grpo_coef > 0
            return _group_rows(
                responses, rewards, group_size, teacher, std_norm=algo.adv_std_norm, zero_advantages=algo.grpo_coef == 0
            )
        case "dpo" if algo.mode == "offline":  # the data's pairs, already (chosen, rejected) in order
            return [_row(ro, 0.0, t, 0.0) for ro, t in zip(responses, teacher, strict=True)], metrics
        case "dpo":
            pairs = online_dpo_pairs(torch.tensor(rewards, dtype=torch.float32), group_size)
            rows = []
            for c, rj in pairs:
                rows.append(_row(responses[c], 0.0, teacher[c], 0.0))
                rows.append(_row(responses[rj], 0.0, teacher[rj], 0.0))
            metrics["dpo/pairs"] = float(len(pairs))
            metrics["dpo/tied_groups"] = float(len(responses) // group_size - len(pairs))
            return rows, metrics
        case "sft" | "distill":  # one row per response: the data's answer or the teacher's generation
            return [_row(ro, 0.0, t, 0.0) for ro, t in zip(responses, teacher, strict=True)], metrics
        case _:
            raise ValueError(f"no credit assignment for algorithm '{algo.type}'")


def _group_rows(
    responses,
    rewards,
    group_size: int,
    teacher,
    *,
    std_norm: bool,
    dynamic_sampling: bool = False,
    gates: list[float] | None = None,
    zero_advantages: bool = False,
):
    """The GRPO family's credit: group-normalised advantages, optionally DAPO's dynamic sampling
    (groups whose rewards are all equal dropped), per-row gates."""
    metrics: dict[str, float] = {}
    r = torch.tensor(rewards, dtype=torch.float32)
    adv = group_advantages(r, group_size, std_norm=std_norm)
    if zero_advantages:
        adv = torch.zeros_like(adv)
    keep = torch.ones(len(responses), dtype=torch.bool)
    if dynamic_sampling:
        keep = dynamic_sampling_mask(r, group_size)
        metrics["rollout/kept_frac"] = float(keep.float().mean())
    gates = gates if gates is not None else [0.0] * len(responses)
    rows = [
        _row(ro, float(adv[i]), t, gates[i])
        for i, (ro, t) in enumerate(zip(responses, teacher, strict=True))
        if keep[i]
    ]
    return rows, metrics


def _row(ro: Rollout, adv: float, t: TeacherScores | None, gate: float) -> TrainRow:
    return TrainRow(
        prompt_ids=ro.prompt_ids,
        response_ids=ro.sample.response_ids,
        advantage=adv,
        teacher_logprobs=t.logprobs if t is not None else None,
        teacher_topk_ids=t.topk_ids if t is not None else None,
        teacher_topk_logprobs=t.topk_logprobs if t is not None else None,
        teacher_tail_logprobs=t.tail_logprobs if t is not None else None,
        teacher_full_logprobs=t.full_logprobs if t is not None else None,
        gate=gate,
        rollout_logprobs=ro.sample.logprobs,  # None for responses no engine sampled (data, teacher)
    )


def compute_loss(algo: Any, inp: losses.LossInputs, max_len: int | None = None) -> losses.LossOut:
    """The learner side: the algorithm's loss over one micro-batch."""
    match algo.type:
        case "grpo":
            return losses.grpo_loss(
                inp,
                eps_low=algo.eps_low,
                eps_high=algo.eps_high,
                loss_agg=algo.loss_agg,
                max_len=max_len,
                kl_coef=algo.kl_coef,
                kl_estimator=algo.kl_estimator,
                tis_cap=algo.effective_tis_cap(),
            )
        case "rlad":
            return losses.rlad_loss(
                inp,
                alpha=algo.alpha,
                clamp=algo.clamp,
                trust_region=algo.trust_region,
                eps_low=algo.eps_low,
                eps_high=algo.eps_high,
                loss_agg=algo.loss_agg,
                max_len=max_len,
                kl_coef=algo.kl_coef,
                kl_estimator=algo.kl_estimator,
                tis_cap=algo.effective_tis_cap(),
            )
        case "kepo":
            return losses.kepo_loss(
                inp,
                distill_coef=algo.distill_coef,
                divergence=algo.divergence,
                jsd_beta=algo.jsd_beta,
                eps_low=algo.eps_low,
                eps_high=algo.eps_high,
                loss_agg=algo.loss_agg,
                max_len=max_len,
                kl_coef=algo.kl_coef,
                kl_estimator=algo.kl_estimator,
                estimator=algo.estimator,
                tis_cap=algo.effective_tis_cap(),
            )
        case "opd":
            if algo.grpo_coef > 0:
                return losses.grpo_opd_loss(
                    inp,
                    opd_coef=algo.opd_coef / algo.grpo_coef,
                    eps_low=algo.eps_low,
                    eps_high=algo.eps_high,
                    loss_agg=algo.loss_agg,
                    max_len=max_len,
                    estimator=algo.estimator,
                    tis_cap=algo.effective_tis_cap(),
                ).scaled(algo.grpo_coef)
            return losses.opd_loss(
                inp,
                coef=algo.opd_coef,
                loss_agg=algo.loss_agg,
                max_len=max_len,
                estimator=algo.estimator,
                tis_cap=algo.effective_tis_cap(),
            )
        case "dpo":  # rows are (chosen, rejected) pairs; the reference's sequence log-probs given or summed here
            seq = losses.sequence_logprobs(inp.logprobs, inp.mask)
            ref = (
                inp.ref_seq_logprobs
                if inp.ref_seq_logprobs is not None
                else losses.sequence_logprobs(inp.ref_logprobs, inp.mask)
            )
            weight = inp.weight[0::2] if inp.weight is not None else None  # padding pairs carry weight 0
            return losses.dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=algo.beta, weight=weight)
        case "sft":
            return losses.sft_loss(inp.logprobs, inp.mask)
        case "distill":
            return losses.distill_loss(
                inp, divergence=algo.divergence, estimator=algo.estimator, jsd_beta=algo.jsd_beta
            )
        case _:
            raise ValueError(f"no loss for algorithm '{algo.type}'")
