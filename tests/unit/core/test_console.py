"""The console a person reads: Protégé's own lines only, third-party output in RUN_DIR/logs/."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protege.core.console import LOG_DIR_ENV, LOG_NAME_ENV, Progress, actor_env

ROOT = Path(__file__).resolve().parents[3]


def test_actor_output_goes_to_its_log_file_native_writes_too(tmp_path):
    """In a fresh process (as an actor is): Python prints, logging, warnings and a raw write to
    fd 2 (what C++ code does) all land in RUN_DIR/logs/<name>-<pid>.log, none on the console."""
    code = (
        "import os, sys, logging, warnings\n"
        "from protege.core.console import capture_actor_output\n"
        "path = capture_actor_output()\n"
        "print('from print'); logging.warning('from logging'); warnings.warn('from warnings')\n"
        "os.write(2, b'from fd 2\\n')\n"
        "sys.stdout.flush()\n"
    )
    env = {**os.environ, LOG_DIR_ENV: str(tmp_path / "logs"), LOG_NAME_ENV: "rollout-0"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    (log,) = (tmp_path / "logs").glob("rollout-0-*.log")
    text = log.read_text()
    for line in ("from print", "from logging", "from warnings", "from fd 2"):
        assert line in text


def test_verbose_keeps_output_on_the_console(monkeypatch, tmp_path):
    assert actor_env(tmp_path, "learner-0")[LOG_NAME_ENV] == "learner-0"
    monkeypatch.setenv("PROTEGE_VERBOSE", "1")
    assert actor_env(tmp_path, "learner-0") == {}


def test_progress_without_a_terminal_prints_lines_not_a_redrawn_bar():
    out = io.StringIO()
    bar = Progress(0, 20, stream=out)
    for step in range(1, 21):
        bar.update(step, {"reward": f"{step / 20:.2f}"})
        if step == 10:
            bar.line("eval   step 10: accuracy 0.500")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "step 4/20  reward 0.20" and lines[-1] == "step 20/20  reward 1.00"
    assert len(lines) == 6 and "eval   step 10: accuracy 0.500" in lines


@pytest.mark.slow
def test_protege_run_console_is_short_and_logs_are_per_role(tmp_path, tiny_models):
    """A real 2-step GRPO job through the CLI (vLLM worker, 2 DeepSpeed ranks): a handful of
    Protégé lines, no third-party warnings; vLLM's and DeepSpeed's output is in the role logs."""
    import yaml

    spec = yaml.safe_load((ROOT / "examples/grpo_tiny.yaml").read_text())
    spec.update(
        steps=2,
        models={"student": {"path": tiny_models["student"]}},
        checkpoint={"dir": str(tmp_path / "run"), "interval": 2, "keep": 1},
    )
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PROTEGE_VERBOSE")}
    r = subprocess.run(
        [sys.executable, "-m", "protege.cli", "run", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    console = (r.stdout + r.stderr).splitlines()
    assert len(console) <= 15, "\n".join(console)
    assert all(line.startswith(("protege:", "step ", "eval ", "saved ", "done:", "  ")) for line in console), console
    logs = tmp_path / "run" / "logs"
    roles = {p.name.rsplit("-", 1)[0] for p in logs.glob("*-*.log")}  # <role>-<pid>.log
    assert {"learner-0", "learner-1", "reward", "rollout-0"} <= roles and (logs / "driver.log").exists()
    rollout = next(logs.glob("rollout-0-*.log")).read_text()
    assert rollout.strip(), "vLLM's output should be in the rollout worker's log"
