"""The console a person reads, on the real stack: a real job through the CLI prints Protégé's own
lines only; third-party output is in RUN_DIR/logs/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
