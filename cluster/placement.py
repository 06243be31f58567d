"""Resources per role → Ray placement groups, failing fast with a message when they can't fit.

A placement group that cannot be satisfied waits forever by default (ray#15801); users then see
a job that hangs. We wait ``placement_timeout_s`` and then say which role asked for what and
what the cluster has.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group


class PlacementError(RuntimeError):
    pass


@dataclass
class RoleRequest:
    role: str
    count: int
    bundle: dict[str, float]  # Ray resources per actor

    def describe(self) -> str:
        res = ", ".join(f"{k}: {v:g}" for k, v in self.bundle.items())
        return f"role '{self.role}' asked for {self.count} × {{{res}}}"


def bundle_for(res) -> dict[str, float]:
    """RoleResources → a Ray bundle (CPU/GPU plus custom resources), zero entries dropped."""
    b = {"CPU": float(res.cpus), "GPU": float(res.gpus), **{k: float(v) for k, v in res.custom.items()}}
    return {k: v for k, v in b.items() if v > 0} or {"CPU": 0.01}


def role_requests(spec) -> list[RoleRequest]:
    """Pure: which roles this job needs, how many actors each, and what each actor takes."""
    r = spec.resources
    reqs = [
        RoleRequest("rollout", spec.rollout.workers, bundle_for(r.rollout)),
        RoleRequest("learner", spec.learner.ranks, bundle_for(r.learner)),
        RoleRequest("reward", 1, bundle_for(r.reward)),
    ]
    if spec.models.teacher is not None:
        reqs.append(RoleRequest("teacher", 1, bundle_for(r.teacher)))
    if spec.models.reward_model is not None:
        reqs.append(RoleRequest("reward_model", 1, bundle_for(r.reward_model)))
    return reqs


def reserve(requests: list[RoleRequest], timeout_s: float) -> dict[str, object]:
    """One PACK placement group per role. All or nothing: on failure every group is removed."""
    groups = {q.role: placement_group([dict(q.bundle) for _ in range(q.count)], strategy="PACK", name=f"protege-{q.role}")
              for q in requests}
    pending = []
    for q in requests:
        ready, _ = ray.wait([groups[q.role].ready()], timeout=timeout_s)
        if not ready:
            pending.append(q)
    if pending:
        for pg in groups.values():
            remove_placement_group(pg)
        avail = ray.available_resources()
        total = ray.cluster_resources()
        # Placement-group bookkeeping resources (CPU_group_..., bundle_group_...) mean nothing to users.
        have = ", ".join(f"{k}: {total[k]:g} ({avail.get(k, 0):g} free)" for k in sorted(total)
                         if "_group_" not in k and not k.startswith(("node:", "memory", "object_store", "accelerator_type")))
        asks = "; ".join(q.describe() for q in pending)
        raise PlacementError(
            f"cannot place the job within {timeout_s:g}s: {asks}. The cluster has {have}. "
            "Lower resources.* in the spec, or add nodes (an autoscaling cluster adds them when it can)."
        )
    return groups
