"""Several replicas of one stateless scorer behind the interface of a single actor handle.

``pool.score.remote(rollouts, examples)`` splits its list arguments into contiguous chunks, one per
replica, calls every replica at once and returns one ObjectRef to the results concatenated in
order, so callers (cluster/scoring.py, cluster/phases.py) cannot tell a pool from one actor. The
concatenation is a zero-CPU Ray task: the parts never pass through the driver.
"""

from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=0)
def _concat(*parts: list) -> list:
    return [x for part in parts for x in part]


@ray.remote(num_cpus=0)
def _each(*values: Any) -> list:
    return list(values)


def chunks(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous (start, end) ranges covering ``range(n)``, sizes differing by at most one;
    the empty ones are dropped.

    >>> chunks(5, 2)
    [(0, 3), (3, 5)]
    >>> chunks(1, 3)
    [(0, 1)]
    """
    size, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        end = start + size + (i < extra)
        if end > start:
            out.append((start, end))
        start = end
    return out


class ReplicaPool:
    """Replicas of a scorer whose calls take equal-length lists and return one item per element
    (score, generate, generate_ids, sequence_logprobs). ``pid`` gives every replica's pid, so a
    restarted replica is seen as a changed list."""

    def __init__(self, actors: list):
        if not actors:
            raise ValueError("a replica pool needs at least one actor")
        self.actors = list(actors)

    def __getattr__(self, name: str) -> _Call:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Call(self.actors, name)

    def __len__(self) -> int:
        return len(self.actors)


class _Call:
    def __init__(self, actors: list, name: str):
        self.actors, self.name = actors, name

    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        if self.name == "pid":
            return _each.remote(*[a.pid.remote() for a in self.actors])
        # The driver's own puts (Scorers.submit) come back here without a copy: they live in its store.
        lists = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
        n = len(lists[0]) if lists else 0
        if any(len(x) != n for x in lists):
            raise ValueError(f"{self.name}: a pool splits equal-length list arguments, got {[len(x) for x in lists]}")
        parts = chunks(n, len(self.actors)) or [(0, 0)]
        refs = [
            getattr(actor, self.name).remote(*[x[lo:hi] for x in lists], **kwargs)
            for actor, (lo, hi) in zip(self.actors, parts)
        ]
        return _concat.remote(*refs)
