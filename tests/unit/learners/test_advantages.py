"""Hand-worked tests for protege.learners.advantages (CPU, tiny tensors)."""

import math

import pytest
import torch

from protege.learners.advantages import dynamic_sampling_mask, group_advantages, online_dpo_pairs


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_group_advantages_two_groups_of_two():
    """rewards [1,0 | 0,1], G=2. Each group: mean 0.5, population std 0.5.
    eps=0:  (1-0.5)/0.5 = 1, (0-0.5)/0.5 = -1  ->  [1, -1, -1, 1].
    eps=1e-6 (default): ±0.5 / 0.500001."""
    adv = group_advantages(_t([1, 0, 0, 1]), 2, eps=0.0)
    assert torch.equal(adv, _t([1, -1, -1, 1]))
    adv = group_advantages(_t([1, 0, 0, 1]), 2)
    v = 0.5 / 0.500001
    assert torch.allclose(adv, _t([v, -v, -v, v]), rtol=0, atol=1e-12)


def test_group_advantages_population_std_and_dr_grpo():
    """rewards [1,0,0,0], G=4: mean 0.25; population var = (0.75² + 3·0.25²)/4 = 0.1875,
    std = sqrt(0.1875) = 0.4330127 -> A = 0.75/0.433 = sqrt(3), -0.25/0.433 = -1/sqrt(3).
    (Unbiased std would be sqrt(0.25) = 0.5 and give 1.5, -0.5: we must not get that.)
    Dr. GRPO (std_norm=False): A = r - mean = [0.75, -0.25, -0.25, -0.25]."""
    adv = group_advantages(_t([1, 0, 0, 0]), 4, eps=0.0)
    s3 = math.sqrt(3)
    assert torch.allclose(adv, _t([s3, -1 / s3, -1 / s3, -1 / s3]), atol=1e-12)
    adv = group_advantages(_t([1, 0, 0, 0]), 4, std_norm=False)
    assert torch.equal(adv, _t([0.75, -0.25, -0.25, -0.25]))


def test_group_advantages_equal_group_is_exactly_zero():
    """Group [0.1,0.1,0.1]: the float mean may differ from 0.1 by an ulp, so (r-mean)/(0+eps)
    could be ~1e-11; the function must return exactly 0 (and never NaN, even with eps=0).
    Group [1,0,1] beside it is unaffected: mean 2/3, std sqrt(2)/3."""
    for eps in (1e-6, 0.0):
        for std_norm in (True, False):
            adv = group_advantages(_t([0.1, 0.1, 0.1, 1, 0, 1]), 3, std_norm=std_norm, eps=eps)
            assert torch.equal(adv[:3], torch.zeros(3, dtype=torch.float64))
            assert not torch.isnan(adv).any()
    adv = group_advantages(_t([0.1, 0.1, 0.1, 1, 0, 1]), 3, eps=0.0)
    std = math.sqrt(2) / 3
    assert torch.allclose(adv[3:], _t([(1 / 3) / std, (-2 / 3) / std, (1 / 3) / std]))


def test_group_advantages_integer_rewards_and_bad_layout():
    """Integer rewards are promoted to float; N=5 with G=2 is a layout error."""
    adv = group_advantages(torch.tensor([1, 0]), 2, eps=0.0)
    assert adv.dtype == torch.get_default_dtype() and adv.tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        group_advantages(_t([1, 0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(_t([1, 0]), 0)


def test_dynamic_sampling_mask():
    """rewards [1,1 | 0,1 | 0,0], G=2: group 0 all correct, group 2 all wrong -> dropped;
    group 1 mixed -> kept. Expected [F, F, T, T, F, F]."""
    keep = dynamic_sampling_mask(_t([1, 1, 0, 1, 0, 0]), 2)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, True, True, False, False]
    with pytest.raises(ValueError):
        dynamic_sampling_mask(_t([1, 1, 0]), 2)


def test_online_dpo_pairs():
    """G=3, rewards [0,1,1 | 2,2,2 | 3,0,0].
    Group 0: max 1 first at index 1, min 0 at index 0 -> (1, 0).
    Group 1: all equal -> skipped.
    Group 2: max at 6, min 0 first at 7 -> (6, 7)."""
    rewards = [0, 1, 1, 2, 2, 2, 3, 0, 0]
    assert online_dpo_pairs(rewards, 3) == [(1, 0), (6, 7)]
    assert online_dpo_pairs(_t(rewards), 3) == [(1, 0), (6, 7)]
    assert online_dpo_pairs([0.5, 0.5], 2) == []
    with pytest.raises(ValueError):
        online_dpo_pairs([0, 1, 2], 2)
