"""The driver: one loop, every phase visible (docs/design.md, "The driver loop").

    prompts → responses (the student samples them: generate) → score (rewards ‖ teacher)
            → [dynamic sampling: refill with new prompts until enough groups' rewards differ]
            → [KEPO: hints for groups that all failed] → credit → learner step → weight sync
            → metrics / eval / checkpoint

Each phase submits all of its remote work and waits once (cluster/phases.py). With
``algorithm.max_staleness = 1`` the generation of step t+1 is submitted before step t trains,
so it overlaps training and carries policy version t-1; the learner's recomputed log-probs
serve as π_old and truncated importance sampling corrects for the older sampler. With 0,
every rollout comes from the newest weights. What differs between algorithms is read from
the spec variant's ``needs()`` and from learners/algorithms.py, never branched on here.
"""

from __future__ import annotations

import json
import sys
import time
from math import nan
from pathlib import Path

import ray

from protege.cluster import run_state
from protege.cluster.gpu_status import gpu_warnings
from protege.cluster.jobdata import Encoder, load_job_data
from protege.cluster.launch import SCORERS, Roles, connect, gather, start_learners, start_roles
from protege.cluster.metrics import MetricsWriter, plot_curves
from protege.cluster.phases import Faults, Job, JobError, PhaseTimer
from protege.core import checkpoints, storage
from protege.core.console import Progress, quiet_driver
from protege.core.data import PromptStream
from protege.learners.algorithms import build_rows

__all__ = ["JobError", "run"]


def run(
    spec, *, resume: bool = False, stop_after: int | None = None, progress: bool = True, quiet: bool = False
) -> dict:
    """Train as ``spec`` says. ``stop_after`` ends the session after that many steps (tests).
    ``quiet`` (the CLI's default) sends this process's third-party logging and warnings to
    RUN_DIR/logs/driver.log; the actors' output goes to RUN_DIR/logs/ in any case."""
    logs, enc, train_set, eval_set = _before_any_resource(spec, resume=resume, quiet=quiet)
    say = print if progress else (lambda *a, **k: None)
    say(
        f"protege: {spec.name}: {spec.algorithm.type} for {spec.steps} steps -> {spec.run_dir}"
        + (f" (logs: {logs.parent})" if logs else ""),
        flush=True,
    )
    t0 = time.perf_counter()
    where = connect()
    try:
        roles = start_roles(spec)
    except Exception:
        _point_at_logs(logs)
        raise
    replicas = spec.resources.teacher.replicas
    teacher = "" if roles.teacher is None else ", teacher" + (f" ×{replicas}" if replicas > 1 else "")
    say(
        f"protege: {len(roles.rollout)} rollout worker(s) ({_engine_label(spec)}), {len(roles.learners)} learner rank(s)"
        + teacher
        + f" ready in {time.perf_counter() - t0:.0f} s "
        f"(Ray: {where['address']})",
        flush=True,
    )
    start = checkpoints.read_state(c)["step"] if resume and (c := checkpoints.latest(spec.run_location)) else 0
    until = spec.steps if stop_after is None else min(spec.steps, start + stop_after)
    faults = Faults()
    try:
        while True:
            _write_actor_table(spec.run_dir, roles)
            try:
                return _train(
                    Job(spec, roles, enc, faults), train_set, eval_set, resume=resume, until=until, progress=progress
                )
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                if not _learner_group_broken(roles, err):
                    raise
                _restart_learners(spec, roles, faults, err)
                resume = True  # the rebuilt group continues from the last checkpoint
    except Exception:
        _point_at_logs(logs)
        raise
    finally:
        roles.kill_all()


def _engine_label(spec) -> str:
    """What generates, as the start-up line says it: "vllm, compiled", "vllm, eager" or "hf"."""
    if spec.rollout.engine != "vllm":
        return spec.rollout.engine
    return "vllm, compiled" if spec.rollout_compiled() else "vllm, eager"


def _before_any_resource(spec, *, resume: bool, quiet: bool):
    """Everything that can be refused before a process starts: bad data, a teacher with another
    tokenizer, a reward function that does not import, an unwritable object store."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    logs = quiet_driver(spec.run_dir) if quiet else None
    (spec.run_dir / "resolved_spec.json").write_text(spec.model_dump_json(indent=2))
    train_set, eval_set = load_job_data(spec)
    tok = _check_tokenizers(spec)
    _check_reward_functions(spec)
    enc = Encoder.for_spec(tok, spec)
    if spec.run_uri:  # a missing backend, bad credentials or an unwritable bucket fail here, too
        run_state.open_remote_run(spec, resume)
    for w in gpu_warnings(spec):
        print(f"warning: {w}", file=sys.stderr)
    return logs, enc, train_set, eval_set


def _restart_learners(spec, roles: Roles, faults: Faults, err: Exception) -> None:
    """A dead rank breaks the group's collectives: rebuild all ranks (the caller reloads the last
    checkpoint), or stop once fault_tolerance.learner_restarts is spent."""
    deaths = faults.count("learner")
    if deaths > spec.fault_tolerance.learner_restarts:
        last = checkpoints.latest(spec.run_location)
        raise JobError(
            f"a learner rank died {deaths} times (fault_tolerance.learner_restarts = "
            f"{spec.fault_tolerance.learner_restarts}); stopping. Last checkpoint: {last or 'none'}; "
            "continue with `protege run SPEC --resume`."
        ) from err
    print(
        f"learner rank died ({err.__class__.__name__}); reloading the learner group from the last checkpoint",
        file=sys.stderr,
    )
    start_learners(spec, roles)


def _train(job: Job, train_set, eval_set, *, resume: bool, until: int, progress: bool) -> dict:
    """The loop of the module docstring, one step per iteration."""
    spec, needs, G = job.spec, job.needs, job.spec.rollout.samples_per_prompt
    stream = PromptStream(train_set, seed=spec.seed)
    step, version, metrics = _start(job, stream, eval_set, resume=resume)
    overlap = spec.rollout_overlaps_training()  # generation of step t+1 runs while step t trains
    bar = Progress(step, spec.steps, enabled=progress)
    evals: dict[str, float] = {}  # the newest eval metrics: on the progress line, stored with each checkpoint
    batch = job.submit(stream, step, version) if step < until else None
    while step < until:
        timer = PhaseTimer()
        responses = job.responses(batch, version)  # the student's samples (or the data's / teacher's)
        timer.add("generate", time.perf_counter() - batch.submitted)
        batch = None  # consumed: from here on the stream position includes it
        if overlap and step + 1 < until:
            batch = job.submit(stream, step + 1, version)
        with timer("score"):
            scored = job.score(responses)
        filled = {}
        if needs.resample_rounds and responses.rollouts:
            with timer("refill"):
                responses, scored, filled = job.fill_groups(stream, responses, scored, step, version)
        hinted = {}
        if needs.hints and responses.rollouts:
            with timer("hints"):
                responses, scored, hinted = job.explore_with_hints(responses, scored, step)
        rows, credit = build_rows(
            spec.algorithm,
            responses.rollouts,
            [s.value for s in scored.scores],
            G,
            scored.teacher,
            quality=job.quality(scored),
        )
        with timer("train"):
            learned = job.learner_step(rows, version)
        version, step = version + 1, step + 1
        evaluate = bool(eval_set) and (step % spec.eval.interval == 0 or step == spec.steps)
        with timer("sync"):  # an algorithm that never samples from the student syncs only to evaluate
            synced = job.sync(version) if needs.generates or evaluate else {}
        if not overlap and step < until:
            batch = job.submit(stream, step, version)
        m = {
            **learned,
            **credit,
            **filled,
            **hinted,
            **job.faults.metrics(),
            **synced,
            **scored.metrics,
            **job.rollout_metrics(responses, scored, version, timer.seconds["generate"]),
            **timer.metrics(),
        }
        if evaluate:
            evals = job.evaluate(eval_set, version)
            m.update(evals)
            bar.line(
                f"eval   step {step}: accuracy {evals['eval/accuracy']:.3f} on "
                f"{min(spec.eval.size, len(eval_set))} held-out prompts"
            )
        metrics.write(step, m)
        job.log_samples(step, responses, scored)
        if step % spec.checkpoint.interval == 0 or step == spec.steps:
            # The next batch may already be in flight: store the data position before it.
            data = batch.data_before if batch is not None else stream.state_dict()
            bar.line(f"saved  step {step}: {run_state.save(spec, job.roles, data, step, version, evals=dict(evals))}")
        bar.update(
            step,
            {
                "reward": f"{m.get('reward/mean', 0):.3f}",
                "acc": f"{evals.get('eval/accuracy', nan):.3f}",
                "s/step": f"{m['time/step']:.2f}",
                "tok/s": f"{m.get('rollout/tokens_per_s', 0):.0f}",
            },
        )
    bar.close()
    return _finish(job, metrics, step, version)


def _start(job: Job, stream: PromptStream, eval_set, *, resume: bool) -> tuple[int, int, MetricsWriter]:
    """Step, version and metrics log to start from: the last checkpoint's (weights loaded and
    pushed to the rollout engines, data position and RNG restored), or step 0 after a first eval."""
    spec = job.spec
    step, version = 0, 0
    ckpt = checkpoints.latest(spec.run_location) if resume else None
    if ckpt is not None:
        state = checkpoints.read_state(ckpt)
        gather([ln.load_checkpoint.remote(str(ckpt)) for ln in job.roles.learners])
        stream.load_state_dict(state["data"])
        run_state.set_rng(state["rng"])
        step, version = state["step"], state["version"]
        job.sync(version)
    metrics = MetricsWriter(spec.run_dir, resume=ckpt is not None, spec=spec)  # + the trackers of metrics.loggers
    if ckpt is not None:
        metrics.truncate_after(step)
    elif eval_set:
        metrics.write(0, job.evaluate(eval_set, version))
    return step, version, metrics


def _finish(job: Job, metrics: MetricsWriter, step: int, version: int) -> dict:
    spec = job.spec
    metrics.close()
    summary = run_state.summary(spec, step, version, plot_curves(spec.run_dir))
    (spec.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if spec.run_uri:
        storage.upload_tree(spec.run_dir, spec.run_uri, exclude=run_state.NOT_MIRRORED)
    return summary


def _point_at_logs(logs: Path | None) -> None:
    """A failure still shows its error (the traceback follows); say where each role's own output is."""
    if logs is not None:
        files = sorted(p.name for p in logs.parent.glob("*.log"))
        print(f"protege: the run failed; each role's output is in {logs.parent}/ ({', '.join(files)})", file=sys.stderr)


def _write_actor_table(run_dir: Path, roles: Roles) -> None:
    """actors.json: which process is which role (for operators, and for fault-injection tests).
    Every scorer role has its key (null when this job does not run it)."""
    scorer_pids = dict(zip(roles.scorers, ray.get([a.pid.remote() for a in roles.scorers.values()]), strict=True))
    roles.pids = {
        "rollout": ray.get([w.pid.remote() for w in roles.rollout]),
        "learner": ray.get([ln.pid.remote() for ln in roles.learners]),
        **{name: scorer_pids.get(name) for name in SCORERS},
    }
    (run_dir / "actors.json").write_text(json.dumps(roles.pids))


def _learner_group_broken(roles: Roles, err) -> bool:
    """Did a learner rank die? Either the error names a learner actor, or a surviving rank failed
    first (its collective lost a peer: gloo 'connection reset') and some rank no longer answers."""
    dead = getattr(err, "actor_id", None)
    if isinstance(err, ray.exceptions.RayActorError) and dead is not None:
        return any(ln._actor_id.hex() == dead for ln in roles.learners)
    for ln in roles.learners:
        try:
            ray.get(ln.pid.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return True
    return False


def _check_tokenizers(spec):
    """Every per-token teacher signal assumes one vocabulary: refuse a mismatched teacher up front."""
    from protege.core.models import load_tokenizer, tokenizers_match

    tok = load_tokenizer(spec.models.student.path)
    teacher = spec.models.teacher
    if teacher is not None:
        ok, why = tokenizers_match(tok, load_tokenizer(teacher.path))
        if not ok:
            raise JobError(
                f"models.teacher and models.student must share a tokenizer for '{spec.algorithm.type}': {why}"
            )
    return tok


def _check_reward_functions(spec) -> None:
    """Import the spec's own reward functions now: a typo fails before any resource is taken."""
    from protege.rewards.custom import RewardImportError, reward_functions

    try:
        reward_functions(spec.rewards)
    except RewardImportError as err:
        raise JobError(str(err)) from err
