"""KEPO knowledge-enhanced exploration: the guards of docs/algorithms.md as pure-function tests."""

from __future__ import annotations

import doctest

import pytest

from protege.core import hints
from protege.core.records import Rollout, Sample


def _ro(i, text, prompt=(1, 2)):
    return Rollout(example_index=i, prompt_ids=list(prompt), sample=Sample([7], [0.0], text, "stop"), policy_version=3)


def test_doctests():
    assert doctest.testmod(hints).failed == 0


def test_trigger_is_per_prompt_not_per_batch():
    """G=3: group 0 has a correct answer, group 1 does not: only group 1 asks for a hint."""
    assert hints.failed_groups([0, 1, 0, 0, 0, 0], 3, 1.0) == [1]
    assert hints.failed_groups([1, 1, 1, 1], 2, 1.0) == []
    assert hints.failed_groups([0.5, 0.2], 2, 0.5) == []  # threshold is inclusive, like the gate


def test_missing_or_empty_hint_tags_skip_the_prompt():
    assert hints.extract_hint("The answer is 12.") is None
    assert hints.extract_hint("<hint>   </hint>") is None
    assert hints.extract_hint("<hint>a</hint> and <hint>b</hint>") == "b"


def test_inject_moves_accepted_onto_the_hint_free_prompt():
    group = [_ro(5, "wrong", prompt=(1, 2)) for _ in range(4)]
    accepted = [
        _ro(5, "right-1", prompt=(1, 2, 99, 98)),
        _ro(5, "right-2", prompt=(1, 2, 99, 98)),
        _ro(5, "right-3", prompt=(1, 2, 99, 98)),
    ]
    out, k = hints.inject(group, accepted, m=2)
    assert k == 2
    assert [r.sample.text for r in out] == ["right-1", "right-2", "wrong", "wrong"]
    assert all(r.prompt_ids == [1, 2] for r in out)  # the hint is removed from the prompt
    assert [r.policy_version for r in out] == [3, 3, 3, 3]


def test_inject_with_nothing_accepted_changes_nothing():
    group = [_ro(0, "wrong") for _ in range(2)]
    out, k = hints.inject(group, [], m=2)
    assert k == 0 and out == group


def test_hint_request_shows_the_reference_answer():
    text = hints.hint_request("What is 2 + 3?", "5")
    assert "Reference answer: 5" in text and "<hint></hint>" in text


class _S:
    def __init__(self, value):
        self.value = value


def test_merge_hinted_keeps_correct_tries_only_and_names_what_changed():
    """G=2, two groups failed (0 and 1), group 1 got a valid hint; 3 attempts, the 2nd and 3rd
    correct; replace=1: one member of group 1 is replaced by the first correct attempt."""
    rollouts = [_ro(0, "a"), _ro(0, "b"), _ro(1, "c"), _ro(1, "d")]
    scores = [_S(0.0)] * 4
    tries = [_ro(1, t, prompt=(1, 2, 9)) for t in ("x", "y", "z")]
    m = hints.merge_hinted(
        rollouts,
        scores,
        [(1, "hint")],
        tries,
        [_S(0.0), _S(1.0), _S(1.0)],
        group_size=2,
        attempts=3,
        replace=1,
        threshold=1.0,
    )
    assert [r.sample.text for r in m.rollouts] == ["a", "b", "y", "d"]
    assert m.rollouts[2].prompt_ids == [1, 2]  # back on the hint-free prompt
    assert m.changed == [2] and m.accepted == 2 and m.scores[2].value == 1.0
    assert [r.sample.text for r in rollouts] == ["a", "b", "c", "d"]  # the inputs are not mutated
    with pytest.raises(ValueError, match="3 attempts"):
        hints.merge_hinted(
            rollouts, scores, [(1, "h")], tries[:2], [_S(0)] * 2, group_size=2, attempts=3, replace=1, threshold=1.0
        )
