"""Composition root: the only place plain classes become Ray actors (docs/design.md).

Connects to the cluster, reserves resources per role, and builds the rollout workers, the
scorers (``SCORERS``: rule rewards, reward model, teacher) and the learner group from the spec.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from protege.actors.rollout import RolloutWorker
from protege.cluster.placement import reserve, role_requests, shares_gpus
from protege.core.console import actor_env, verbose
from protege.core.env import free_ports, worker_env
from protege.learners.batching import micro_batch_count
from protege.learners.learner import Learner
from protege.rewards.base import RewardRunner
from protege.rewards.custom import reward_functions
from protege.rewards.reward_model import RewardModelScorer
from protege.rewards.teacher import TeacherScorer

RolloutActor = ray.remote(RolloutWorker)
LearnerActor = ray.remote(Learner)
RewardActor = ray.remote(RewardRunner)
RewardModelActor = ray.remote(RewardModelScorer)
TeacherActor = ray.remote(TeacherScorer)


# ---- replicas of one scorer behind one handle ----------------------------------------------
# ``pool.score.remote(rollouts, examples)`` splits its list arguments into contiguous chunks, one
# per replica, calls every replica at once and returns one ObjectRef to the results concatenated
# in order, so callers (cluster/scoring.py, cluster/phases.py) cannot tell a pool from one actor.
# The concatenation is a zero-CPU Ray task: the parts never pass through the driver.


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


def _ray_log_level() -> int:
    import logging

    return logging.INFO if verbose() else logging.WARNING  # "Started a local Ray instance" etc.


def connect() -> dict[str, Any]:
    """$RAY_ADDRESS when set (a cluster), else an embedded local Ray started in-process."""
    if ray.is_initialized():
        return {"address": "existing", "embedded": False}
    address = os.environ.get("RAY_ADDRESS")
    # A cluster's nodes need not have this machine's hardware: only what the user set travels there,
    # and each actor sets its node's defaults itself. An embedded Ray's actors run here, so ours apply.
    env = {"env_vars": worker_env(local=not address)}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # Inside a Ray job: the job's runtime_env already carries our env vars, and Ray refuses
        # a second, overlapping one from the driver.
        ray.init(address=address or "auto", log_to_driver=verbose(), logging_level=_ray_log_level())
        return {"address": address or "auto", "embedded": False}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=verbose(), logging_level=_ray_log_level())
        return {"address": address, "embedded": False}
    ray.init(
        num_cpus=os.cpu_count(),
        runtime_env=env,
        include_dashboard=False,
        log_to_driver=verbose(),
        logging_level=_ray_log_level(),
    )
    return {"address": "local", "embedded": True}


@dataclass
class Roles:
    rollout: list = field(default_factory=list)
    learners: list = field(default_factory=list)
    scorers: dict = field(default_factory=dict)  # role name (a key of SCORERS) -> actor, those this job runs
    pids: dict = field(default_factory=dict)  # role -> process id(s) as last seen (actors.json)
    groups: dict = field(default_factory=dict)
    grad_accum: int = 1

    @property
    def teacher(self) -> Any:
        """The teacher actor, or None: besides scoring it generates (KEPO hints, SFT targets) and
        gives DPO's reference log-probs."""
        return self.scorers.get("teacher")

    def kill_all(self) -> None:
        scorers = [x for a in self.scorers.values() for x in getattr(a, "actors", [a])]  # a pool's replicas
        for a in [*self.rollout, *self.learners, *scorers]:
            if a is not None:
                try:
                    ray.kill(a)
                except Exception:
                    pass
        from ray.util.placement_group import remove_placement_group

        for pg in {pg.id: pg for pg in self.groups.values()}.values():  # colocated roles share one
            try:
                remove_placement_group(pg)
            except Exception:
                pass


def gpu_memory_share(spec, role: str) -> float:
    """vLLM's gpu_memory_utilization for a role's engine: the spec's value, else all of a GPU the
    role has to itself (disaggregated) or 0.3 of one it shares (colocated: the learner rank on the
    same GPU needs the rest for weights, gradients and optimizer state)."""
    if spec.rollout.gpu_memory_utilization is not None:
        return spec.rollout.gpu_memory_utilization
    return 0.85 if getattr(spec.resources, role).gpus >= 1 else 0.3


# vLLM's GPU weight transfer pickles CUDA IPC handles and worker-side functions into its engine
# process; vLLM refuses that unless this is set before the engine starts. Set per rollout actor, so
# it holds however the job was started (a KubeRay RayJob's driver passes no runtime_env at all).
GPU_SYNC_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def rollout_runtime_env(spec) -> dict | None:
    """The rollout actors' own runtime_env (Ray merges its env_vars into the job's): the GPU weight
    transfer's switch when learner.weight_sync may use it (nccl, or auto on GPUs)."""
    if spec.learner.weight_sync == "object_store":
        return None
    return {"env_vars": dict(GPU_SYNC_ENV)}


def actor_runtime_env(spec, name: str, base: dict | None = None) -> dict | None:
    """An actor's runtime_env: ``base`` plus where its output goes (core/console.py)."""
    env = {**((base or {}).get("env_vars") or {}), **actor_env(spec.run_dir, name)}
    return {**(base or {}), "env_vars": env} if env else base


def must_wait_for_rollout(spec) -> bool:
    """Learner ranks start only once the rollout engines are built when the two may share a GPU:
    vLLM profiles free GPU memory at start-up and asserts it never grows meanwhile, so a rank on the
    same GPU freeing memory in that window kills the engine."""
    return shares_gpus(spec)


def _opts(pg, index: int, bundle: dict[str, float], **extra) -> dict:
    resources = {k: v for k, v in bundle.items() if k not in {"CPU", "GPU"}}
    return dict(
        num_cpus=bundle.get("CPU", 0),
        num_gpus=bundle.get("GPU", 0),
        resources=resources or None,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
        **extra,
    )


def gather(refs: list) -> list:
    """ray.get over a group that fails fast: a rank that died raises at once, instead of waiting
    for its peers, which may be blocked in a collective with it."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)  # raises the first failure
    return ray.get(list(refs))


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """Address and a free port on the node that hosts learner rank 0 (core/env.py's free_ports,
    which learner rank 0 also uses for the GPU weight-sync groups)."""
    address, (port,) = free_ports(1)
    return address, port


def _reward_args(spec) -> tuple[tuple, dict]:
    # The runner applies every reward that has a function (built-in or the user's); the others
    # (reward_model) come from their own scorer.
    functions = reward_functions(spec.rewards)
    return ([r.name for r in spec.rewards if r.name in functions],), dict(
        timeout_s=spec.fault_tolerance.reward_timeout_s, functions=functions
    )


def _reward_model_args(spec) -> tuple[tuple, dict]:
    rm = spec.models.reward_model
    return (rm.path,), dict(dtype=rm.dtype, system_prompt=spec.data.system_prompt)


def _teacher_args(spec) -> tuple[tuple, dict]:
    t, ask = spec.models.teacher, spec.teacher_request()
    return (t.path,), dict(
        top_k=ask.top_k,
        full=ask.full,
        dtype=t.dtype,
        temperature=spec.rollout.temperature,
        engine=spec.rollout.engine,
        max_model_len=spec.max_model_len,
        kv_cache_bytes=int(spec.rollout.kv_cache_gb * (1 << 30)),
        gpu_memory_utilization=gpu_memory_share(spec, "teacher"),
        score_engine=spec.teacher_score_engine(),
        max_logprobs=ask.top_k,
    )


# The scorer actors by role name: that name is also their placement group, their actors.json key
# and their fault/<name>_restarts metric. Each keeps one contract, score(rollouts, examples) ->
# list[ScoreRecord] (core/records.py), so the driver treats them alike (cluster/scoring.py). The
# values: the actor class and (args, kwargs) for it from the spec.
SCORERS: dict[str, tuple[Any, Callable[[Any], tuple[tuple, dict]]]] = {
    "reward": (RewardActor, _reward_args),
    "reward_model": (RewardModelActor, _reward_model_args),
    "teacher": (TeacherActor, _teacher_args),
}


def start_roles(spec) -> Roles:
    reqs = {q.role: q for q in role_requests(spec)}
    groups = reserve(list(reqs.values()), spec.resources.placement_timeout_s)
    roles = Roles(groups=groups)
    try:
        _start_actors(spec, roles, reqs)
    except BaseException:
        # A role that fails to start (a learner's setup, an engine build, Ctrl-C) must not leave
        # the job's named placement groups behind: the next job in this Ray cluster would fail
        # with "placement group 'protege-rollout' already exists".
        roles.kill_all()
        raise
    return roles


def _start_actors(spec, roles: Roles, reqs: dict) -> None:
    groups = roles.groups
    student = spec.models.student
    max_len = spec.max_model_len
    ft = spec.fault_tolerance
    # Stateless helpers restart and retry by themselves. Rollout workers restart but never retry
    # on their own: a restarted worker holds the initial weights, so the driver re-syncs it first.
    restart = dict(max_restarts=ft.actor_restarts)
    for i in range(spec.rollout.workers):
        roles.rollout.append(
            RolloutActor.options(
                **_opts(groups["rollout"], i, reqs["rollout"].bundle),
                **restart,
                max_task_retries=0,
                runtime_env=actor_runtime_env(spec, f"rollout-{i}", rollout_runtime_env(spec)),
            ).remote(
                student.path,
                engine=spec.rollout.engine,
                dtype=student.dtype,
                seed=spec.seed + i,
                max_model_len=max_len,
                kv_cache_bytes=int(spec.rollout.kv_cache_gb * (1 << 30)),
                gpu_memory_utilization=gpu_memory_share(spec, "rollout"),
                compiled=spec.rollout_compiled(),
                threads=spec.rollout.cpu_threads,
                workers=spec.rollout.workers,
                overlap=spec.rollout_overlaps_training(),
            )
        )
    for name, (actor, arguments) in SCORERS.items():
        if name not in groups:  # this job has no such scorer (cluster/placement.py role_requests)
            continue
        args, kwargs = arguments(spec)
        replicas = [
            actor.options(
                **_opts(groups[name], i, reqs[name].bundle),
                **restart,
                max_task_retries=ft.actor_restarts,
                runtime_env=actor_runtime_env(spec, name if i == 0 else f"{name}-{i}"),
            ).remote(*args, **kwargs)
            for i in range(reqs[name].count)
        ]
        roles.scorers[name] = replicas[0] if len(replicas) == 1 else ReplicaPool(replicas)
    # Fixed micro-batch count per rank, so every rank runs the same number of forward/backward
    # calls each step (DeepSpeed collectives) whatever the batch's real size.
    # grad_accum is per mini-batch: DeepSpeed steps the optimizer once per mini-batch.
    # With a token budget the count is sized for the longest sequence a step can hold.
    per_rank = math.ceil(spec.rows_per_step() / spec.learner.ranks)
    roles.grad_accum = micro_batch_count(
        per_rank,
        micro_batch=spec.learner.micro_batch,
        mini_batches=spec.learner.mini_batches,
        tokens=spec.learner.micro_batch_tokens,
        max_len=max_len,
        group=2 if spec.algorithm.needs().pairs else 1,
    )
    if must_wait_for_rollout(spec):
        gather([w.pid.remote() for w in roles.rollout])  # answers once __init__ (the engine) is done
    start_learners(spec, roles, reqs["learner"].bundle)


def start_learners(spec, roles: Roles, bundle: dict[str, float] | None = None) -> None:
    """(Re)build the DeepSpeed group. A rank that dies breaks the collectives of all ranks, so a
    failed group is replaced whole (the driver then reloads the last checkpoint)."""
    for ln in roles.learners:
        try:
            ray.kill(ln)
        except Exception:
            pass
    roles.learners = []
    bundle = bundle or {q.role: q for q in role_requests(spec)}["learner"].bundle
    algo = spec.algorithm
    pg = roles.groups["learner"]
    for rank in range(spec.learner.ranks):
        roles.learners.append(
            LearnerActor.options(
                **_opts(pg, rank, bundle), runtime_env=actor_runtime_env(spec, f"learner-{rank}")
            ).remote(
                rank=rank,
                world_size=spec.learner.ranks,
                model_path=spec.models.student.path,
                learner_spec=spec.learner,
                algo=algo,
                temperature=spec.rollout.temperature,
                grad_accum=roles.grad_accum,
                seed=spec.seed,
                needs_ref=algo.needs().reference,
                max_response_tokens=spec.rollout.max_new_tokens,
                overlap=spec.rollout_overlaps_training(),
            )
        )
    addr, port = ray.get(
        _rendezvous.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        ).remote()
    )
    ray.get([ln.setup.remote(addr, port) for ln in roles.learners])
