"""The GPU check's first part (bench/gpu_check.sh) run with --device cpu: the real learner, the
dense-teacher losses and the bucket walk, on the CPU. (The GPU-path checks that need no real stack
are in tests/unit/cluster/test_gpu_path.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_part1_runs_on_cpu(tmp_path):
    """The script a bare torch GPU machine runs, here on the CPU: the real Learner (DeepSpeed
    in-process) for GRPO/OPD/OPD-top-k/RLAD/KEPO × ZeRO-0/2 × fp32/bf16, the dense-teacher losses against a
    float64 reference, the bucket walk packed and unpacked bit-exactly."""
    env = {**os.environ, "PROTEGE_PY": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_check.sh"), "--device", "cpu", "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_part1.json").read_text())
    steps = report["train_steps"]["tiny"]
    assert len(steps) == 20 and all(r["ok"] for r in steps), [r for r in steps if not r["ok"]]
    assert {r["algorithm"] for r in steps} == {"grpo", "opd", "opd_topk", "rlad", "kepo_topk_jsd"}
    assert len(report["dense_losses"]) == 10 and all(r["ok"] for r in report["dense_losses"])
    assert any(r["buckets"] >= 2 for r in report["bucketing"]["tiny"])
    assert report["failed"] == 0
