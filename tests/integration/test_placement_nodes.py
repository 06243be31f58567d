"""Colocated placement across nodes: two GPU nodes on this machine (ray.cluster_utils.Cluster),
each with 2 logical GPUs and 3 logical CPUs, and a CPU-only head. Every actor of a pair asks for 1
CPU, so a node holds one pair (2 CPUs) but not two: placed as separate groups, both rollout workers would
pack onto one node and a learner rank would spill onto the other, away from its worker's GPU."""

from __future__ import annotations

import pytest

from protege.cluster import launch
from tests.unit.cluster.test_placement import example, fake_actors

pytestmark = pytest.mark.slow  # two raylets: ~30 s on 2 cores


@pytest.fixture(scope="module")
def two_gpu_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=3, num_gpus=2, resources={"gpu_8x": 8})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    cluster.shutdown()


def test_colocated_pairs_stay_together_across_nodes(two_gpu_nodes, monkeypatch):
    import ray

    spec = example("grpo_gpu_colocated.yaml", pairs=2)
    spec.resources.rollout.cpus = spec.resources.learner.cpus = 1
    r, ln, rw = fake_actors(0.0)
    monkeypatch.setattr(launch, "RolloutActor", r)
    monkeypatch.setattr(launch, "LearnerActor", ln)
    monkeypatch.setattr(launch, "RewardActor", rw)
    roles = launch.start_roles(spec)
    try:
        rollout = ray.get([w.report.remote() for w in roles.rollout])
        learners = ray.get([x.report.remote() for x in roles.learners])
    finally:
        roles.kill_all()
    for i, (w, rank) in enumerate(zip(rollout, learners)):
        assert rank["node"] == w["node"] and rank["gpus"] == w["gpus"] and len(w["gpus"]) == 1, (i, w, rank)
    assert len({w["node"] for w in rollout}) == 2  # one pair per node: no node has CPU for two
