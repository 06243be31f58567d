"""KEPO knowledge-enhanced exploration, the pure parts (driver side).

For a prompt whose whole group failed the quality gate, the teacher writes a hint (it may see the
reference answer); the student samples with the hint; correct samples (rejection sampling over
N attempts) replace up to m group members, re-attached to the hint-free prompt, so the learner
trains on "what the student can say without help" and the recomputed old log-probs are the
hint-free ones. Guards (docs/algorithms.md, KEPO): trigger per prompt, not per batch; a hint without
its tags is skipped for that prompt (never used raw: a teacher that ignores the format would
otherwise leak the answer verbatim); an empty acceptance injects nothing.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Any

from protege.core.records import Rollout

HINT_RE = re.compile(r"<hint>(.*?)</hint>", re.DOTALL)


def failed_groups(rewards: list[float], group_size: int, threshold: float) -> list[int]:
    """Indices of prompts (groups) in which no response reached the gate threshold.

    >>> failed_groups([0, 0, 1, 0, 0, 0], 2, 1.0)
    [0, 2]
    """
    return [
        g for g in range(len(rewards) // group_size) if max(rewards[g * group_size : (g + 1) * group_size]) < threshold
    ]


def hint_request(question: str, answer: str) -> str:
    """What the teacher is asked. It sees the reference answer, and must not state it."""
    return (
        f"Question: {question}\nReference answer: {answer}\n"
        "Write one short hint that helps solve the question without stating the answer, "
        "inside <hint></hint>."
    )


def extract_hint(text: str) -> str | None:
    """The hint inside the last <hint></hint>, or None when the tags are missing or empty.

    >>> extract_hint("sure. <hint>add the ones first</hint>")
    'add the ones first'
    >>> extract_hint("the answer is 7") is None
    True
    """
    found = HINT_RE.findall(text)
    hint = found[-1].strip() if found else ""
    return hint or None


def inject(group: list[Rollout], accepted: list[Rollout], m: int) -> tuple[list[Rollout], int]:
    """Replace up to ``m`` members of a failed group with accepted hinted responses, each moved back
    onto the group's hint-free prompt. Returns the new group and how many were injected."""
    k = min(m, len(accepted), len(group))
    out = list(group)
    for i in range(k):
        src = accepted[i]
        out[i] = Rollout(
            example_index=group[i].example_index,
            prompt_ids=group[i].prompt_ids,
            sample=src.sample,
            policy_version=src.policy_version,
        )
    return out, k


def valid_hints(groups: list[int], texts: list[str]) -> list[tuple[int, str]]:
    """(group, hint) for each teacher answer that holds a hint in its tags; the rest are skipped.

    >>> valid_hints([0, 3], ["<hint>carry the one</hint>", "the answer is 7"])
    [(0, 'carry the one')]
    """
    return [(g, h) for g, t in zip(groups, texts, strict=True) if (h := extract_hint(t)) is not None]


@dataclass
class Merged:
    """The step's rollouts and scores after injection, and which positions changed."""

    rollouts: list[Rollout]
    scores: list[Any]
    changed: list[int]  # positions whose response was replaced (their teacher scores are stale)
    accepted: int  # hinted attempts that passed the gate (rejection sampling)


def merge_hinted(
    rollouts: list[Rollout],
    scores: list[Any],
    hinted: list[tuple[int, str]],
    tries: list[Rollout],
    tried: list[Any],
    *,
    group_size: int,
    attempts: int,
    replace: int,
    threshold: float,
) -> Merged:
    """Inject the accepted hinted attempts into their groups. ``tries`` hold ``attempts`` responses
    per entry of ``hinted`` (in its order) and ``tried`` their scores (anything with ``.value``);
    a try is accepted when its value reaches the gate threshold, and up to ``replace`` accepted
    ones replace the first members of the group, with their scores."""
    if len(tries) != len(hinted) * attempts or len(tried) != len(tries):
        raise ValueError(
            f"{len(hinted)} hinted groups × {attempts} attempts, got {len(tries)} tries and {len(tried)} scores"
        )
    rollouts, scores, changed, accepted = list(rollouts), list(scores), [], 0
    for j, (g, _) in enumerate(hinted):
        ok = [i for i in range(j * attempts, (j + 1) * attempts) if tried[i].value >= threshold]
        accepted += len(ok)
        lo = g * group_size
        rollouts[lo : lo + group_size], k = inject(rollouts[lo : lo + group_size], [tries[i] for i in ok], replace)
        for i in range(k):
            scores[lo + i] = tried[ok[i]]
            changed.append(lo + i)
    return Merged(rollouts, scores, changed, accepted)
