"""GPU-path checks that run on a CPU: engine precision settings and the hardware-status warnings.
The GPU check's first part (bench/gpu_check.sh) run with --device cpu is in
tests/integration/test_gpu_path.py."""

from __future__ import annotations

from pathlib import Path


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
