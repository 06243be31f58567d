"""The autoscaling premise without a cluster: the job spec's roles cannot place on the head and one
worker node holds one of them. The simulated multi-node cluster itself is in
tests/integration/test_autoscaling.py."""

from __future__ import annotations

from pathlib import Path


TASK = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+"],
    "allow_negation": False,
    "allow_parentheses": False,
}


NODE_TYPE = "gpu_sim"  # stands in for a GPU node group: what KubeRay calls a worker group


IDLE_TIMEOUT_MIN = 0.1  # 6 s; the deploy manifests use 60 s


def autoscaler_config(gcs_address: str, max_workers: int = 3) -> dict:
    """A fake multi-node cluster config: a head with 1 CPU and no ``gpu_node``, workers that have it."""
    return {
        "cluster_name": "protege-autoscaling-test",
        "max_workers": max_workers,
        # launch_multiple: start as many nodes as the autoscaler asks for at once (the provider's
        # default starts one per request, whatever the count).
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
            "launch_multiple": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            NODE_TYPE: {
                "resources": {"CPU": 1, "gpu_node": 1, "object_store_memory": 200 * 1024 * 1024},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def autoscaling_spec(run_root: Path, student: str) -> dict:
    """A small real GRPO job whose rollout worker and learner each need a whole ``gpu_node``:
    the disaggregated layout (deploy/examples/grpo_gpu_disaggregated.yaml) at toy scale."""
    return {
        "name": "autoscale",
        "seed": 0,
        "steps": 2,
        "models": {"student": {"path": student}},
        "data": {
            "source": "reasoning_gym",
            "task": "basic_arithmetic",
            "task_config": TASK,
            "size": 64,
            "eval_size": 4,
        },
        "algorithm": {"type": "grpo"},
        "rollout": {"samples_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 8, "workers": 1},
        "learner": {"ranks": 1, "zero_stage": 2, "micro_batch": 4},
        "rewards": [{"name": "exact_match"}],
        "checkpoint": {"dir": str(run_root / "autoscale"), "interval": 1, "keep": 1},
        "eval": {"interval": 2, "size": 4},
        "resources": {
            "rollout": {"cpus": 0.5, "custom": {"gpu_node": 1}},
            "learner": {"cpus": 0.5, "custom": {"gpu_node": 1}},
            "reward": {"cpus": 0.25},
            # the nodes do not exist yet: give the autoscaler time to add them
            "placement_timeout_s": 150,
        },
    }


def test_spec_needs_worker_nodes():
    """Fast check of the premise: the head cannot hold the roles; one worker node holds one of them."""
    from protege.cluster.placement import role_requests
    from protege.core.spec import parse_spec

    spec = parse_spec(autoscaling_spec(Path("/tmp/x"), "/models/student"))
    types = autoscaler_config("127.0.0.1:1")["available_node_types"]
    head, worker = types["ray.head.default"]["resources"], types[NODE_TYPE]["resources"]
    needs_worker = [q for q in role_requests(spec) if "gpu_node" in q.bundle]
    assert {q.role for q in needs_worker} == {"rollout", "learner"}
    for q in needs_worker:
        assert "gpu_node" not in head and q.bundle["gpu_node"] <= worker["gpu_node"] < 2 * q.bundle["gpu_node"]
