"""The GPU launch path on CPU: colocated placement, start-up order, the rollout actors' env, and
which defaults travel from the driver to a cluster.

GPUs here are Ray's logical ones (``ray.init(num_gpus=4)``): Ray assigns their ids to actors
exactly as on hardware, which is all placement is about. The actors are fakes that report where
they landed and when they started, put in place of the real classes in cluster/launch.py, so
start_roles itself (placement groups, bundle indices, options, order) is what runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from protege.core import env as penv
from protege.cluster import launch
from protege.cluster.placement import (
    COLOCATED,
    PlacementError,
    colocated,
    group_bundles,
    placement_bundles,
    reserve,
    role_requests,
)
from protege.core.spec import load_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "examples"
SYNC_KEY = "VLLM_ALLOW_INSECURE_SERIALIZATION"
JOB_KEY = "PROTEGE_TEST_JOB_VAR"  # set in the test Ray's job runtime_env


def example(name: str, *, pairs: int | None = None, weight_sync: str = "object_store"):
    """An example spec with CPU asks shrunk to fit 2 cores (GPU asks untouched)."""
    spec = load_spec(EXAMPLES / name)
    for role in ("rollout", "learner", "reward", "teacher"):
        getattr(spec.resources, role).cpus = 0.01
    if pairs is not None:
        spec.rollout.workers = spec.learner.ranks = pairs
    spec.learner.weight_sync = weight_sync
    spec.resources.placement_timeout_s = 30
    return spec


# ------------------------------------------------------------------------------------ pure
def test_colocated_example_shares_one_group_a_gpu_per_pair():
    spec = example("grpo_gpu_colocated.yaml")
    assert colocated(spec) and launch.must_wait_for_rollout(spec)
    reqs = {q.role: q for q in role_requests(spec)}
    assert reqs["rollout"].group == reqs["learner"].group == COLOCATED
    assert reqs["reward"].group == "reward"
    # bundle i = worker i + rank i, the whole GPU reserved for the pair
    assert group_bundles([reqs["rollout"], reqs["learner"]]) == [{"CPU": 0.02, "GPU": 1.0, "gpu_8x": 1.0}] * 8


@pytest.mark.parametrize("name", ["grpo_gpu_disaggregated.yaml", "opd_gpu_disaggregated.yaml"])
def test_disaggregated_examples_keep_a_group_per_role(name):
    spec = example(name)
    assert not colocated(spec) and not launch.must_wait_for_rollout(spec)
    assert all(q.group == q.role for q in role_requests(spec))


def test_colocation_needs_a_pair_per_gpu():
    spec = example("grpo_gpu_colocated.yaml")
    spec.learner.ranks = 4  # 8 workers, 4 ranks: no pairs; still sharing GPUs, so still waiting
    assert not colocated(spec) and launch.must_wait_for_rollout(spec)
    spec = example("grpo_gpu_colocated.yaml")
    spec.resources.learner.gpus = 0.6  # 0.55 + 0.6 does not fit one GPU
    assert not colocated(spec)


@pytest.mark.parametrize("mode,wanted", [("nccl", True), ("auto", True), ("object_store", False)])
@pytest.mark.parametrize("driver", [None, "0"])
def test_rollout_env_carries_gpu_sync_switch_whatever_the_driver_has(monkeypatch, mode, wanted, driver):
    if driver is None:
        monkeypatch.delenv(SYNC_KEY, raising=False)
    else:
        monkeypatch.setenv(SYNC_KEY, driver)
    got = launch.rollout_runtime_env(example("grpo_gpu_disaggregated.yaml", weight_sync=mode))
    assert (got == {"env_vars": {SYNC_KEY: "1"}}) if wanted else got is None


# ------------------------------------------------------------------- defaults: node vs driver
@pytest.fixture
def cpu_driver(monkeypatch):
    """A driver on a CPU machine whose user set none of the node defaults."""
    for key in penv.CPU_NODE_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(penv, "has_cuda", lambda: False)
    monkeypatch.setattr(penv, "_node_defaulted", set())
    return monkeypatch


def test_node_defaults_follow_the_nodes_hardware(cpu_driver):
    cpu_driver.setattr(penv, "has_cuda", lambda: True)
    assert penv.configure_node_defaults() == {}
    assert not any(k in os.environ for k in penv.CPU_NODE_DEFAULTS)
    cpu_driver.setattr(penv, "has_cuda", lambda: False)
    cpu_driver.setenv("OMP_NUM_THREADS", "8")  # the user's own value wins
    assert penv.configure_node_defaults() == {k: v for k, v in penv.CPU_NODE_DEFAULTS.items() if k != "OMP_NUM_THREADS"}
    assert os.environ["DS_ACCELERATOR"] == "cpu" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ["OMP_NUM_THREADS"] == "8"


def test_cpu_threads_use_the_cores_the_other_roles_leave_idle():
    # max_staleness 0: the learners wait while the engines generate and the engines while the learners
    # train, so the rollout workers (or the ranks) share the node
    assert penv.cpu_threads("auto", node_cpus=2, sharers=1, overlap=False, cuda=False) == 2
    assert penv.cpu_threads("auto", node_cpus=16, sharers=3, overlap=False, cuda=False) == 5
    assert penv.cpu_threads("auto", node_cpus=2, sharers=4, overlap=False, cuda=False) == 1
    # staleness ≥ 1: generation overlaps training, one thread as every other CPU actor
    assert penv.cpu_threads("auto", node_cpus=16, sharers=1, overlap=True, cuda=False) == 1
    assert penv.cpu_threads(3, node_cpus=2, sharers=1, overlap=True, cuda=False) == 3  # the user's number
    assert penv.cpu_threads("auto", node_cpus=16, sharers=1, overlap=False, cuda=True) is None  # vLLM decides
    assert penv.cpu_threads(3, node_cpus=16, sharers=1, overlap=False, cuda=True) is None


def test_cluster_gets_no_cpu_defaults_from_a_cpu_driver(cpu_driver):
    penv.configure_defaults()
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # the driver's own process still has them
    sent = penv.worker_env(local=False)
    assert not set(penv.CPU_NODE_DEFAULTS) & set(sent), sent
    assert sent["TOKENIZERS_PARALLELISM"] == "false"  # hardware-independent ones still travel
    assert {k: penv.worker_env(local=True)[k] for k in penv.CPU_NODE_DEFAULTS} == penv.CPU_NODE_DEFAULTS
    # callers that pass no `local` (serve, jobs, benches): a cluster when $RAY_ADDRESS names one
    cpu_driver.setenv("RAY_ADDRESS", "ray://gpu-cluster:10001")
    assert not set(penv.CPU_NODE_DEFAULTS) & set(penv.worker_env())
    cpu_driver.delenv("RAY_ADDRESS")
    assert {k: penv.worker_env()[k] for k in penv.CPU_NODE_DEFAULTS} == penv.CPU_NODE_DEFAULTS


def test_user_set_node_variables_still_travel(cpu_driver):
    cpu_driver.setenv("DS_ACCELERATOR", "cpu")
    cpu_driver.setenv("OMP_NUM_THREADS", "4")
    penv.configure_defaults()
    sent = penv.worker_env(local=False)
    assert sent["DS_ACCELERATOR"] == "cpu" and sent["OMP_NUM_THREADS"] == "4"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in sent


@pytest.mark.parametrize("address", ["ray://gpu-cluster:10001", None])
def test_connect_ships_cpu_defaults_only_to_an_embedded_ray(cpu_driver, address):
    import ray

    penv.configure_defaults()
    calls = []
    cpu_driver.setattr(ray, "is_initialized", lambda: False)
    cpu_driver.setattr(ray, "init", lambda **kw: calls.append(kw))
    cpu_driver.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    if address:
        cpu_driver.setenv("RAY_ADDRESS", address)
    else:
        cpu_driver.delenv("RAY_ADDRESS", raising=False)
    got = launch.connect()
    (kw,) = calls
    sent = kw["runtime_env"]["env_vars"]
    if address:
        assert got["embedded"] is False and kw["address"] == address
        assert not set(penv.CPU_NODE_DEFAULTS) & set(sent), sent
    else:  # a CPU laptop with its own Ray: exactly the CPU defaults, as before
        assert got["embedded"] is True
        assert {k: sent[k] for k in penv.CPU_NODE_DEFAULTS} == penv.CPU_NODE_DEFAULTS


# ----------------------------------------------------------------- start_roles on logical GPUs
def fake_actors(rollout_delay_s: float):
    """Stand-ins for the real actor classes (defined here so Ray pickles them by value)."""
    import ray

    def where() -> dict:
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "env": {k: os.environ.get(k) for k in (SYNC_KEY, JOB_KEY)},
        }

    class Rollout:
        def __init__(self, *args, **kwargs):
            time.sleep(rollout_delay_s)  # vLLM building its engine and profiling GPU memory
            self.ready_at = time.time()

        def pid(self) -> int:
            return os.getpid()

        def report(self) -> dict:
            return {**where(), "ready_at": self.ready_at}

    class Learner:
        def __init__(self, **kwargs):
            self.created_at = time.time()

        def setup(self, addr, port) -> dict:
            return {}

        def report(self) -> dict:
            return {**where(), "created_at": self.created_at}

    class Reward:
        def __init__(self, *args, **kwargs):
            pass

    return ray.remote(Rollout), ray.remote(Learner), ray.remote(Reward)


@pytest.fixture(scope="module")
def ray_gpus():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    saved = os.environ.pop(SYNC_KEY, None)  # Ray's local processes inherit the driver's env
    ray.init(
        num_cpus=2,
        num_gpus=4,
        resources={"gpu_8x": 8},
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {JOB_KEY: "job"}},
    )
    yield ray
    ray.shutdown()
    if saved is not None:
        os.environ[SYNC_KEY] = saved


def launch_fakes(monkeypatch, spec, rollout_delay_s: float = 0.0):
    import ray

    r, ln, rw = fake_actors(rollout_delay_s)
    monkeypatch.setattr(launch, "RolloutActor", r)
    monkeypatch.setattr(launch, "LearnerActor", ln)
    monkeypatch.setattr(launch, "RewardActor", rw)
    roles = launch.start_roles(spec)
    try:
        return (
            ray.get([w.report.remote() for w in roles.rollout]),
            ray.get([x.report.remote() for x in roles.learners]),
        )
    finally:
        roles.kill_all()


@pytest.mark.parametrize("pairs", [2, 4])
def test_colocated_rank_shares_gpu_and_node_with_its_worker(ray_gpus, monkeypatch, pairs):
    """Also with fewer pairs than GPUs, where separately placed groups could put rank i on another
    GPU than worker i."""
    rollout, learners = launch_fakes(monkeypatch, example("grpo_gpu_colocated.yaml", pairs=pairs))
    for i, (w, ln) in enumerate(zip(rollout, learners)):
        assert len(w["gpus"]) == 1 and ln["gpus"] == w["gpus"] and ln["node"] == w["node"], (i, w, ln)
    assert len({w["gpus"][0] for w in rollout}) == pairs  # one pair per GPU: no two ranks share one


def test_colocated_learners_start_after_the_rollout_engines(ray_gpus, monkeypatch):
    rollout, learners = launch_fakes(monkeypatch, example("grpo_gpu_colocated.yaml", pairs=2), rollout_delay_s=3.0)
    assert min(ln["created_at"] for ln in learners) >= max(w["ready_at"] for w in rollout)


def test_rollout_actors_carry_the_gpu_sync_switch(ray_gpus, monkeypatch):
    """Set on the actor, merged into the job's runtime_env, whatever the driver's env has."""
    monkeypatch.delenv(SYNC_KEY, raising=False)
    rollout, learners = launch_fakes(monkeypatch, example("grpo_gpu_colocated.yaml", pairs=2, weight_sync="nccl"))
    assert all(w["env"] == {SYNC_KEY: "1", JOB_KEY: "job"} for w in rollout)
    assert all(ln["env"] == {SYNC_KEY: None, JOB_KEY: "job"} for ln in learners)


def test_disaggregated_roles_get_gpus_of_their_own(ray_gpus, monkeypatch):
    spec = example("grpo_gpu_disaggregated.yaml")
    spec.rollout.workers = spec.learner.ranks = 2  # 4 whole GPUs
    rollout, learners = launch_fakes(monkeypatch, spec)
    used = [g for a in rollout + learners for g in a["gpus"]]
    assert len(used) == 4 and len(set(used)) == 4


def test_colocated_group_that_does_not_fit_names_both_roles(ray_gpus):
    spec = example("grpo_gpu_colocated.yaml")  # 8 pairs, 4 GPUs
    with pytest.raises(
        PlacementError,
        match=r"role 'rollout' asked for 8 × \{CPU: 0\.01, GPU: 0\.55, gpu_8x: 0\.5\}; "
        r"role 'learner' asked for 8 × .*rollout and learner share one bundle "
        r"per pair.*The cluster has .*GPU: 4",
    ):
        reserve(role_requests(spec), 2)
    import ray

    assert ray.util.placement_group_table() == {} or all(
        p["state"] == "REMOVED" for p in ray.util.placement_group_table().values()
    )


def test_a_role_that_fails_to_start_leaves_no_placement_group(ray_gpus, monkeypatch):
    """A learner whose setup raises (out of memory, a bad model) fails the job, and the job's
    named placement groups go with it: the next job in the same cluster starts."""
    import ray
    from ray.util import placement_group_table

    r, _, rw = fake_actors(0.0)

    @ray.remote
    class BrokenLearner:
        def __init__(self, **kwargs):
            pass

        def setup(self, addr, port):
            raise RuntimeError("learner setup failed")

    monkeypatch.setattr(launch, "RolloutActor", r)
    monkeypatch.setattr(launch, "LearnerActor", BrokenLearner)
    monkeypatch.setattr(launch, "RewardActor", rw)
    spec = example("grpo_gpu_disaggregated.yaml")
    spec.rollout.workers = spec.learner.ranks = 2  # 4 whole GPUs
    with pytest.raises(ray.exceptions.RayTaskError, match="learner setup failed"):
        launch.start_roles(spec)
    alive = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
    assert alive == [], alive
    deadline = time.time() + 30  # removed groups hand their GPUs back asynchronously
    while ray.available_resources().get("GPU", 0) < 4 and time.time() < deadline:
        time.sleep(0.5)
    monkeypatch.setattr(launch, "LearnerActor", fake_actors(0.0)[1])
    launch.start_roles(spec).kill_all()  # the same names are free again


def test_teacher_replicas_reserve_one_bundle_each():
    spec = parse_spec(
        {
            "models": {"student": {"path": "s"}, "teacher": {"path": "t"}},
            "algorithm": {"type": "opd"},
            "data": {"task": "chain_sum"},
            "resources": {"teacher": {"replicas": 3, "cpus": 0.5}},
        }
    )
    teacher = next(q for q in role_requests(spec) if q.role == "teacher")
    assert teacher.count == 3 and teacher.bundle == {"CPU": 0.5}
    assert placement_bundles(role_requests(spec))["teacher"] == [{"CPU": 0.5}] * 3
