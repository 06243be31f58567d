"""Reward registry and `RewardRunner`, the scorer that applies the rule (and user) rewards.

`RewardRunner.score(rollouts, examples)` keeps the scorer contract (core/records.py
`ScoreRecord`): one record per rollout with each rule's raw value under its name. It does not
weight them: the driver's one combine (cluster/scoring.py) applies the spec's weights to the
components of every scorer alike. Every (reward function, completion) call runs in a small pool
of daemon threads, each call with its own time limit. A call that raises, returns a non-finite
value or overruns scores 0 and is counted in `ScoreRecord.errors`; the runner itself never
raises because of a bad reward function.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from typing import Any, Callable, Mapping

from protege.core.console import capture_actor_output
from protege.core.data import Example
from protege.core.records import Rollout, ScoreRecord
from protege.rewards.rules import exact_match, format_reward, math_verify_reward, reasoning_gym_reward

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str, "dict[str, Any] | None"], float]

REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "format": format_reward,
    "math_verify": math_verify_reward,
    "reasoning_gym": reasoning_gym_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    """The rule reward called `name`; raises KeyError listing the valid names."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(REWARD_FUNCTIONS))}") from None


class RewardRunner:
    """Named rule rewards, computed in parallel threads with per-call timeouts; raw values out.

    Threads, not processes: rule rewards are cheap Python, so threads bring isolation by
    timeout rather than CPU parallelism (the GIL). Python cannot kill a thread, so a call that
    overruns `timeout_s` is abandoned: it scores 0, its worker thread is left to finish on its
    own (its result is discarded) and a fresh worker takes its place, so a hung call costs the
    step about `timeout_s`, never more. That leaks one thread per hung call; each reward function
    may have at most `max_abandoned` abandoned threads alive at once. Beyond that its calls are
    not run but scored 0 as "<reward>/skipped" (a circuit breaker that frees itself as its
    abandoned threads finish), while the other rewards keep their workers: one hung reward never
    starves the rest. Calls that find no live worker at all are skipped the same way. Workers are daemon threads so a stuck call
    cannot block interpreter exit (ThreadPoolExecutor joins its threads at exit). `score` is
    safe to call from several threads at once. A call stuck
    in C code that holds the GIL stalls every thread; only process isolation would help there.
    """

    def __init__(
        self,
        rewards: list[str],
        *,
        timeout_s: float = 5.0,
        max_workers: int = 4,
        max_abandoned: int = 16,
        functions: Mapping[str, RewardFn] = REWARD_FUNCTIONS,
    ):
        capture_actor_output()  # third-party output to RUN_DIR/logs (core/console.py)
        # An empty list is allowed: a job scored only by its reward model still asks the runner
        # (every record then has no components).
        unknown = [name for name in rewards if name not in functions]
        if unknown:
            raise KeyError(f"unknown reward(s) {unknown}; valid rewards: {', '.join(sorted(functions))}")
        if len(set(rewards)) != len(rewards):
            raise ValueError(f"reward names must be unique, got {rewards}")
        if timeout_s <= 0 or max_workers < 1 or max_abandoned < 0:
            raise ValueError("timeout_s must be > 0, max_workers >= 1 and max_abandoned >= 0")
        self.rewards = [(name, functions[name]) for name in rewards]
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.max_abandoned = max_abandoned
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live: list[_Worker] = []
        self._abandoned: list[_Worker] = []
        self._closed = False

    def pid(self) -> int:
        """The process id (fault-injection tests and actors.json)."""
        return os.getpid()

    def score(self, rollouts: list[Rollout], examples: list[Example]) -> list[ScoreRecord]:
        """The scorer contract: every rule on rollouts[i]'s text against examples[i]'s answer and meta."""
        if len(rollouts) != len(examples):
            raise ValueError(f"rollouts and examples must have equal lengths, got {len(rollouts)}, {len(examples)}")
        return self.score_texts(
            [r.sample.text for r in rollouts], [e.answer for e in examples], [e.meta for e in examples]
        )

    def score_one(self, completion: str, reference: str, meta: dict[str, Any] | None = None) -> ScoreRecord:
        return self.score_texts([completion], [reference], [meta])[0]

    def score_texts(
        self, completions: list[str], references: list[str], metas: list[dict[str, Any] | None]
    ) -> list[ScoreRecord]:
        """`score` on bare strings (what the rule functions see), for in-process callers."""
        if self._closed:
            raise RuntimeError("RewardRunner.score called after close()")
        if not len(completions) == len(references) == len(metas):
            raise ValueError(
                f"completions, references and metas must have equal lengths, got "
                f"{len(completions)}, {len(references)}, {len(metas)}"
            )
        out: queue.SimpleQueue = queue.SimpleQueue()  # per call, so late results of old calls are never read
        pending: set[tuple[int, int]] = set()
        for i, (completion, reference, meta) in enumerate(zip(completions, references, metas)):
            for r, (_, fn) in enumerate(self.rewards):
                self._tasks.put(((i, r), fn, (completion, reference, meta), out))
                pending.add((i, r))
        results: dict[tuple[int, int], tuple[str, float, str]] = {}
        while pending:
            self._expire()
            try:
                key, status, value, detail = out.get(timeout=0.02)
            except queue.Empty:
                continue
            if key in pending:  # first result wins; an abandoned call's late result is ignored
                results[key] = (status, value, detail)
                pending.discard(key)
        return self._assemble(len(completions), results)

    def close(self) -> None:
        """Stop the workers (busy ones after their current call); the runner cannot be reused."""
        with self._lock:
            self._closed = True
            for _ in self._live:
                self._tasks.put(None)
            self._live = []

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _top_up(self) -> None:
        with self._lock:
            self._abandoned = [w for w in self._abandoned if w.thread.is_alive()]
            cap = self.max_abandoned * len(self.rewards)  # per reward, so one bad reward leaves room
            while len(self._live) < self.max_workers and len(self._abandoned) < cap:
                self._live.append(_Worker(self._tasks, self._lock, self._tripped))

    def _expire(self) -> None:
        """Abandon workers whose call overran; if no worker is left, drain the queue as skipped.

        Resolutions are posted to each item's own result queue, so concurrent `score` calls
        on one runner never see each other's items.
        """
        now = time.monotonic()
        with self._lock:
            for w in [w for w in self._live if w.current is not None and now - w.started > self.timeout_s]:
                w.abandoned = True
                self._live.remove(w)
                self._abandoned.append(w)
                key, out = w.current
                w.reward = key[1]
                out.put((key, "timeout", 0.0, f"exceeded {self.timeout_s:g} s"))
        self._top_up()
        with self._lock:
            no_workers = not self._live
        while no_workers:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                key, _, _, out = item
                out.put((key, "skipped", 0.0, f"{self.max_abandoned} abandoned reward threads still running"))

    def _tripped(self, reward: int) -> bool:
        """Has reward ``reward`` used up its abandoned threads? (Called by workers, lock held.)"""
        return sum(1 for w in self._abandoned if w.reward == reward and w.thread.is_alive()) >= self.max_abandoned

    def _assemble(self, n: int, results: dict[tuple[int, int], tuple[str, float, str]]) -> list[ScoreRecord]:
        scores = [ScoreRecord() for _ in range(n)]
        first_error: dict[str, tuple[int, str]] = {}
        for (i, r), (status, value, detail) in sorted(results.items()):
            name, _ = self.rewards[r]
            scores[i].components[name] = value
            if status != "ok":
                key = f"{name}/{status}"
                scores[i].errors[key] = scores[i].errors.get(key, 0) + 1
                count, first = first_error.get(key, (0, detail))
                first_error[key] = (count + 1, first)
        for key, (count, first) in first_error.items():
            logger.warning("reward %s on %d of %d completions%s", key, count, n, f"; first: {first}" if first else "")
        return scores


class _Worker:
    """A daemon thread that runs reward calls from the shared queue until stopped or abandoned."""

    def __init__(self, tasks: queue.SimpleQueue, lock: threading.Lock, tripped: Callable[[int], bool]):
        # The worker that runs a call is the one that may be abandoned for it, so the runner
        # reads `current` / `started` and sets `abandoned` under the same lock.
        self.current: tuple[tuple[int, int], queue.SimpleQueue] | None = None  # (key, out) being run
        self.started = 0.0
        self.abandoned = False
        self.reward: int | None = None  # index of the reward whose call this worker was abandoned on
        self._tasks, self._lock, self._tripped = tasks, lock, tripped
        self.thread = threading.Thread(target=self._run, name="protege-reward", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            key, fn, args, out = item
            with self._lock:
                tripped = self._tripped(key[1])
                if not tripped:
                    self.current, self.started = (key, out), time.monotonic()
            if tripped:
                out.put((key, "skipped", 0.0, "this reward's abandoned (hung) calls are still running"))
                continue
            try:
                value = float(fn(*args))
                status, detail = ("ok", "") if math.isfinite(value) else ("exception", f"returned {value}")
            except Exception as e:  # a bad reward function must not take the runner down
                status, detail = "exception", f"{type(e).__name__}: {e}"
            if status != "ok":
                value = 0.0
            with self._lock:
                self.current = None
                abandoned = self.abandoned
            out.put((key, status, value, detail))
            if abandoned:
                return
