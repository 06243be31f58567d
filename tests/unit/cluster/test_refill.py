"""Dynamic sampling's refill (cluster/phases.py): which groups count, and how two batches merge
and are cut back to the informative groups, with their scores and teacher payloads in step."""

from __future__ import annotations

from protege.cluster.phases import Responses, informative_groups, keep_groups, merge_groups
from protege.cluster.scoring import Score, Scored
from protege.core.records import Rollout, Sample


def batch(values, group_size, tag, teacher=False):
    """Rollouts group-major over len(values) // group_size examples; response ids carry ``tag``."""
    rollouts = [
        Rollout(i // group_size, [1], Sample([tag, i], [0.0, 0.0], f"{tag}{i}", "stop"), 0) for i in range(len(values))
    ]
    examples = [f"{tag}-q{g}" for g in range(len(values) // group_size)]
    scored = Scored(
        [Score(value=v, components={}) for v in values],
        [f"t{tag}{i}" for i in range(len(values))] if teacher else None,
        {"teacher/seconds": 1.0},
    )
    return Responses(rollouts, examples, generated_tokens=2 * len(values), engine_s=0.5), scored


def test_informative_groups_are_those_whose_rewards_differ():
    assert informative_groups([1, 1, 0, 1, 0, 0, 0.5, 0.25], 2) == [1, 3]
    assert informative_groups([0, 0, 0], 3) == []


def test_merge_then_keep_returns_the_informative_groups_with_their_own_examples():
    a = batch([1, 1, 0, 1], 2, tag=7, teacher=True)  # group 0 flat, group 1 informative
    b = batch([0, 1, 0, 0, 1, 0], 2, tag=9, teacher=True)  # groups 0 and 2 informative
    responses, scored = merge_groups(a, b)
    assert (
        len(responses.examples) == 5 and responses.generated_tokens == 20 and scored.metrics["teacher/seconds"] == 2.0
    )
    found = informative_groups([s.value for s in scored.scores], 2)
    assert found == [1, 2, 4]
    kept, ks = keep_groups(responses, scored, found[:2], 2)
    # each kept rollout still points at its own question, its score and its teacher payload beside it
    assert [responses.their_examples([r])[0] for r in kept.rollouts] == ["7-q1", "7-q1", "9-q0", "9-q0"]
    assert [r.sample.text for r in kept.rollouts] == ["72", "73", "90", "91"]
    assert [s.value for s in ks.scores] == [0, 1, 0, 1]
    assert ks.teacher == ["t72", "t73", "t90", "t91"]


def test_merge_without_a_teacher_keeps_none():
    responses, scored = merge_groups(batch([0, 1], 2, tag=1), batch([1, 0], 2, tag=2))
    assert scored.teacher is None and [r.example_index for r in responses.rollouts] == [0, 0, 1, 1]
