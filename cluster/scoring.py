"""Scoring: every scorer actor called the same way, and the one weighted combine.

Each scorer (the rule runner "reward", the learned "reward_model", the "teacher") keeps one
contract (core/records.py ``ScoreRecord``): ``score(rollouts, examples) -> list[ScoreRecord]``,
one record per rollout, raw components by reward name. ``Scorers`` submits a batch to all of them
at once and waits once; results are addressed by scorer name, never by position in a list, and
the records are read, never changed. The combine is the only place weights apply:

    value = Σ over scorers, Σ over their components  weight[component] × component

so the rule rewards and the reward model are weighted alike, from the spec's ``rewards``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import ray

from protege.core.records import ScoreRecord, TeacherScores

TEACHER = "teacher"  # the scorer whose records carry the per-token payload the learner trains on


@dataclass
class Score:
    """A rollout's reward: what the driver (credit, metrics, eval, KEPO's gate, samples) reads."""

    value: float  # Σ weight × component
    components: dict[str, float] = field(default_factory=dict)  # reward name -> raw value (0 on error)
    errors: dict[str, int] = field(default_factory=dict)  # "<reward>/timeout", "<reward>/exception", "<reward>/skipped"


@dataclass
class Scored:
    """What one scoring call gave: per-rollout scores, the teacher's payloads (None when the
    teacher was not asked) and what the teacher's signal cost."""

    scores: list[Score]
    teacher: list[TeacherScores] | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # teacher/bytes_per_token, teacher/seconds


@dataclass
class Pending:
    """Submitted scorer calls, by scorer name, for ``Scorers.collect``."""

    refs: dict[str, Any]  # scorer name -> ObjectRef of its list[ScoreRecord]
    n: int  # rollouts submitted
    tokens: int  # their response tokens (the teacher's bytes are reported per token)
    args: tuple = ()  # the shared (rollouts, examples) object refs, held until the calls are collected


def combine(records: Mapping[str, list[ScoreRecord]], weights: Mapping[str, float], n: int) -> list[Score]:
    """Each rollout's weighted reward from the records of every scorer (by scorer name).

    Strict: every scorer must answer exactly ``n`` records; a component no weight names, or one
    two scorers both claim, is an error (it would otherwise be dropped or counted twice). Scorers
    are read in the mapping's order, components in each record's order, so the sum and the
    components' order are the same from run to run. Errors of all scorers are added up by kind.
    """
    for name, recs in records.items():
        if len(recs) != n:
            raise ValueError(f"scorer {name!r} returned {len(recs)} records for {n} rollouts")
    out = []
    for row in zip(*records.values(), strict=True):
        value, components, errors = 0.0, {}, {}
        for name, rec in zip(records, row, strict=True):
            for reward, raw in rec.components.items():
                if reward in components:
                    raise ValueError(f"reward {reward!r} scored twice (again by scorer {name!r})")
                if reward not in weights:
                    raise ValueError(
                        f"scorer {name!r} returned reward {reward!r}, which rewards: does not weight "
                        f"(weighted: {', '.join(weights) or 'none'})"
                    )
                components[reward] = float(raw)
                value += weights[reward] * float(raw)
            for kind, count in rec.errors.items():
                errors[kind] = errors.get(kind, 0) + count
        out.append(Score(value=value, components=components, errors=errors))
    return out if records else [Score(value=0.0) for _ in range(n)]


def teacher_metrics(records: list[ScoreRecord], tokens: int) -> dict[str, float]:
    """What the teacher's signal costs: bytes per response token it moves, and its seconds
    (the scorer's share of the step is time/score beside the other phases)."""
    return {
        "teacher/bytes_per_token": sum(r.teacher.nbytes() for r in records) / max(1, tokens),
        "teacher/seconds": sum(r.seconds for r in records),
    }


def assemble(records: Mapping[str, list[ScoreRecord]], weights: Mapping[str, float], n: int, tokens: int) -> Scored:
    """``Scored`` from the records of one call: the combine, plus the teacher's payloads and metrics."""
    scored = Scored(scores=combine(records, weights, n))
    if TEACHER in records:
        if any(r.teacher is None for r in records[TEACHER]):
            raise ValueError("the teacher returned a record without its payload")
        scored.teacher = [r.teacher for r in records[TEACHER]]
        scored.metrics = teacher_metrics(records[TEACHER], tokens)
    return scored


class Scorers:
    """The job's scorer actors by name, and the spec's reward weights by name."""

    def __init__(self, handles: Mapping[str, Any], weights: Mapping[str, float]):
        self.handles = dict(handles)  # name -> actor handle with .score.remote(rollouts, examples)
        self.weights = dict(weights)

    @classmethod
    def for_job(cls, spec, roles) -> Scorers:
        """The scorers of ``roles`` (cluster/launch.py) that score this job's rollouts: all of them,
        except a teacher kept only as a generator (KEPO hints aside, SFT targets, DPO reference)."""
        handles = {name: h for name, h in roles.scorers.items() if name != TEACHER or spec.needs_teacher_scoring()}
        return cls(handles, {r.name: r.weight for r in spec.rewards})

    @property
    def names(self) -> list[str]:
        return list(self.handles)

    def only(self, *names: str) -> Scorers:
        return Scorers({n: h for n, h in self.handles.items() if n in names}, self.weights)

    def without(self, *names: str) -> Scorers:
        return Scorers({n: h for n, h in self.handles.items() if n not in names}, self.weights)

    def submit(self, rollouts: list, examples: list) -> Pending:
        """Every scorer's call for rollouts[i] of examples[i], submitted at once (nothing waits)."""
        if len(rollouts) != len(examples):
            raise ValueError(f"rollouts and examples must have equal lengths, got {len(rollouts)}, {len(examples)}")
        tokens = sum(len(r.sample.response_ids) for r in rollouts)
        if not rollouts or not self.handles:
            return Pending(refs={}, n=len(rollouts), tokens=tokens)
        # Put once, shared by every scorer's call (Ray resolves top-level ref arguments).
        args = (ray.put(list(rollouts)), ray.put(list(examples)))
        return Pending(
            refs={n: h.score.remote(*args) for n, h in self.handles.items()}, n=len(rollouts), tokens=tokens, args=args
        )

    def collect(self, pending: Pending) -> Scored:
        """Wait once for every submitted call; the combined scores, teacher payloads and metrics."""
        values = ray.get(list(pending.refs.values())) if pending.refs else []
        records = dict(zip(pending.refs, values, strict=True))
        if not records and pending.n == 0:
            return Scored(scores=[])
        return assemble(records, self.weights, pending.n, pending.tokens)

    def score(self, rollouts: list, examples: list) -> Scored:
        """``collect(submit(...))``: for callers with nothing to overlap."""
        return self.collect(self.submit(rollouts, examples))
