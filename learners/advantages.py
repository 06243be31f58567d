"""Credit assignment on the driver side: scalar rewards -> advantages, masks and pairs.

Pure functions of tensors (torch only). Rewards are laid out group-major: the G samples
of prompt g are ``rewards[g*G:(g+1)*G]``, which is how the driver lays out a rollout batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """View rewards [N] as [N // G, G], with clear errors for bad layouts."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}.")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}.")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"The number of rewards ({n}) is not a multiple of group_size ({group_size}); "
            "rewards must hold G samples for every prompt, laid out group-major."
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards.view(n // group_size, group_size)


def group_advantages(
    rewards: Tensor,  # [N], N = num_prompts * G, group-major
    group_size: int,
    *,
    std_norm: bool = True,
    eps: float = 1e-6,
) -> Tensor:  # [N]
    """GRPO group-relative advantage, one scalar per response.

    ``std_norm=True``: A_i = (r_i - mean_G(r)) / (std_G(r) + eps), the outcome-supervision
    advantage of DeepSeekMath (arXiv 2402.03300) with the population std (1/G).
    ``std_norm=False``: A_i = r_i - mean_G(r), Dr. GRPO (arXiv 2503.20783), which drops the
    std divisor because it over-weights too-easy and too-hard prompts.

    Deviations: ``eps`` is added to the std (the paper divides by std alone); KEPO's code
    uses the unbiased std and eps 1e-4, we use the population std as in DeepSeekMath's
    Eq. 1. A group whose rewards are all equal gets exactly 0: the mean of equal floats can
    be off by an ulp, and ulp / (0 + eps) would otherwise leak a tiny non-zero advantage.
    """
    groups = _grouped(rewards, group_size)  # [P, G]
    centred = groups - groups.mean(dim=1, keepdim=True)
    if std_norm:
        std = groups.std(dim=1, unbiased=False, keepdim=True)
        adv = centred / (std + eps)
    else:
        adv = centred
    flat = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)  # [P, 1]
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def dynamic_sampling_mask(
    rewards: Tensor,  # [N], group-major
    group_size: int,
) -> Tensor:  # [N] bool
    """DAPO dynamic sampling (arXiv 2503.14476): False for every member of a group whose
    rewards are all equal (all correct or all wrong), because such a group has zero
    advantage and only dilutes the batch. The driver decides whether to resample.

    Deviation: DAPO filters on accuracy; we filter on whatever scalar reward is passed.
    """
    groups = _grouped(rewards, group_size)  # [P, G]
    keep = groups.amax(dim=1) != groups.amin(dim=1)  # [P]
    return keep.repeat_interleave(group_size)


def online_dpo_pairs(
    rewards: list[float] | Tensor,  # [N], group-major
    group_size: int,
) -> list[tuple[int, int]]:
    """Online DPO pairs from on-policy samples: per group (chosen, rejected) =
    (argmax, argmin) as global indices into ``rewards``; groups with max == min are
    skipped (no preference). Ties for the max or the min pick the first occurrence, so
    the result is deterministic.

    Best-vs-worst pairing follows our reading of online DPO (see docs/algorithms.md,
    DPO); one pair per prompt, not all pairs.
    """
    values = torch.as_tensor(rewards, dtype=torch.float64)
    groups = _grouped(values, group_size).tolist()
    pairs: list[tuple[int, int]] = []
    for g, row in enumerate(groups):
        # Python's max/min return the first maximal/minimal element, which we rely on.
        best = max(range(group_size), key=row.__getitem__)
        worst = min(range(group_size), key=row.__getitem__)
        if row[best] == row[worst]:
            continue
        pairs.append((g * group_size + best, g * group_size + worst))
    return pairs
