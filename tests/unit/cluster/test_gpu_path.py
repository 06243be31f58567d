"""GPU-path checks that run on a CPU: engine precision settings, the hardware-status warnings, and
the GPU check's first part (bench/gpu_check.sh) run with --device cpu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protege.actors.engine import fp32_exact_env
from protege.cluster.gpu_status import FEATURES, RAN, gpu_warnings
from protege.core.spec import load_spec

ROOT = Path(__file__).resolve().parents[3]


def test_fp32_engines_on_cuda_use_ieee_dots():
    """vLLM's Triton attention (picked for fp32) uses TF32 dots unless told otherwise."""
    assert fp32_exact_env("float32", cuda=True) == {"TRITON_F32_DEFAULT": "ieee"}
    assert fp32_exact_env("bfloat16", cuda=True) == {}
    assert fp32_exact_env("float32", cuda=False) == {}


def test_gpu_specs_warn_about_what_has_not_run_on_hardware():
    colocated = gpu_warnings(load_spec(ROOT / "deploy/examples/grpo_gpu_colocated.yaml"))
    assert any(w.startswith("colocated placement") for w in colocated)
    assert any(w.startswith("learner on CUDA") for w in colocated)
    assert all("docs/gpu.md" in w for w in colocated)
    assert gpu_warnings(load_spec(ROOT / "examples/grpo_cpu.yaml")) == []
    # The table and docs/gpu.md say the same: nothing has run on a GPU yet.
    assert all(f.status != RAN for f in FEATURES.values())
    doc = (ROOT / "docs/gpu.md").read_text()
    assert all(f.name.split(" (")[0] in doc for f in FEATURES.values())


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
