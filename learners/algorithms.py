"""The two seams where algorithms differ (docs/design.md), chosen by one explicit ``match``.

- ``build_rows`` (driver side, credit assignment): rollouts + rewards + teacher scores →
  TrainRows with advantages, gates, pairs.
- ``compute_loss`` (learner side): LossInputs → the algorithm's loss from learners/losses.py.

Everything else in the pipeline is algorithm-blind.
"""

from __future__ import annotations

from typing import Any

import torch

from protege.core.records import Rollout, TeacherScores, TrainRow
from protege.learners import losses
from protege.learners.advantages import dynamic_sampling_mask, group_advantages, online_dpo_pairs

def build_rows(
    algo: Any,
    rollouts: list[Rollout],
    rewards: list[float],
    group_size: int,
    teacher: list[TeacherScores] | None = None,
) -> tuple[list[TrainRow], dict[str, float]]:
    """Credit assignment. ``rollouts`` are group-major: G consecutive samples per prompt."""
    metrics: dict[str, float] = {}
    r = torch.tensor(rewards, dtype=torch.float32)
    teacher = teacher or [None] * len(rollouts)
    match algo.type:
        case "grpo" | "rlad" | "kepo" | "opd":
            std_norm = algo.adv_std_norm
            adv = group_advantages(r, group_size, std_norm=std_norm)
            keep = torch.ones(len(rollouts), dtype=torch.bool)
            if getattr(algo, "dynamic_sampling", False):
                keep = dynamic_sampling_mask(r, group_size)
                metrics["rollout/kept_frac"] = float(keep.float().mean())
            if algo.type == "opd" and algo.grpo_coef == 0:
                adv = torch.zeros_like(adv)
            rows = []
            for i, (ro, t) in enumerate(zip(rollouts, teacher)):
                if not keep[i]:
                    continue
                gate = 0.0
                if algo.type == "kepo":
                    gate = 1.0 if rewards[i] >= algo.gate_threshold else 0.0
                rows.append(_row(ro, float(adv[i]), t, gate))
            if algo.type == "kepo":
                metrics["kepo/gate_open_frac"] = sum(row.gate for row in rows) / max(1, len(rows))
            return rows, metrics
        case "dpo":
            pairs = online_dpo_pairs(r, group_size)
            rows = []
            for c, rj in pairs:
                rows.append(_row(rollouts[c], 0.0, teacher[c], 0.0))
                rows.append(_row(rollouts[rj], 0.0, teacher[rj], 0.0))
            metrics["dpo/pairs"] = float(len(pairs))
            metrics["dpo/tied_groups"] = float(len(rollouts) // group_size - len(pairs))
            return rows, metrics
        case _:
            raise ValueError(f"algorithm '{algo.type}' does not train on rollouts")


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
        rollout_logprobs=ro.sample.logprobs,
    )


def compute_loss(algo: Any, inp: losses.LossInputs, max_len: int | None = None) -> losses.LossOut:
    """The learner side of the seam for token-level objectives."""
    match algo.type:
        case "grpo":
            return losses.grpo_loss(
                inp, eps_low=algo.eps_low, eps_high=algo.eps_high, loss_agg=algo.loss_agg, max_len=max_len,
                kl_coef=algo.kl_coef, kl_estimator=algo.kl_estimator, tis_cap=algo.effective_tis_cap(),
            )
        case "rlad":
            return losses.rlad_loss(
                inp, alpha=algo.alpha, clamp=algo.clamp, eps_low=algo.eps_low, eps_high=algo.eps_high,
                loss_agg=algo.loss_agg, max_len=max_len, kl_coef=algo.kl_coef, kl_estimator=algo.kl_estimator,
                tis_cap=algo.effective_tis_cap(),
            )
        case "kepo":
            return losses.kepo_loss(
                inp, distill_coef=algo.distill_coef, divergence=algo.divergence, jsd_beta=algo.jsd_beta,
                eps_low=algo.eps_low, eps_high=algo.eps_high, loss_agg=algo.loss_agg, max_len=max_len,
                kl_coef=algo.kl_coef, kl_estimator=algo.kl_estimator, estimator=algo.estimator,
                tis_cap=algo.effective_tis_cap(),
            )
        case "opd":
            if algo.grpo_coef > 0:
                return losses.grpo_opd_loss(
                    inp, opd_coef=algo.opd_coef / algo.grpo_coef, eps_low=algo.eps_low, eps_high=algo.eps_high,
                    loss_agg=algo.loss_agg, max_len=max_len, estimator=algo.estimator, tis_cap=algo.effective_tis_cap(),
                ).scaled(algo.grpo_coef)
            return losses.opd_loss(inp, coef=algo.opd_coef, loss_agg=algo.loss_agg, max_len=max_len,
                                   estimator=algo.estimator, tis_cap=algo.effective_tis_cap())
        case "sft":
            return losses.sft_loss(inp.logprobs, inp.mask)
        case _:
            raise ValueError(f"no token-level loss for algorithm '{algo.type}'")
