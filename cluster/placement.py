"""Resources per role → Ray placement groups, failing fast with a message when they can't fit.

A placement group that cannot be satisfied waits forever by default (ray#15801); users then see
a job that hangs. We wait ``placement_timeout_s`` and then say which role asked for what and
what the cluster has.

Colocated roles (rollout workers and learner ranks each taking part of a GPU, as many workers as
ranks) share one placement group: bundle i holds rollout worker i and learner rank i, and reserves
the whole GPU for the pair. A bundle is placed atomically on one node and one GPU, so the pairing
cannot come out wrong, whatever the node count or the order Ray places groups in (two separate
PACK groups could put worker i and rank i on different GPUs, or nodes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group

COLOCATED = "colocated"  # the name of the shared rollout + learner group


class PlacementError(RuntimeError):
    pass


@dataclass
class RoleRequest:
    role: str
    count: int
    bundle: dict[str, float]  # Ray resources per actor
    group: str = ""  # placement group it is reserved in; "" = a group of its own, named after the role

    def __post_init__(self):
        self.group = self.group or self.role

    def describe(self) -> str:
        res = ", ".join(f"{k}: {v:g}" for k, v in self.bundle.items())
        return f"role '{self.role}' asked for {self.count} × {{{res}}}"


def bundle_for(res) -> dict[str, float]:
    """RoleResources → a Ray bundle (CPU/GPU plus custom resources), zero entries dropped."""
    b = {"CPU": float(res.cpus), "GPU": float(res.gpus), **{k: float(v) for k, v in res.custom.items()}}
    return {k: v for k, v in b.items() if v > 0} or {"CPU": 0.01}


def shares_gpus(spec) -> bool:
    """Rollout workers and learner ranks may land on the same GPU: both roles take part of one."""
    r = spec.resources
    return 0 < r.rollout.gpus < 1 and 0 < r.learner.gpus < 1


def colocated(spec) -> bool:
    """One rollout worker beside each learner rank, a pair per GPU: both take part of a GPU, the
    two parts fit one GPU, and there are as many workers as ranks."""
    r = spec.resources
    fits_one_gpu = r.rollout.gpus + r.learner.gpus <= 1 + 1e-9  # float sums of two shares
    return shares_gpus(spec) and fits_one_gpu and spec.rollout.workers == spec.learner.ranks


def role_requests(spec) -> list[RoleRequest]:
    """Pure: which roles this job needs, how many actors each, what each actor takes, and which
    placement group it is reserved in."""
    r = spec.resources
    pair = COLOCATED if colocated(spec) else ""
    reqs = [
        RoleRequest("rollout", spec.rollout.workers, bundle_for(r.rollout), group=pair),
        RoleRequest("learner", spec.learner.ranks, bundle_for(r.learner), group=pair),
        RoleRequest("reward", 1, bundle_for(r.reward)),
    ]
    if spec.models.teacher is not None:
        reqs.append(RoleRequest("teacher", r.teacher.replicas, bundle_for(r.teacher)))
    if spec.models.reward_model is not None:
        reqs.append(RoleRequest("reward_model", 1, bundle_for(r.reward_model)))
    return reqs


def group_bundles(members: list[RoleRequest]) -> list[dict[str, float]]:
    """Bundle i of a group: actor i of every member role. A shared bundle reserves whole GPUs, so
    nothing else is placed on the GPU its pair shares."""
    count = members[0].count
    if any(q.count != count for q in members):
        raise ValueError(f"roles sharing a placement group need equal counts: {[(q.role, q.count) for q in members]}")
    merged: dict[str, float] = {}
    for q in members:
        for k, v in q.bundle.items():
            merged[k] = merged.get(k, 0.0) + v
    if len(members) > 1 and "GPU" in merged:
        merged["GPU"] = float(math.ceil(merged["GPU"] - 1e-9))
    return [dict(merged) for _ in range(count)]


def _by_group(requests: list[RoleRequest]) -> dict[str, list[RoleRequest]]:
    groups: dict[str, list[RoleRequest]] = {}
    for q in requests:
        groups.setdefault(q.group, []).append(q)
    return groups


def placement_bundles(requests: list[RoleRequest]) -> dict[str, list[dict[str, float]]]:
    """Pure: the bundles of each placement group reserve() asks for (what the autoscaler sees)."""
    return {name: group_bundles(qs) for name, qs in _by_group(requests).items()}


def reserve(requests: list[RoleRequest], timeout_s: float) -> dict[str, object]:
    """One PACK placement group per group name (a role's own, or the colocated pair's); returns
    role → its placement group (colocated roles map to the same one; actor i of a role goes in
    bundle i). All or nothing: on failure every group is removed."""
    members = _by_group(requests)
    pgs = {
        name: placement_group(bundles, strategy="PACK", name=f"protege-{name}")
        for name, bundles in placement_bundles(requests).items()
    }
    pending = []
    for name, qs in members.items():
        ready, _ = ray.wait([pgs[name].ready()], timeout=timeout_s)
        if not ready:
            pending.extend(qs)
    if pending:
        for pg in pgs.values():
            remove_placement_group(pg)
        raise PlacementError(_unplaced_message(pending, timeout_s))
    return {q.role: pgs[q.group] for q in requests}


def _unplaced_message(pending: list[RoleRequest], timeout_s: float) -> str:
    avail = ray.available_resources()
    total = ray.cluster_resources()
    # Placement-group bookkeeping resources (CPU_group_..., bundle_group_...) mean nothing to users.
    have = ", ".join(
        f"{k}: {total[k]:g} ({avail.get(k, 0):g} free)"
        for k in sorted(total)
        if "_group_" not in k and not k.startswith(("node:", "memory", "object_store", "accelerator_type"))
    )
    asks = "; ".join(q.describe() for q in pending)
    shared = sorted({q.group for q in pending if q.group != q.role})
    together = "".join(
        f" ({' and '.join(q.role for q in pending if q.group == g)} share one bundle per pair, one GPU each)"
        for g in shared
    )
    return (
        f"cannot place the job within {timeout_s:g}s: {asks}{together}. The cluster has {have}. "
        "Lower resources.* in the spec, or add nodes (an autoscaling cluster adds them when it can)."
    )
