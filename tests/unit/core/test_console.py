"""The console a person reads: Protégé's own lines only, third-party output in RUN_DIR/logs/. A real
job through the CLI is in tests/integration/test_console.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys


from protege.core.console import LOG_DIR_ENV, LOG_NAME_ENV, Progress, actor_env


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
