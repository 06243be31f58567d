"""The driver: one loop, every remote call visible (docs/design.md, "The driver loop").

    prompts → generate → score (rewards ‖ teacher) → credit → learner step → weight sync
            → metrics / eval / checkpoint

Each phase submits all of its remote work first and waits once. With
``algorithm.max_staleness = 1`` the generation of step t+1 is submitted before step t trains,
so it overlaps training and carries policy version t-1; the learner's recomputed log-probs
serve as π_old. With 0, every rollout comes from the newest weights.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

from protege.core import checkpoints, hints, storage
from protege.cluster.gpu_status import gpu_warnings
from protege.cluster.jobdata import Encoder, load_job_data
from protege.actors.rollout import StaleWeights
from protege.cluster.launch import SCORERS, Roles, connect, gather, start_learners, start_roles
from protege.cluster.scoring import TEACHER, Scorers
from protege.cluster.metrics import MetricsWriter, plot_curves
from protege.core.records import Rollout, Sample, TrainBatch, TrainRow
from protege.core.console import Progress, quiet_driver
from protege.cluster.weight_sync import pick_weight_sync
from protege.core.data import PromptStream
from protege.learners.algorithms import build_rows
from protege.learners.batching import shard_rows


class JobError(RuntimeError):
    pass


def run(spec, *, resume: bool = False, stop_after: int | None = None, progress: bool = True,
        quiet: bool = False) -> dict:
    """Train as ``spec`` says. ``stop_after`` ends the session after that many steps (tests).
    ``quiet`` (the CLI's default) sends this process's third-party logging and warnings to
    RUN_DIR/logs/driver.log; the actors' output goes to RUN_DIR/logs/ in any case."""
    run_dir, location = spec.run_dir, spec.run_location  # local files; where checkpoints live
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = quiet_driver(run_dir) if quiet else None
    (run_dir / "resolved_spec.json").write_text(spec.model_dump_json(indent=2))
    train_set, eval_set = load_job_data(spec)  # bad data fails here, before any resource is taken
    tok = _check_tokenizers(spec)
    _check_reward_functions(spec)
    enc = Encoder(tok, system_prompt=spec.data.system_prompt, max_prompt_tokens=spec.rollout.max_prompt_tokens)
    if spec.run_uri:  # a missing backend, bad credentials or an unwritable bucket fail here, too
        _open_remote_run(spec, resume)
    for w in gpu_warnings(spec):
        print(f"warning: {w}", file=sys.stderr)
    say = print if progress else (lambda *a, **k: None)
    say(f"protege: {spec.name}: {spec.algorithm.type} for {spec.steps} steps -> {run_dir}"
        + (f" (logs: {logs.parent})" if logs else ""), flush=True)
    t0 = time.perf_counter()
    where = connect()
    try:
        roles = start_roles(spec)
    except Exception:
        _point_at_logs(logs)
        raise
    say(f"protege: {len(roles.rollout)} rollout worker(s), {len(roles.learners)} learner rank(s)"
        + (", teacher" if roles.teacher is not None else "") + f" ready in {time.perf_counter() - t0:.0f} s "
        f"(Ray: {where['address']})", flush=True)
    start = (checkpoints.read_state(c)["step"] if resume and (c := checkpoints.latest(location)) else 0)
    until = spec.steps if stop_after is None else min(spec.steps, start + stop_after)
    faults = {"fault/rollout_restarts": 0.0, "fault/learner_restarts": 0.0,
              "fault/reward_restarts": 0.0, "fault/teacher_restarts": 0.0, "fault/reward_model_restarts": 0.0}
    try:
        while True:
            _write_actor_table(run_dir, roles)
            try:
                return _train(spec, roles, enc, train_set, eval_set, resume=resume, until=until, progress=progress,
                              faults=faults)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                if not _learner_group_broken(roles, err):
                    raise
                faults["fault/learner_restarts"] += 1
                if faults["fault/learner_restarts"] > spec.fault_tolerance.learner_restarts:
                    last = checkpoints.latest(location)
                    raise JobError(
                        f"a learner rank died {int(faults['fault/learner_restarts'])} times "
                        f"(fault_tolerance.learner_restarts = {spec.fault_tolerance.learner_restarts}); stopping. "
                        f"Last checkpoint: {last or 'none'}; continue with `protege run SPEC --resume`.") from err
                # A dead rank breaks the group's collectives: rebuild all ranks, reload the last checkpoint.
                print(f"learner rank died ({err.__class__.__name__}); reloading the learner group from the last "
                      "checkpoint", file=sys.stderr)
                start_learners(spec, roles)
                resume = True
    except Exception:
        _point_at_logs(logs)
        raise
    finally:
        roles.kill_all()


def _point_at_logs(logs: Path | None) -> None:
    """A failure still shows its error (the traceback follows); say where each role's own output is."""
    if logs is not None:
        files = sorted(p.name for p in logs.parent.glob("*.log"))
        print(f"protege: the run failed; each role's output is in {logs.parent}/ ({', '.join(files)})", file=sys.stderr)


def _write_actor_table(run_dir: Path, roles: Roles) -> None:
    """actors.json: which process is which role (for operators, and for fault-injection tests).
    Every scorer role has its key (null when this job does not run it)."""
    scorer_pids = dict(zip(roles.scorers, ray.get([a.pid.remote() for a in roles.scorers.values()]), strict=True))
    roles.pids = {"rollout": ray.get([w.pid.remote() for w in roles.rollout]),
                  "learner": ray.get([ln.pid.remote() for ln in roles.learners]),
                  **{name: scorer_pids.get(name) for name in SCORERS}}
    (run_dir / "actors.json").write_text(json.dumps(roles.pids))


def _count_scorer_restarts(run_dir: Path, roles: Roles, faults: dict) -> None:
    """Ray restarts a dead scorer actor (rewards, reward model, teacher) and retries the lost call
    by itself, so the driver never sees an error: a new process id is the only trace. Compare
    with the last seen."""
    pids = dict(zip(roles.scorers, ray.get([a.pid.remote() for a in roles.scorers.values()]), strict=True))
    changed = False
    for role, pid in pids.items():
        if pid != roles.pids.get(role):
            faults[f"fault/{role}_restarts"] += 1
            print(f"{role} scorer was restarted (pid {roles.pids.get(role)} -> {pid}); its lost call was retried",
                  file=sys.stderr)
            roles.pids[role], changed = pid, True
    if changed:
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


def _train(spec, roles: Roles, enc: Encoder, train_set, eval_set, *, resume, until, progress, faults) -> dict:
    algo = spec.algorithm
    run_dir = spec.run_dir
    sync = pick_weight_sync(spec, roles)  # object store unless learner.weight_sync asks for NCCL/IPC
    stream = PromptStream(train_set, seed=spec.seed)
    step, version = 0, 0
    ckpt = checkpoints.latest(spec.run_location) if resume else None
    if ckpt is not None:
        state = checkpoints.read_state(ckpt)
        gather([ln.load_checkpoint.remote(str(ckpt)) for ln in roles.learners])
        stream.load_state_dict(state["data"])
        _set_rng(state["rng"])
        step, version = state["step"], state["version"]
        _sync(spec, roles, sync, version, faults)
    metrics = MetricsWriter(run_dir, resume=ckpt is not None, spec=spec)  # + the trackers of metrics.loggers
    if ckpt is not None:
        metrics.truncate_after(step)
    elif eval_set:
        metrics.write(0, _evaluate(spec, roles, sync, enc, eval_set, version, faults))

    last = until
    bar = Progress(step, spec.steps, enabled=progress)
    last_acc = float("nan")  # the newest held-out accuracy, shown beside every step
    last_eval: dict[str, float] = {}  # the newest eval metrics, stored with each checkpoint
    pending = _submit_generation(spec, roles, enc, stream, step, version) if step < last else None
    while step < last:
        t_step = time.perf_counter()
        # 1. generate (or take the overlapped generation submitted last iteration)
        batch_examples, jobs, t_gen0, _ = pending
        pending = None  # consumed: from here on the stream position includes this batch
        gen = _collect_generation(spec, roles, sync, jobs, version, faults)
        t_gen = time.perf_counter() - t_gen0
        rollouts = [r for g in gen for r in g["rollouts"]]
        if algo.max_staleness >= 1 and step + 1 < last:
            pending = _submit_generation(spec, roles, enc, stream, step + 1, version)

        # 2. score: every scorer in parallel (rule rewards ‖ reward model ‖ teacher), one wait
        t0 = time.perf_counter()
        scored = _score(spec, roles, rollouts, [batch_examples[r.example_index] for r in rollouts])
        scores, teacher, teacher_metrics = scored.scores, scored.teacher, scored.metrics
        _count_scorer_restarts(run_dir, roles, faults)
        t_score = time.perf_counter() - t0

        # 2b. KEPO: teacher hints for groups that all failed, hinted samples injected back
        explore_metrics = {}
        if algo.type == "kepo" and algo.hints and rollouts:
            rollouts, scores, teacher, explore_metrics = _explore_with_hints(
                spec, roles, enc, rollouts, scores, teacher, batch_examples, step)

        # 3. credit assignment → rows for the learners
        rewards = [s.value for s in scores]
        rows, credit_metrics = _rows_for_step(spec, roles, enc, rollouts, rewards, teacher, batch_examples)

        # 4. learner step (all ranks, one wait)
        t0 = time.perf_counter()
        learner_metrics = _learner_step(spec, roles, rows, version)
        t_train = time.perf_counter() - t0

        # 5. weight sync: version v+1 into every rollout engine
        version += 1
        step += 1
        do_eval = bool(eval_set) and (step % spec.eval.interval == 0 or step == spec.steps)
        # SFT and offline DPO never sample from the student, so they sync only to evaluate.
        sync_metrics = _sync(spec, roles, sync, version, faults) if _generates(spec) or do_eval else {}
        if algo.max_staleness == 0 and step < last:
            pending = _submit_generation(spec, roles, enc, stream, step, version)

        # 6. metrics, eval, checkpoint
        m = {**learner_metrics, **credit_metrics, **explore_metrics, **faults, **sync_metrics, **teacher_metrics,
             **_rollout_metrics(spec, rollouts, scores, version)}
        m.update({"time/generate": t_gen, "time/score": t_score, "time/train": t_train,
                  "time/sync": sync_metrics.get("sync/seconds", 0.0), "time/step": time.perf_counter() - t_step,
                  "rollout/tokens_per_s": sum(g["tokens"] for g in gen) / max(t_gen, 1e-9)})
        if do_eval:
            m.update(_evaluate(spec, roles, sync, enc, eval_set, version, faults))
            last_eval.update({k: v for k, v in m.items() if k.startswith("eval/")})
            bar.line(f"eval   step {step}: accuracy {m['eval/accuracy']:.3f} on {min(spec.eval.size, len(eval_set))} "
                     "held-out prompts")
        metrics.write(step, m)
        _log_samples(run_dir, step, enc, rollouts, scores, batch_examples)
        if step % spec.checkpoint.interval == 0 or step == spec.steps:
            # The next batch may already be in flight: store the data position before it.
            ckpt = _save(spec, roles, pending[3] if pending is not None else stream.state_dict(), step, version,
                         evals=dict(last_eval))
            bar.line(f"saved  step {step}: {ckpt}")
        last_acc = m.get("eval/accuracy", last_acc)
        bar.update(step, {"reward": f"{m.get('reward/mean', 0):.3f}", "acc": f"{last_acc:.3f}",
                          "s/step": f"{m['time/step']:.2f}", "tok/s": f"{m['rollout/tokens_per_s']:.0f}"})
    bar.close()
    metrics.close()
    plot = plot_curves(run_dir)
    summary = _summary(spec, step, version, plot)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if spec.run_uri:
        storage.upload_tree(run_dir, spec.run_uri, exclude=_NOT_MIRRORED)
    return summary


# ---------------------------------------------------------------------------------------- phases
def _generates(spec) -> bool:
    return spec.algorithm.needs().generates


def _submit_generation(spec, roles: Roles, enc: Encoder, stream: PromptStream, step: int, version: int):
    """Take the next prompts and submit them, split over the rollout workers.

    Returns (examples, jobs, t0, data position before this batch); a checkpoint taken while the
    batch is in flight stores that position, so a resumed run generates this batch again."""
    before = stream.state_dict()
    examples = stream.next_batch(spec.rollout.prompts_per_step)
    if not _generates(spec):
        return examples, [], time.perf_counter(), before
    ro = spec.rollout
    prompts = [enc.prompt(e.prompt) for e in examples]
    n_w = len(roles.rollout)
    chunk = -(-len(prompts) // n_w)
    seed = spec.seed * 1_000_003 + step * 1009  # per step: reproducible, and a resumed run samples the same
    jobs = []
    for i, w in enumerate(roles.rollout):
        part = prompts[i * chunk:(i + 1) * chunk]
        if part:
            kwargs = dict(prompts=part, n=ro.samples_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
                          max_tokens=ro.max_new_tokens, seed=seed + i * chunk, first_index=i * chunk,
                          expected_version=version)
            jobs.append([i, kwargs, w.generate.remote(**kwargs)])
    return examples, jobs, time.perf_counter(), before


ACTOR_DOWN = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def _collect_generation(spec, roles: Roles, sync, jobs, version: int, faults: dict) -> list[dict]:
    """Wait for each worker's share; a worker that died (or came back with stale weights) is
    re-synced to the current version and its share re-submitted, so no prompt is lost or doubled."""
    out = []
    for i, kwargs, ref in jobs:
        for _ in range(spec.fault_tolerance.actor_restarts + 1):
            try:
                out.append(ray.get(ref))
                break
            except (*ACTOR_DOWN, StaleWeights):
                faults["fault/rollout_restarts"] += 1
                _resync_worker(spec, roles, i, sync, version)
                kwargs["expected_version"] = version
                ref = roles.rollout[i].generate.remote(**kwargs)
        else:
            raise JobError(f"rollout worker {i} kept failing; gave up after {spec.fault_tolerance.actor_restarts} retries")
    return out


def _alive(worker, timeout: float = 180.0) -> bool:
    """Wait for a (restarting) actor to answer; False when Ray has given up on it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            ray.get(worker.get_version.remote(), timeout=30)
            return True
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.5)
        except ray.exceptions.GetTimeoutError:
            continue
        except ray.exceptions.RayActorError:
            return False
    return False


def _resync_worker(spec, roles: Roles, i: int, sync, version: int) -> None:
    """Push ``version`` into rollout worker ``i`` once it is back. If it dies again meanwhile, its
    next generate fails (or finds stale weights) and is re-synced there."""
    if not _alive(roles.rollout[i]):
        raise JobError("a rollout worker died and did not come back (fault_tolerance.actor_restarts exhausted)")
    sync.push(version, targets=[i])


def _sync(spec, roles: Roles, sync, version: int, faults: dict) -> dict:
    """Push ``version`` everywhere; workers that died during the push are re-synced after their restart."""
    result = sync.push(version)  # all workers: the failed indices are worker indices
    for i in result.failed:
        faults["fault/rollout_restarts"] += 1
        _resync_worker(spec, roles, i, sync, version)
    return result.metrics


def _explore_with_hints(spec, roles: Roles, enc: Encoder, rollouts, scores, teacher, examples, step: int):
    """KEPO knowledge-enhanced exploration (core/hints.py has the rules and guards)."""
    algo, G = spec.algorithm, spec.rollout.samples_per_prompt
    failed = hints.failed_groups([s.value for s in scores], G, algo.gate_threshold)
    m = {"kepo/hints_requested": float(len(failed)), "kepo/hints_valid": 0.0, "kepo/hint_samples_accepted": 0.0,
         "kepo/injected": 0.0}
    if not failed:
        return rollouts, scores, teacher, m
    asks = [enc.prompt(hints.hint_request(examples[rollouts[g * G].example_index].prompt,
                                          examples[rollouts[g * G].example_index].answer), raw=True) for g in failed]
    texts = ray.get(roles.teacher.generate.remote(asks, n=1, temperature=0.0, max_tokens=algo.hint_max_tokens))
    valid = [(g, h) for g, t in zip(failed, texts) if (h := hints.extract_hint(t[0])) is not None]
    m["kepo/hints_valid"] = float(len(valid))
    if not valid:
        return rollouts, scores, teacher, m
    ro = spec.rollout
    hinted = [enc.prompt(examples[rollouts[g * G].example_index].prompt, hint=h) for g, h in valid]
    gen = ray.get(roles.rollout[0].generate.remote(hinted, n=algo.hint_attempts, temperature=ro.temperature,
                                                   top_p=ro.top_p, max_tokens=ro.max_new_tokens, seed=step * 7919))
    tries = gen["rollouts"]
    ex = [examples[rollouts[valid[i // algo.hint_attempts][0] * G].example_index] for i in range(len(tries))]
    tried = _score(spec, roles, tries, ex, without=(TEACHER,)).scores
    rollouts, scores = list(rollouts), list(scores)
    changed = []
    for j, (g, _) in enumerate(valid):
        ok = [i for i in range(j * algo.hint_attempts, (j + 1) * algo.hint_attempts)
              if tried[i].value >= algo.gate_threshold]  # rejection sampling: keep correct ones only
        m["kepo/hint_samples_accepted"] += len(ok)
        rollouts[g * G:(g + 1) * G], k = hints.inject(rollouts[g * G:(g + 1) * G], [tries[i] for i in ok], algo.hint_replace)
        for i in range(k):
            scores[g * G + i] = tried[ok[i]]
            changed.append(g * G + i)
        m["kepo/injected"] += k
    if changed and teacher is not None:
        # Teacher log-probs of the injected responses under the hint-free prompt.
        fresh = Scorers.for_job(spec, roles).only(TEACHER).score(
            [rollouts[i] for i in changed], [examples[rollouts[i].example_index] for i in changed]).teacher
        teacher = list(teacher)
        for i, t in zip(changed, fresh, strict=True):
            teacher[i] = t
    return rollouts, scores, teacher, m


def _responses_from_data(spec, roles: Roles, enc: Encoder, examples) -> list[Rollout]:
    """The responses an algorithm that does not sample from the student trains on, as rollouts
    (so scoring and credit assignment see one shape): the data's answers, its (chosen, rejected)
    pairs, or the teacher's generations (needs().responses)."""
    source = spec.algorithm.needs().responses
    prompts = [enc.prompt(e.prompt) for e in examples]
    if source == "preferences":
        items = [(i, prompts[i], enc.target(text), text)
                 for i, e in enumerate(examples) for text in (e.chosen, e.rejected)]
    elif source == "teacher":
        ids = ray.get(roles.teacher.generate_ids.remote(prompts, max_tokens=spec.rollout.max_new_tokens))
        items = [(i, prompts[i], r, "") for i, r in enumerate(ids)]
    else:  # "answers"
        items = [(i, prompts[i], enc.answer_target(e.answer), e.answer) for i, e in enumerate(examples)]
    return [Rollout(example_index=i, prompt_ids=p, policy_version=-1,
                    sample=Sample(response_ids=r, logprobs=None, text=text, finish_reason="stop"))
            for i, p, r, text in items]


def _rows_for_step(spec, rollouts, rewards, teacher) -> tuple[list[TrainRow], dict]:
    return build_rows(spec.algorithm, rollouts, rewards, spec.rollout.samples_per_prompt, teacher)


def _learner_step(spec, roles: Roles, rows: list[TrainRow], version: int) -> dict:
    needs = spec.algorithm.needs()
    if not rows:  # e.g. dynamic sampling dropped every group, or no DPO pair had a winner
        return {"learner/skipped": 1.0}
    if needs.teacher_reference:
        ref = ray.get(roles.teacher.sequence_logprobs.remote([(r.prompt_ids, r.response_ids) for r in rows]))
        for r, v in zip(rows, ref, strict=True):
            r.ref_seq_logprob = v
    shards = shard_rows(rows, len(roles.learners), group=2 if needs.pairs else 1)
    out = gather([
        ln.train_step.remote(TrainBatch(rows=shard, policy_version=version, pairs=needs.pairs))
        for ln, shard in zip(roles.learners, shards)
    ])
    return out[0]  # ranks agree on the loss; rank 0 speaks for the group


def _evaluate(spec, roles: Roles, sync, enc: Encoder, eval_set, version: int, faults: dict) -> dict:
    """Greedy accuracy on the fixed held-out set, with rollout worker 0 at the current version."""
    examples = eval_set[: spec.eval.size]
    t0 = time.perf_counter()
    kwargs = dict(prompts=[enc.prompt(e.prompt) for e in examples], n=1, temperature=0.0, top_p=1.0,
                  max_tokens=spec.rollout.max_new_tokens, expected_version=version)
    job = [0, kwargs, roles.rollout[0].generate.remote(**kwargs)]
    rollouts = _collect_generation(spec, roles, sync, [job], version, faults)[0]["rollouts"]
    scores = _score(spec, roles, rollouts, examples, without=(TEACHER,)).scores
    acc = _accuracy(spec, scores)
    return {"eval/accuracy": acc, "eval/reward": float(np.mean([s.value for s in scores])),
            "eval/response_len": float(np.mean([len(r.sample.response_ids) for r in rollouts])),
            "eval/seconds": time.perf_counter() - t0}


def _log_samples(run_dir: Path, step: int, enc: Encoder, rollouts, scores, examples, k: int = 4) -> None:
    """A few (prompt, response, reward) triples per step in samples.jsonl: what the student actually says."""
    with open(run_dir / "samples.jsonl", "a") as f:
        for r, s in list(zip(rollouts, scores))[:k]:
            f.write(json.dumps({"step": step, "question": examples[r.example_index].prompt, "answer": examples[r.example_index].answer,
                                "response": r.sample.text, "reward": s.value, "components": s.components,
                                "version": r.policy_version}) + "\n")


def _score(spec, roles: Roles, rollouts, examples, *, without: tuple[str, ...] = ()):
    """Every scorer of the job (less ``without``) on rollouts[i] of examples[i], submitted at once
    and waited for once; the weighted combine by name is cluster/scoring.py's."""
    scorers = Scorers.for_job(spec, roles).without(*without)
    return scorers.collect(scorers.submit(rollouts, examples))


def _accuracy(spec, scores) -> float:
    """Fraction of responses whose first reward (the verifier, by convention) is fully correct."""
    first = spec.rewards[0].name
    return float(np.mean([s.components.get(first, 0.0) >= 1.0 - 1e-6 for s in scores])) if scores else 0.0


def _rollout_metrics(spec, rollouts, scores, version: int) -> dict:
    if not rollouts:
        return {}
    rewards = np.array([s.value for s in scores], dtype=float)
    errors = sum(sum(s.errors.values()) for s in scores)
    by_kind: dict[str, float] = {}  # "<reward>/timeout", "<reward>/exception", "<reward>/skipped"
    for s in scores:
        for kind, n in s.errors.items():
            by_kind[f"reward/errors/{kind}"] = by_kind.get(f"reward/errors/{kind}", 0.0) + n
    components = {f"reward/component/{name}": float(np.mean([s.components.get(name, 0.0) for s in scores]))
                  for name in (scores[0].components if len(spec.rewards) > 1 else ())}
    return {**by_kind, **components,
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
        "reward/accuracy": _accuracy(spec, scores), "reward/errors": float(errors),
        "rollout/response_len": float(np.mean([len(r.sample.response_ids) for r in rollouts])),
        "rollout/truncated_frac": float(np.mean([r.sample.finish_reason == "length" for r in rollouts])),
        # version the learner had when this batch trained, minus the version that generated it
        "rollout/version_lag": float(np.mean([(version - 1) - r.policy_version for r in rollouts])),
    }


# ---------------------------------------------------------------------------------------- state
# Local-only files of the staging dir that are never mirrored to an object store.
_NOT_MIRRORED = ("checkpoints", "actors.json")


def _save(spec, roles: Roles, data_state: dict, step: int, version: int, evals: dict | None = None):
    state = {"step": step, "version": version, "data": data_state, "rng": _get_rng(), "time": time.time(),
             "metrics": evals or {}}  # the newest eval metrics: checkpoint.keep_best ranks by them
    keep, best = spec.checkpoint.keep, spec.checkpoint.keep_best
    try:
        tmp = checkpoints.tmp_dir(spec.run_dir, step)
        gather([ln.save_checkpoint.remote(str(tmp)) for ln in roles.learners])
        if not spec.run_uri:
            return checkpoints.commit(tmp, state, keep=keep, keep_best=best)
        # Object store: each node uploads what its ranks wrote (nodes need not share a disk), then
        # state.json goes up last as the commit marker; the metrics mirror follows.
        dest = checkpoints.prepare_remote(spec.run_uri, step)
        gather([ln.upload_checkpoint.remote(str(tmp), dest) for ln in _one_learner_per_node(roles)])
        ckpt = checkpoints.commit_remote(dest, state, run_uri=spec.run_uri, keep=keep, keep_best=best)
        storage.upload_tree(spec.run_dir, spec.run_uri, exclude=_NOT_MIRRORED)
        shutil.rmtree(tmp, ignore_errors=True)
        return ckpt
    except (OSError, ray.exceptions.RayTaskError) as err:
        if isinstance(err, ray.exceptions.RayTaskError) and not isinstance(err.cause, OSError):
            raise
        cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
        last = checkpoints.latest(spec.run_location)
        raise JobError(f"could not write the checkpoint of step {step} under {spec.run_location}: {cause}. "
                       f"The previous checkpoint is intact: {last or 'none yet'}. Free space (or fix access "
                       "to the bucket) and run `protege run SPEC --resume`.") from err


def _one_learner_per_node(roles: Roles) -> list:
    nodes = ray.get([ln.node_id.remote() for ln in roles.learners])
    first = {}
    for ln, node in zip(roles.learners, nodes):
        first.setdefault(node, ln)
    return list(first.values())


def _open_remote_run(spec, resume: bool) -> None:
    """Check the object store before anything starts (the write of the spec is the probe) and, on
    resume in a fresh staging dir (a new pod), fetch the run's metrics and samples so they continue."""
    uri, run_dir = spec.run_uri, spec.run_dir
    try:
        if resume:
            for name in ("metrics.jsonl", "samples.jsonl"):
                if not (run_dir / name).exists() and storage.exists(storage.join(uri, name)):
                    (run_dir / name).write_text(storage.read_text(storage.join(uri, name)))
        storage.write_text(storage.join(uri, "resolved_spec.json"), spec.model_dump_json(indent=2))
    except (OSError, RuntimeError) as err:
        raise JobError(f"checkpoint.dir: cannot write to {uri}: {err}") from err


def _get_rng() -> dict:
    return {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
            "torch": torch.get_rng_state().tolist()}


def _set_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _jsonable(x):
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _check_tokenizers(spec):
    """Every per-token teacher signal assumes one vocabulary: refuse a mismatched teacher up front."""
    from protege.core.models import load_tokenizer, tokenizers_match

    tok = load_tokenizer(spec.models.student.path)
    teacher = spec.models.teacher
    if teacher is not None:
        ok, why = tokenizers_match(tok, load_tokenizer(teacher.path))
        if not ok:
            raise JobError(f"models.teacher and models.student must share a tokenizer for '{spec.algorithm.type}': {why}")
    return tok


def _check_reward_functions(spec) -> None:
    """Import the spec's own reward functions now: a typo fails before any resource is taken."""
    from protege.rewards.custom import RewardImportError, reward_functions

    try:
        reward_functions(spec.rewards)
    except RewardImportError as err:
        raise JobError(str(err)) from err


def _summary(spec, step: int, version: int, plot) -> dict:
    from protege.cluster.metrics import read_metrics

    rows = read_metrics(spec.run_dir / "metrics.jsonl")
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    return {"run_dir": spec.run_location, "steps": step, "policy_version": version,
            "eval_accuracy_first": evals[0][1] if evals else None, "eval_accuracy_last": evals[-1][1] if evals else None,
            "eval_curve": evals, "checkpoint": str(checkpoints.latest(spec.run_location) or ""), "plot": str(plot or ""),
            **({"best_checkpoint": str(checkpoints.best(checkpoints.list_checkpoints(spec.run_location),
                                                        spec.checkpoint.keep_best) or "")}
               if spec.checkpoint.keep_best else {})}
