"""The driver's one weighted combine (cluster/scoring.py), worked by hand: scorers addressed by
name, weights applied only there, strict about lengths and about rewards nobody weights."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from protege.cluster import scoring
from protege.cluster.scoring import Score, Scorers, assemble, combine
from protege.core.data import Example
from protege.core.records import Rollout, Sample, ScoreRecord, TeacherScores

WEIGHTS = {"exact_match": 1.0, "format": 0.25, "reward_model": 0.5}
# Three rollouts. The rule runner's third call timed out: exact_match scored 0 and is counted.
RULES = [
    ScoreRecord({"exact_match": 1.0, "format": 1.0}),
    ScoreRecord({"exact_match": 0.0, "format": 1.0}),
    ScoreRecord({"exact_match": 0.0, "format": 0.0}, errors={"exact_match/timeout": 1}),
]
MODEL = [ScoreRecord({"reward_model": 2.0}), ScoreRecord({"reward_model": -1.0}), ScoreRecord({"reward_model": 0.5})]


def test_two_rule_rewards_and_a_reward_model_weighted_by_name():
    scores = combine({"reward": RULES, "reward_model": MODEL}, WEIGHTS, 3)
    assert scores == [
        # 1·1 + 0.25·1 + 0.5·2
        Score(2.25, {"exact_match": 1.0, "format": 1.0, "reward_model": 2.0}, {}),
        # 1·0 + 0.25·1 + 0.5·(−1)
        Score(-0.25, {"exact_match": 0.0, "format": 1.0, "reward_model": -1.0}, {}),
        # the timed-out rule is a 0 component and an error count; the reward model still counts
        Score(0.25, {"exact_match": 0.0, "format": 0.0, "reward_model": 0.5}, {"exact_match/timeout": 1}),
    ]
    # Components in scorer order then record order: the rule rewards first, as the spec lists them.
    assert list(scores[0].components) == ["exact_match", "format", "reward_model"]


def test_errors_of_all_scorers_add_up_by_kind():
    a = [ScoreRecord({"x": 0.0}, errors={"x/exception": 1})]
    b = [ScoreRecord({"y": 3.0}, errors={"y/timeout": 2})]
    assert combine({"a": a, "b": b}, {"x": 2.0, "y": -1.0}, 1) == [
        Score(-3.0, {"x": 0.0, "y": 3.0}, {"x/exception": 1, "y/timeout": 2})
    ]


def test_strict_lengths_and_rewards():
    with pytest.raises(ValueError, match="scorer 'reward_model' returned 2 records for 3 rollouts"):
        combine({"reward": RULES, "reward_model": MODEL[:2]}, WEIGHTS, 3)
    with pytest.raises(ValueError, match="scorer 'reward' returned 3 records for 4 rollouts"):
        combine({"reward": RULES}, WEIGHTS, 4)
    with pytest.raises(ValueError, match="returned reward 'reward_model', which rewards: does not weight"):
        combine({"reward": RULES, "reward_model": MODEL}, {"exact_match": 1.0, "format": 1.0}, 3)
    with pytest.raises(ValueError, match="reward 'format' scored twice"):
        combine({"reward": RULES, "other": [ScoreRecord({"format": 1.0})] * 3}, WEIGHTS, 3)
    assert combine({}, WEIGHTS, 2) == [Score(0.0), Score(0.0)]  # no reward scorer asked: zero rewards


def test_teacher_payload_and_metrics_by_name():
    payload = [TeacherScores(logprobs=torch.zeros(n)) for n in (3, 1, 2)]
    teacher = [ScoreRecord(teacher=p, seconds=0.5) for p in payload]
    out = assemble({"teacher": teacher, "reward": RULES}, WEIGHTS | {"reward_model": 0.0}, 3, tokens=6)
    assert out.teacher == payload
    assert [s.value for s in out.scores] == [1.25, 0.25, 0.0]  # the teacher adds no reward
    assert out.metrics == {"teacher/bytes_per_token": 4.0, "teacher/seconds": 1.5}  # float32 per token
    assert assemble({"reward": RULES}, WEIGHTS, 3, tokens=6).teacher is None
    with pytest.raises(ValueError, match="without its payload"):
        assemble({"teacher": [ScoreRecord()] * 3}, WEIGHTS, 3, tokens=6)


# ---------------------------------------------------------------------------- Scorers, no Ray
class _Fake:
    """A scorer handle whose .score.remote(rollouts, examples) answers at once."""

    def __init__(self, fn):
        self.calls = []
        self.score = SimpleNamespace(remote=lambda r, e: self.calls.append((r, e)) or fn(r, e))


def _rollout(i: int, n_tokens: int) -> Rollout:
    return Rollout(
        example_index=i,
        prompt_ids=[1],
        sample=Sample([7] * n_tokens, [0.0] * n_tokens, f"t{i}", "stop"),
        policy_version=0,
    )


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr(scoring, "ray", SimpleNamespace(put=lambda x: x, get=lambda refs: list(refs)))


def test_scorers_submit_and_collect_by_name(no_ray):
    rules, model = copy.deepcopy(RULES), copy.deepcopy(MODEL)
    payload = [TeacherScores(logprobs=torch.zeros(n)) for n in (2, 2, 1)]
    handles = {  # the teacher first: results are read by name, whatever the order
        "teacher": _Fake(lambda r, e: [ScoreRecord(teacher=p, seconds=0.25) for p in payload]),
        "reward_model": _Fake(lambda r, e: model),
        "reward": _Fake(lambda r, e: rules),
    }
    spec = SimpleNamespace(
        rewards=[SimpleNamespace(name=k, weight=v) for k, v in WEIGHTS.items()], needs_teacher_scoring=lambda: True
    )
    roles = SimpleNamespace(scorers=handles)
    rollouts, examples = [_rollout(i, n) for i, n in enumerate((2, 2, 1))], [Example("q", "a")] * 3

    scorers = Scorers.for_job(spec, roles)
    out = scorers.collect(scorers.submit(rollouts, examples))
    assert [s.value for s in out.scores] == [2.25, -0.25, 0.25]
    assert out.teacher == payload
    assert out.metrics == {"teacher/bytes_per_token": 4.0, "teacher/seconds": 0.75}
    assert all(h.calls == [(rollouts, examples)] for h in handles.values())  # one call each, same batch
    assert rules == RULES and model == MODEL  # the scorers' records are read, never changed

    assert Scorers.for_job(spec, roles).without("teacher").score(rollouts, examples).teacher is None
    only = Scorers.for_job(spec, roles).only("teacher").score(rollouts, examples)
    assert only.teacher == payload and [s.value for s in only.scores] == [0.0] * 3
    # A teacher kept only as a generator (SFT targets, DPO reference) does not score.
    spec.needs_teacher_scoring = lambda: False
    assert Scorers.for_job(spec, roles).names == ["reward_model", "reward"]
    # Nothing to score: nothing submitted.
    calls = len(handles["reward"].calls)
    assert Scorers.for_job(spec, roles).score([], []).scores == [] and len(handles["reward"].calls) == calls
    with pytest.raises(ValueError, match="equal lengths"):
        scorers.submit(rollouts, examples[:2])
