"""Credit assignment (learners/algorithms.py::build_rows), worked by hand for every algorithm."""

from __future__ import annotations

import pytest
import torch

from protege.core import spec as S
from protege.core.records import Rollout, Sample, TeacherScores
from protege.learners.algorithms import build_rows


def _ro(i: int, n: int = 2, sampled: bool = True) -> Rollout:
    return Rollout(
        example_index=i,
        prompt_ids=[1, 2],
        policy_version=0 if sampled else -1,
        sample=Sample(response_ids=[3] * n, logprobs=[-0.5] * n if sampled else None, text="t", finish_reason="stop"),
    )


def _teacher(n: int = 2) -> TeacherScores:
    return TeacherScores(logprobs=torch.full((n,), -1.0))


def test_grpo_group_advantages_by_hand():
    """G=2: rewards (1, 0) → mean 0.5, population std 0.5 → advantages (+1, −1); (1, 1) → (0, 0)."""
    rows, m = build_rows(S.GRPOSpec(), [_ro(0), _ro(0), _ro(1), _ro(1)], [1.0, 0.0, 1.0, 1.0], 2)
    assert [round(r.advantage, 4) for r in rows] == [1.0, -1.0, 0.0, 0.0]
    assert rows[0].rollout_logprobs == [-0.5, -0.5] and rows[0].teacher_logprobs is None and m == {}
    dr = build_rows(S.GRPOSpec(adv_std_norm=False), [_ro(0), _ro(0)], [1.0, 0.0], 2)[0]
    assert [r.advantage for r in dr] == [0.5, -0.5]  # Dr. GRPO: mean-centred only


def test_dynamic_sampling_drops_groups_with_equal_rewards():
    rows, m = build_rows(S.GRPOSpec(dynamic_sampling=True), [_ro(0), _ro(0), _ro(1), _ro(1)], [1.0, 0.0, 1.0, 1.0], 2)
    assert len(rows) == 2 and m["rollout/kept_frac"] == 0.5


def test_kepo_gate_opens_on_responses_that_reach_the_threshold():
    rows, m = build_rows(S.KEPOSpec(gate_threshold=1.0), [_ro(0)] * 4, [1.0, 0.0, 0.5, 1.0], 4, [_teacher()] * 4)
    assert [r.gate for r in rows] == [1.0, 0.0, 0.0, 1.0] and m["kepo/gate_open_frac"] == 0.5
    assert all(r.teacher_logprobs is not None for r in rows)


def test_kepo_gate_reads_the_accuracy_reward_not_the_weighted_sum():
    """exact_match + 0.1 × format: a correct, badly formatted answer sums to 1.0 and a wrong, well
    formatted one to 0.1; with τ = 1 the gate must follow correctness (1, 0), and the combined
    reward 1.1 of a correct, formatted answer must not be what opens it."""
    rewards, quality = [1.1, 0.1, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]
    algo = S.KEPOSpec(gate_threshold=1.0)
    rows, _ = build_rows(algo, [_ro(0)] * 4, rewards, 4, [_teacher()] * 4, quality=quality)
    assert [r.gate for r in rows] == [1.0, 0.0, 1.0, 0.0]
    rows, _ = build_rows(
        S.KEPOSpec(gate_threshold=0.5),
        [_ro(0)] * 4,
        [0.6, 0.1, 0.6, 0.0],
        4,
        [_teacher()] * 4,
        quality=[0.0, 0.0, 1.0, 0.0],
    )
    assert [r.gate for r in rows] == [0.0, 0.0, 1.0, 0.0]  # 0.6 = 0.5 + 0.1 format, a wrong answer


def test_opd_advantages_only_with_a_grpo_part():
    plain = build_rows(S.OPDSpec(), [_ro(0), _ro(0)], [1.0, 0.0], 2, [_teacher()] * 2)[0]
    mixed = build_rows(S.OPDSpec(grpo_coef=0.5), [_ro(0), _ro(0)], [1.0, 0.0], 2, [_teacher()] * 2)[0]
    assert [r.advantage for r in plain] == [0.0, 0.0]
    assert [round(r.advantage, 4) for r in mixed] == [1.0, -1.0]


def test_online_dpo_pairs_best_against_worst_and_counts_ties():
    rows, m = build_rows(
        S.DPOSpec(), [_ro(0, 1), _ro(0, 2), _ro(0, 3), _ro(1), _ro(1), _ro(1)], [0.0, 1.0, 0.5, 1.0, 1.0, 1.0], 3
    )
    assert [len(r.response_ids) for r in rows] == [2, 1]  # chosen (reward 1), rejected (reward 0)
    assert (m["dpo/pairs"], m["dpo/tied_groups"]) == (1.0, 1.0)


@pytest.mark.parametrize("algo", [S.DPOSpec(mode="offline"), S.SFTSpec(), S.DistillSpec()], ids=lambda a: a.type)
def test_data_responses_become_one_row_each(algo):
    """Offline DPO's (chosen, rejected) pairs, SFT's and distill's answers: one row per response,
    in order, with no advantage and no engine log-probs (nothing was sampled)."""
    responses = [_ro(0, 1, sampled=False), _ro(0, 2, sampled=False)]
    teacher = [_teacher(1), _teacher(2)] if algo.type == "distill" else None
    rows, m = build_rows(algo, responses, None, 1, teacher)
    assert [len(r.response_ids) for r in rows] == [1, 2] and m == {}
    assert all(r.advantage == 0.0 and r.rollout_logprobs is None for r in rows)
    assert (rows[1].teacher_logprobs is not None) == (algo.type == "distill")
