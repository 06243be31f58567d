"""Fault injection on the real stack: kill a rollout worker or a learner rank by pid mid-run.

The job must finish every step exactly once, with rollouts from the right weights (the
train/infer log-prob mismatch stays ~0, which a restarted worker with initial weights breaks).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from protege.core import checkpoints
from protege.core.spec import parse_spec

pytestmark = pytest.mark.slow

TASK = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+"],
    "allow_negation": False,
    "allow_parentheses": False,
}


def make_spec(tmp_path, tiny, name, **over):
    d = {
        "name": name,
        "seed": 0,
        "steps": 6,
        "models": {"student": {"path": tiny["student"]}},
        "data": {
            "source": "reasoning_gym",
            "task": "basic_arithmetic",
            "task_config": TASK,
            "size": 200,
            "eval_size": 4,
        },
        "rollout": {"samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 8},
        "learner": {"ranks": 2, "zero_stage": 2, "lr": 1e-3, "micro_batch": 8},
        "rewards": [{"name": "exact_match"}],
        "checkpoint": {"dir": str(tmp_path / name), "interval": 1, "keep": 3},
        "eval": {"interval": 3, "size": 4},
    }
    d.update(over)
    return parse_spec(d)


def kinds_of(rows) -> set:
    return {k for r in rows for k in r if k.startswith("reward/errors/")}


def _metrics(spec):
    return [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]


def _kill_when(spec, role: str, index: int, at_step: int, killed: list):
    """Background killer: once metrics reach ``at_step``, SIGKILL the role's process."""

    def loop():
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                steps = [r["step"] for r in _metrics(spec)]
                pids = json.loads((spec.run_dir / "actors.json").read_text())[role]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.05)
                continue
            if steps and steps[-1] >= at_step:
                pid = pids if index is None else pids[index]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def test_rollout_worker_killed_mid_run(tmp_path, tiny_models, ray_local):
    from protege.cluster.driver import run

    spec = make_spec(tmp_path, tiny_models, "kill-rollout")
    killed: list = []
    t = _kill_when(spec, "rollout", 0, 2, killed)
    summary = run(spec, progress=False)
    t.join(5)
    assert killed, "the killer never fired"
    rows = _metrics(spec)
    assert summary["steps"] == 6
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # no step lost or repeated
    assert rows[-1]["fault/rollout_restarts"] >= 1
    # the restarted worker generated from the current weights, not its initial ones
    assert all(r["rollout/logprob_mismatch"] < 1e-3 for r in rows[1:])


def test_learner_rank_killed_reloads_from_checkpoint(tmp_path, tiny_models, ray_local):
    from protege.cluster.driver import run

    spec = make_spec(tmp_path, tiny_models, "kill-learner")
    killed: list = []
    t = _kill_when(spec, "learner", 1, 3, killed)
    summary = run(spec, progress=False)
    t.join(5)
    assert killed
    rows = _metrics(spec)
    assert summary["steps"] == 6
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert rows[-1]["fault/learner_restarts"] == 1
    assert json.loads((spec.run_dir / "actors.json").read_text())["learner"][1] != killed[0]


def test_learner_failures_past_the_bound_stop_with_an_intact_checkpoint(tmp_path, tiny_models, ray_local):
    from transformers import AutoModelForCausalLM

    from protege.cluster.driver import JobError, run

    spec = make_spec(tmp_path, tiny_models, "give-up", fault_tolerance={"learner_restarts": 0})
    killed: list = []
    _kill_when(spec, "learner", 0, 2, killed)
    with pytest.raises(JobError, match=r"learner rank died 1 times .*learner_restarts = 0.*--resume"):
        run(spec, progress=False)
    last = checkpoints.latest(spec.run_dir)
    assert last is not None and checkpoints.read_state(last)["step"] >= 1  # the kill may land mid-save of step 2
    AutoModelForCausalLM.from_pretrained(last / "model")


@pytest.mark.parametrize("role", ["reward", "teacher"])
def test_scorer_actor_killed_mid_run(tmp_path, tiny_models, ray_local, role):
    """Reward and teacher scorers are stateless: Ray restarts them and retries the lost call."""
    from protege.cluster.driver import run

    spec = make_spec(
        tmp_path,
        tiny_models,
        f"kill-{role}",
        algorithm={"type": "rlad"},
        models={"student": {"path": tiny_models["student"]}, "teacher": {"path": tiny_models["teacher"]}},
        learner={"ranks": 1, "zero_stage": 2, "lr": 1e-3, "micro_batch": 16},
    )
    killed: list = []
    t = _kill_when(spec, role, None, 2, killed)
    summary = run(spec, progress=False)
    t.join(5)
    assert killed
    assert summary["steps"] == 6
    rows = _metrics(spec)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert rows[-1][f"fault/{role}_restarts"] == 1  # counted once, from the changed process id
    other = "teacher" if role == "reward" else "reward"
    assert rows[-1][f"fault/{other}_restarts"] == 0
    assert json.loads((spec.run_dir / "actors.json").read_text())[role] != killed[0]


def test_hanging_and_raising_rewards_score_zero_and_the_job_goes_on(tmp_path, tiny_models, ray_local):
    """User reward functions that hang (for an hour) or raise / return NaN on some completions, run
    by the real reward actor inside a real job: each bad call scores 0 and is counted by kind,
    good calls still count, and every step completes (a hang costs its step ~reward_timeout_s)."""
    from pathlib import Path

    from protege.cluster.driver import run

    bad = Path(__file__).with_name("fault_rewards.py")
    spec = make_spec(
        tmp_path,
        tiny_models,
        "bad-rewards",
        steps=3,
        rewards=[
            {"name": "exact_match"},
            {"name": "hangs", "function": f"{bad}:hang_sometimes"},
            {"name": "raises", "function": f"{bad}:raise_sometimes", "weight": 0.1},
        ],
        fault_tolerance={"reward_timeout_s": 0.5},
    )
    summary = run(spec, progress=False)
    assert summary["steps"] == 3
    rows = _metrics(spec)[1:]
    assert [r["step"] for r in rows] == [1, 2, 3]
    total = lambda key: sum(r.get(key, 0.0) for r in rows)  # noqa: E731
    assert total("reward/errors/hangs/timeout") + total("reward/errors/hangs/skipped") > 0
    assert total("reward/errors/raises/exception") > 0  # raised, or returned NaN
    # the hung threads count against 'hangs' only: the other rewards are never starved of workers
    assert not any(k.startswith(("reward/errors/exact_match/", "reward/errors/raises/skipped")) for k in kinds_of(rows))
    kinds = kinds_of(rows)
    assert total("reward/errors") == sum(total(k) for k in kinds)  # the total is the sum of the kinds
    # the calls that did not fail still scored: 'raises' returns 1 for about a quarter of completions
    assert 0 < total("reward/component/raises") and all(r["reward/component/hangs"] == 0 for r in rows)


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, tiny_models, ray_local, monkeypatch):
    from transformers import AutoModelForCausalLM

    from protege.cluster import driver
    from protege.cluster.driver import JobError, run

    real_commit = checkpoints.commit

    def commit(tmp, state, *, keep, keep_best=None):
        if state["step"] == 2:
            raise OSError(28, "No space left on device")
        return real_commit(tmp, state, keep=keep, keep_best=keep_best)

    monkeypatch.setattr(driver.checkpoints, "commit", commit)
    spec = make_spec(
        tmp_path, tiny_models, "disk-full", learner={"ranks": 1, "zero_stage": 2, "lr": 1e-3, "micro_batch": 16}
    )
    with pytest.raises(
        JobError, match=r"checkpoint of step 2 .*No space left on device.*previous checkpoint is intact: .*step_000001"
    ):
        run(spec, progress=False)
    last = checkpoints.latest(spec.run_dir)
    assert last.name == "step_000001"
    AutoModelForCausalLM.from_pretrained(last / "model")


def test_driver_killed_then_resumed(tmp_path, tiny_models, ray_local):
    """SIGKILL the `protege run` process (and its embedded Ray) after checkpoint 2, then
    `protege run --resume`: the finished run equals an uninterrupted one, weight for weight."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from protege.cluster.driver import run

    opd = dict(
        algorithm={"type": "opd"},
        steps=4,
        models={"student": {"path": tiny_models["student"]}, "teacher": {"path": tiny_models["teacher"]}},
        learner={"ranks": 1, "zero_stage": 2, "lr": 1e-3, "micro_batch": 16},
    )
    ref = make_spec(tmp_path, tiny_models, "uninterrupted", **opd)
    run(ref, progress=False)

    spec = make_spec(tmp_path, tiny_models, "killed-driver", **opd)
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    proc = subprocess.Popen(
        [sys.executable, "-m", "protege.cli", "run", str(path)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not (spec.run_dir / "checkpoints" / "step_000002" / "state.json").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = {int(p.name.split("_")[1]) for p in checkpoints.list_checkpoints(spec.run_dir)}
    assert 2 in done and 4 not in done  # killed mid-run, with checkpoint 2 intact
    r = subprocess.run(
        [sys.executable, "-m", "protege.cli", "run", str(path), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["step"] for m in _metrics(spec)] == [0, 1, 2, 3, 4]
    a = load_file(checkpoints.latest(ref.run_dir) / "model" / "model.safetensors")
    b = load_file(checkpoints.latest(spec.run_dir) / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
