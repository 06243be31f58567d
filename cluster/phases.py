"""The driver's phases, one method each, on ``Job``: what one run holds (spec, roles, tokenizer,
weight sync, scorers, fault counters). cluster/driver.py's loop calls them in pipeline order.

Every method submits its remote work and waits once; none knows an algorithm by name: they
read the spec variant's declarations (``needs()``, core/spec.py).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray

from protege.actors.rollout import StaleWeights
from protege.cluster.jobdata import Encoder
from protege.cluster.launch import SCORERS, Roles, gather
from protege.cluster.scoring import TEACHER, Scored, Scorers
from protege.cluster.weight_sync import pick_weight_sync
from protege.core import hints
from protege.core.data import PromptStream
from protege.core.records import Rollout, Sample, TrainBatch, TrainRow
from protege.learners.batching import shard_rows

ACTOR_DOWN = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class JobError(RuntimeError):
    pass


# ------------------------------------------------------------------------------- records
@dataclass
class GenJob:
    """One rollout worker's share of a batch, in flight (re-submitted as is if the worker dies)."""

    worker: int
    kwargs: dict[str, Any]
    ref: Any  # ObjectRef of the worker's generate()


@dataclass
class Batch:
    """A step's prompts and the generation submitted for them (none for an algorithm that does
    not sample from the student)."""

    examples: list
    jobs: list[GenJob]
    submitted: float  # perf_counter at submission: generation time counts from here
    data_before: dict  # the stream position before this batch: what a checkpoint stores while it is in flight


@dataclass
class Responses:
    """What a step trains on, as rollouts (one shape for scoring and credit assignment)."""

    rollouts: list[Rollout]
    examples: list  # examples[r.example_index] is the prompt of rollout r
    generated_tokens: int = 0
    engine_s: float = 0.0  # the engines' own generate time (RolloutWorker.generate's, slowest worker)

    def their_examples(self, rollouts: list[Rollout] | None = None) -> list:
        return [self.examples[r.example_index] for r in (self.rollouts if rollouts is None else rollouts)]


def informative_groups(values: list[float], group_size: int) -> list[int]:
    """Groups whose rewards differ (the others have zero advantage: DAPO's dynamic sampling).

    >>> informative_groups([1, 1, 0, 1, 0, 0], 2)
    [1]
    """
    return [g for g in range(len(values) // group_size) if len(set(values[g * group_size : (g + 1) * group_size])) > 1]


def merge_groups(a: tuple[Responses, Scored], b: tuple[Responses, Scored]) -> tuple[Responses, Scored]:
    """Two batches as one: ``b``'s rollouts point at its examples, appended after ``a``'s."""
    (ra, sa), (rb, sb) = a, b
    shift = len(ra.examples)
    rollouts = ra.rollouts + [dc_replace(r, example_index=r.example_index + shift) for r in rb.rollouts]
    responses = Responses(
        rollouts, ra.examples + rb.examples, ra.generated_tokens + rb.generated_tokens, ra.engine_s + rb.engine_s
    )
    teacher = None if sa.teacher is None else sa.teacher + sb.teacher
    metrics = {**sa.metrics, **{k: v + sb.metrics.get(k, 0.0) for k, v in sa.metrics.items() if k.endswith("seconds")}}
    return responses, Scored(sa.scores + sb.scores, teacher, metrics)


def keep_groups(responses: Responses, scored: Scored, groups: list[int], group_size: int) -> tuple[Responses, Scored]:
    """Only these groups' rollouts (group-major), their scores and teacher payloads, in order."""
    idx = [g * group_size + j for g in groups for j in range(group_size)]
    teacher = None if scored.teacher is None else [scored.teacher[i] for i in idx]
    kept = Responses(
        [responses.rollouts[i] for i in idx], responses.examples, responses.generated_tokens, responses.engine_s
    )
    return kept, Scored([scored.scores[i] for i in idx], teacher, scored.metrics)


@dataclass
class Faults:
    """Restarts survived, by role; reported as fault/<role>_restarts with every step."""

    ROLES = ("rollout", "learner", *SCORERS)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(Faults.ROLES, 0))

    def count(self, role: str) -> int:
        self.counts[role] += 1
        return self.counts[role]

    def metrics(self) -> dict[str, float]:
        return {f"fault/{role}_restarts": float(n) for role, n in self.counts.items()}


class PhaseTimer:
    """Seconds per phase of one step (time/<phase>), and the step's own (time/step)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        return {**{f"time/{k}": v for k, v in self.seconds.items()}, "time/step": time.perf_counter() - self.t0}


# ------------------------------------------------------------------------------- the job
class Job:
    def __init__(self, spec, roles: Roles, enc: Encoder, faults: Faults):
        self.spec, self.roles, self.enc, self.faults = spec, roles, enc, faults
        self.needs = spec.algorithm.needs()
        self.sync_engine = pick_weight_sync(spec, roles)  # object store unless learner.weight_sync asks for NCCL/IPC
        self.scorers = Scorers.for_job(spec, roles)
        # Responses the student did not generate (data, teacher) are scored by the teacher only.
        self.step_scorers = self.scorers if self.needs.generates else self.scorers.only(TEACHER)

    # --------------------------------------------------------------------- generate
    def submit(self, stream: PromptStream, step: int, version: int, *, round_: int = 0) -> Batch:
        """Take the next prompts and submit their generation, split over the rollout workers
        (``round_`` > 0: a dynamic-sampling refill of the step, with its own seeds)."""
        before = stream.state_dict()
        examples = stream.next_batch(self.spec.rollout.prompts_per_step)
        jobs = self._submit_generation(examples, step, version, round_) if self.needs.generates else []
        return Batch(examples, jobs, time.perf_counter(), before)

    def _submit_generation(self, examples, step: int, version: int, round_: int = 0) -> list[GenJob]:
        ro, workers = self.spec.rollout, self.roles.rollout
        prompts = [self.enc.prompt(e.prompt) for e in examples]
        chunk = -(-len(prompts) // len(workers))
        # per step (and refill round): reproducible, and a resumed run samples the same
        seed = self.spec.seed * 1_000_003 + step * 1009 + round_ * 100_003
        jobs = []
        for i, w in enumerate(workers):
            part = prompts[i * chunk : (i + 1) * chunk]
            if part:
                kwargs = dict(
                    prompts=part,
                    n=ro.samples_per_prompt,
                    temperature=ro.temperature,
                    top_p=ro.top_p,
                    max_tokens=ro.max_new_tokens,
                    seed=seed + i * chunk,
                    first_index=i * chunk,
                    expected_version=version,
                )
                jobs.append(GenJob(i, kwargs, w.generate.remote(**kwargs)))
        return jobs

    def responses(self, batch: Batch, version: int) -> Responses:
        """The batch's responses: the student's samples (waited for here), or the data's answers,
        its (chosen, rejected) pairs, or the teacher's generations (needs().responses)."""
        if self.needs.generates:
            gen = self.collect(batch.jobs, version)
            return Responses(
                [r for g in gen for r in g["rollouts"]],
                batch.examples,
                sum(g["tokens"] for g in gen),
                engine_s=max((g["seconds"] for g in gen), default=0.0),
            )
        enc, examples = self.enc, batch.examples
        prompts = [enc.prompt(e.prompt) for e in examples]
        if self.needs.responses == "preferences":
            items = [(i, enc.target(text), text) for i, e in enumerate(examples) for text in (e.chosen, e.rejected)]
        elif self.needs.responses == "teacher":
            ids = ray.get(self.roles.teacher.generate_ids.remote(prompts, max_tokens=self.spec.rollout.max_new_tokens))
            items = [(i, r, "") for i, r in enumerate(ids)]
        else:  # "answers"
            items = [(i, enc.example_target(e), e.meta.get("response", e.answer)) for i, e in enumerate(examples)]
        return Responses(
            [
                Rollout(
                    example_index=i,
                    prompt_ids=prompts[i],
                    policy_version=-1,
                    sample=Sample(response_ids=r, logprobs=None, text=text, finish_reason="stop"),
                )
                for i, r, text in items
            ],
            examples,
        )

    def collect(self, jobs: list[GenJob], version: int) -> list[dict]:
        """Wait for each worker's share; a worker that died (or came back with stale weights) is
        re-synced to the current version and its share re-submitted, so no prompt is lost or doubled."""
        out, retries = [], self.spec.fault_tolerance.actor_restarts
        for job in jobs:
            for _ in range(retries + 1):
                try:
                    out.append(ray.get(job.ref))
                    break
                except (*ACTOR_DOWN, StaleWeights):
                    self.faults.count("rollout")
                    self.resync_worker(job.worker, version)
                    job.kwargs["expected_version"] = version
                    job.ref = self.roles.rollout[job.worker].generate.remote(**job.kwargs)
            else:
                raise JobError(f"rollout worker {job.worker} kept failing; gave up after {retries} retries")
        return out

    # --------------------------------------------------------------------- score
    def score(self, responses: Responses) -> Scored:
        """Every scorer of the step at once (rule rewards ‖ reward model ‖ teacher), one wait."""
        scored = self.step_scorers.score(responses.rollouts, responses.their_examples())
        self.count_scorer_restarts()
        return scored

    def quality(self, scored: Scored) -> list[float]:
        """Each response's accuracy reward alone: the first reward's raw value (the verifier, by
        convention; the same one ``accuracy`` counts), not the weighted sum with format or length
        terms. KEPO's gate and hint trigger compare it with τ."""
        first = self.spec.rewards[0].name
        return [s.components.get(first, 0.0) for s in scored.scores]

    def fill_groups(
        self, stream: PromptStream, responses: Responses, scored: Scored, step: int, version: int
    ) -> tuple[Responses, Scored, dict]:
        """DAPO's dynamic sampling: while fewer than prompts_per_step groups have rewards that
        differ, sample and score prompts_per_step new prompts (at most needs.resample_rounds
        times); the batch keeps the informative groups, in order, up to prompts_per_step.
        Refills draw from the stream after any batch already in flight (max_staleness ≥ 1), so
        a run resumed there draws them again: it matches the uninterrupted run only without refills."""
        G, want = self.spec.rollout.samples_per_prompt, self.spec.rollout.prompts_per_step
        found = informative_groups([s.value for s in scored.scores], G)
        rounds = 0
        while len(found) < want and rounds < self.needs.resample_rounds:
            rounds += 1
            more = self.responses(self.submit(stream, step, version, round_=rounds), version)
            responses, scored = merge_groups(
                (responses, scored), (more, self.step_scorers.score(more.rollouts, more.their_examples()))
            )
            found = informative_groups([s.value for s in scored.scores], G)
        m = {"rollout/refill_rounds": float(rounds), "rollout/informative_groups": float(min(len(found), want))}
        if rounds == 0:  # credit assignment drops the flat groups
            return responses, scored, m
        # Never more than prompts_per_step groups (the learner's micro-batches are sized for that);
        # none informative: the first batch, as without refills.
        return (*keep_groups(responses, scored, found[:want] or list(range(want)), G), m)

    def explore_with_hints(self, responses: Responses, scored: Scored, step: int) -> tuple[Responses, Scored, dict]:
        """KEPO's knowledge-enhanced exploration: for each group that failed the gate the teacher
        writes a hint, the student retries with it, and correct retries replace group members
        (core/hints.py has the rules and guards). Four remote calls, each visible here."""
        algo, G, ro = self.spec.algorithm, self.spec.rollout.samples_per_prompt, self.spec.rollout
        rollouts = responses.rollouts
        failed = hints.failed_groups(self.quality(scored), G, algo.gate_threshold)
        m = {
            "kepo/hints_requested": float(len(failed)),
            "kepo/hints_valid": 0.0,
            "kepo/hint_samples_accepted": 0.0,
            "kepo/injected": 0.0,
        }
        if not failed:
            return responses, scored, m
        question = {g: responses.examples[rollouts[g * G].example_index] for g in failed}
        asks = [self.enc.prompt(hints.hint_request(question[g].prompt, question[g].answer), raw=True) for g in failed]
        texts = ray.get(self.roles.teacher.generate.remote(asks, n=1, temperature=0.0, max_tokens=algo.hint_max_tokens))
        valid = hints.valid_hints(failed, [t[0] for t in texts])
        m["kepo/hints_valid"] = float(len(valid))
        if not valid:
            return responses, scored, m
        hinted = [self.enc.prompt(question[g].prompt, hint=h) for g, h in valid]
        tries = ray.get(
            self.roles.rollout[0].generate.remote(
                hinted,
                n=algo.hint_attempts,
                temperature=ro.temperature,
                top_p=ro.top_p,
                max_tokens=ro.max_new_tokens,
                seed=step * 7919,
            )
        )["rollouts"]
        tried = (
            self.scorers.without(TEACHER)
            .score(tries, [question[valid[i // algo.hint_attempts][0]] for i in range(len(tries))])
            .scores
        )
        merged = hints.merge_hinted(
            rollouts,
            scored.scores,
            valid,
            tries,
            tried,
            group_size=G,
            attempts=algo.hint_attempts,
            replace=algo.hint_replace,
            threshold=algo.gate_threshold,
        )
        m["kepo/hint_samples_accepted"], m["kepo/injected"] = float(merged.accepted), float(len(merged.changed))
        teacher = scored.teacher
        if merged.changed and teacher is not None:  # the teacher on the injected responses, hint-free prompt
            moved = [merged.rollouts[i] for i in merged.changed]
            fresh = self.scorers.only(TEACHER).score(moved, responses.their_examples(moved)).teacher
            teacher = list(teacher)
            for i, t in zip(merged.changed, fresh, strict=True):
                teacher[i] = t
        return (
            Responses(merged.rollouts, responses.examples, responses.generated_tokens),
            Scored(merged.scores, teacher, scored.metrics),
            m,
        )

    def count_scorer_restarts(self) -> None:
        """Ray restarts a dead scorer actor (rewards, reward model, teacher) and retries the lost call
        by itself, so the driver never sees an error: a new process id is the only trace."""
        roles = self.roles
        pids = dict(zip(roles.scorers, ray.get([a.pid.remote() for a in roles.scorers.values()]), strict=True))
        changed = False
        for role, pid in pids.items():
            if pid != roles.pids.get(role):
                self.faults.count(role)
                print(
                    f"{role} scorer was restarted (pid {roles.pids.get(role)} -> {pid}); its lost call was retried",
                    file=sys.stderr,
                )
                roles.pids[role], changed = pid, True
        if changed:
            (self.spec.run_dir / "actors.json").write_text(json.dumps(roles.pids))

    # --------------------------------------------------------------------- train
    def learner_step(self, rows: list[TrainRow], version: int) -> dict:
        """One step on every learner rank (their shards of the rows), one wait."""
        if not rows:  # e.g. dynamic sampling dropped every group, or no DPO pair had a winner
            return {"learner/skipped": 1.0}
        if self.needs.teacher_reference:
            refs = ray.get(self.roles.teacher.sequence_logprobs.remote([(r.prompt_ids, r.response_ids) for r in rows]))
            for r, v in zip(rows, refs, strict=True):
                r.ref_seq_logprob = v
        pairs = self.needs.pairs
        shards = shard_rows(rows, len(self.roles.learners), group=2 if pairs else 1)
        out = gather(
            [
                ln.train_step.remote(TrainBatch(rows=shard, policy_version=version, pairs=pairs))
                for ln, shard in zip(self.roles.learners, shards, strict=True)
            ]
        )
        return out[0]  # ranks agree on the loss; rank 0 speaks for the group

    # --------------------------------------------------------------------- sync
    def sync(self, version: int) -> dict:
        """Push ``version`` into every rollout engine; workers that died during the push are
        re-synced after their restart."""
        result = self.sync_engine.push(version)  # all workers: the failed indices are worker indices
        for i in result.failed:
            self.faults.count("rollout")
            self.resync_worker(i, version)
        return result.metrics

    def resync_worker(self, i: int, version: int) -> None:
        """Push ``version`` into rollout worker ``i`` once it is back. If it dies again meanwhile, its
        next generate fails (or finds stale weights) and is re-synced there."""
        if not _alive(self.roles.rollout[i]):
            raise JobError("a rollout worker died and did not come back (fault_tolerance.actor_restarts exhausted)")
        self.sync_engine.push(version, targets=[i])

    # --------------------------------------------------------------------- eval and metrics
    def evaluate(self, eval_set, version: int) -> dict:
        """Greedy accuracy on the fixed held-out set, with rollout worker 0 at the current version."""
        spec, examples = self.spec, eval_set[: self.spec.eval.size]
        t0 = time.perf_counter()
        kwargs = dict(
            prompts=[self.enc.prompt(e.prompt) for e in examples],
            n=1,
            temperature=0.0,
            top_p=1.0,
            max_tokens=spec.rollout.max_new_tokens,
            expected_version=version,
        )
        job = GenJob(0, kwargs, self.roles.rollout[0].generate.remote(**kwargs))
        rollouts = self.collect([job], version)[0]["rollouts"]
        scores = self.scorers.without(TEACHER).score(rollouts, examples).scores
        return {
            "eval/accuracy": accuracy(spec, scores),
            "eval/reward": float(np.mean([s.value for s in scores])),
            "eval/response_len": float(np.mean([len(r.sample.response_ids) for r in rollouts])),
            "eval/seconds": time.perf_counter() - t0,
        }

    def rollout_metrics(self, responses: Responses, scored: Scored, version: int, generate_s: float) -> dict:
        """reward/* and rollout/* of the student's samples (nothing for responses it did not generate)."""
        if not self.needs.generates or not responses.rollouts:
            return {}
        rollouts, scores = responses.rollouts, scored.scores
        rewards = np.array([s.value for s in scores], dtype=float)
        by_kind: dict[str, float] = {}  # "<reward>/timeout", "<reward>/exception", "<reward>/skipped"
        for s in scores:
            for kind, n in s.errors.items():
                by_kind[f"reward/errors/{kind}"] = by_kind.get(f"reward/errors/{kind}", 0.0) + n
        components = {
            f"reward/component/{name}": float(np.mean([s.components.get(name, 0.0) for s in scores]))
            for name in (scores[0].components if len(self.spec.rewards) > 1 else ())
        }
        return {
            **by_kind,
            **components,
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()),
            "reward/accuracy": accuracy(self.spec, scores),
            "reward/errors": float(sum(sum(s.errors.values()) for s in scores)),
            "rollout/response_len": float(np.mean([len(r.sample.response_ids) for r in rollouts])),
            "rollout/truncated_frac": float(np.mean([r.sample.finish_reason == "length" for r in rollouts])),
            # version the learner had when this batch trained, minus the version that generated it
            "rollout/version_lag": float(np.mean([(version - 1) - r.policy_version for r in rollouts])),
            "rollout/tokens_per_s": responses.generated_tokens / max(generate_s, 1e-9),
            # generation compute: the engine's own time inside the worker, without Ray's round trip
            "rollout/engine_s": responses.engine_s,
        }

    def log_samples(self, step: int, responses: Responses, scored: Scored, k: int = 4) -> None:
        """A few (prompt, response, reward) triples per step in samples.jsonl: what the student says."""
        if not self.needs.generates:
            return
        with open(Path(self.spec.run_dir) / "samples.jsonl", "a") as f:
            for r, s in list(zip(responses.rollouts, scored.scores, strict=True))[:k]:
                ex = responses.examples[r.example_index]
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "question": ex.prompt,
                            "answer": ex.answer,
                            "response": r.sample.text,
                            "reward": s.value,
                            "components": s.components,
                            "version": r.policy_version,
                        }
                    )
                    + "\n"
                )


def accuracy(spec, scores) -> float:
    """Fraction of responses whose first reward (the verifier, by convention) is fully correct."""
    first = spec.rewards[0].name
    return float(np.mean([s.components.get(first, 0.0) >= 1.0 - 1e-6 for s in scores])) if scores else 0.0


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
