"""deploy/ on a Ray node: the example specs' placement groups reserved on one node with 8 logical
GPUs land the way deploy/README.md says (colocated pairs, disaggregated disjoint). The static checks
of deploy/ are in tests/unit/test_deploy.py."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _gpu_ids(spec) -> dict[str, list[list[str]]]:
    """Reserve the spec's placement groups, then ask each bundle which GPU(s) it got."""
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from protege.cluster.placement import reserve, role_requests

    @ray.remote(num_cpus=0)
    def gpu_ids():
        return [str(i) for i in ray.get_gpu_ids()]

    reqs = role_requests(spec)
    groups = reserve(reqs, 60)
    try:
        return {
            q.role: ray.get(
                [
                    gpu_ids.options(
                        num_gpus=q.bundle.get("GPU", 0),
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            groups[q.role], placement_group_bundle_index=i
                        ),
                    ).remote()
                    for i in range(q.count)
                ]
            )
            for q in reqs
        }
    finally:
        for pg in {pg.id: pg for pg in groups.values()}.values():  # colocated roles share one group
            remove_placement_group(pg)


@pytest.mark.slow
def test_gpu_placement_colocated_pairs_and_disaggregated_is_disjoint():
    """On one Ray node with 8 logical GPUs (and the gpu-8x group's custom resource), the examples'
    placement groups land as deploy/README.md says. CPU asks are shrunk to fit this machine; GPUs are not."""
    import ray

    from protege.core.spec import load_spec

    def cpu_light(path):
        spec = load_spec(path)
        for role in ("rollout", "learner", "reward", "teacher"):
            getattr(spec.resources, role).cpus = 0.01
        return spec

    ray.init(num_cpus=2, num_gpus=8, resources={"gpu_8x": 8}, include_dashboard=False, log_to_driver=False)
    try:
        coloc = _gpu_ids(cpu_light(DEPLOY / "examples" / "grpo_gpu_colocated.yaml"))
        rollout = [ids[0] for ids in coloc["rollout"]]
        learner = [ids[0] for ids in coloc["learner"]]
        assert sorted(rollout) == sorted(learner) == [str(i) for i in range(8)]  # one of each on every GPU
        assert rollout == learner  # worker i beside rank i

        for name in ("grpo_gpu_disaggregated.yaml", "opd_gpu_disaggregated.yaml"):
            got = _gpu_ids(cpu_light(DEPLOY / "examples" / name))
            used = [g for role in ("rollout", "learner", "teacher") for ids in got.get(role, []) for g in ids]
            assert len(used) == len(set(used)), (name, got)  # no GPU shared between roles or actors
            assert all(len(ids) == 1 for role in ("rollout", "learner") for ids in got[role])
            assert got["reward"] == [[]]
    finally:
        ray.shutdown()
