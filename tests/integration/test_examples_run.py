"""Every example spec completes through `protege run` on CPU (tiny models, a few steps, tiny batches).

Each run is also the pipeline test of its algorithm: ``CHECKS`` holds what the run must show
beyond finishing (the teacher's signal reached the loss, the hint path ran, the student learned),
so the same algorithm is not driven twice (tests/integration/test_algorithms_pipeline.py keeps
the variants no example covers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from protege.core.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TINY = [p for p in sorted((ROOT / "examples").glob("*_tiny.yaml"))]


def _opd(m):
    assert m[1]["opd/reverse_kl"] != 0.0


def _rlad(m):
    assert "rlad/teacher_logratio_mean" in m[1] and m[1]["rlad/teacher_logratio_mean"] != 0.0


def _kepo(m):
    for k in ("kepo/gate_open_frac", "kepo/distill", "kepo/hints_requested", "kepo/hints_valid", "kepo/injected"):
        assert k in m[1], k
    # the tiny random teacher never writes <hint> tags: every request is skipped, nothing injected
    assert m[1]["kepo/hints_requested"] >= m[1]["kepo/hints_valid"] == 0 == m[1]["kepo/injected"]


def _dpo_online(m):
    assert "dpo/pairs" in m[1] and "dpo/tied_groups" in m[1]  # pairs built from the student's samples (or none: ties)


def _dpo_offline(m):
    assert "dpo/reward_margin" in m[1] and "dpo/pairs" not in m[1]  # the file's pairs, nothing sampled


def _sft(m):
    assert m[-1]["sft/nll"] < m[1]["sft/nll"]


def _reward_model(m):
    for r in m[1:]:
        assert r["reward/component/reward_model"] != 0.0 and "reward/component/brevity" in r


# stem -> (steps, prompts per step, check over the metrics rows; rows[0] is the step-0 evaluation)
CHECKS = {
    "opd_tiny": (2, 2, _opd),
    "rlad_tiny": (2, 2, _rlad),
    "kepo_tiny": (2, 2, _kepo),
    "dpo_online_tiny": (2, 2, _dpo_online),
    "dpo_offline_tiny": (2, 2, _dpo_offline),
    "sft_tiny": (3, 8, _sft),  # the example's own batch: the loss must fall in 3 steps
    "grpo_reward_model_tiny": (2, 2, _reward_model),
}


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_example_runs(path, tmp_path, tiny_models, ray_local):
    from protege.cluster.driver import run

    data = yaml.safe_load(path.read_text())
    data["models"]["student"]["path"] = tiny_models[Path(data["models"]["student"]["path"]).name]
    if "teacher" in data["models"]:
        data["models"]["teacher"]["path"] = tiny_models["teacher"]
    if "reward_model" in data["models"]:
        data["models"]["reward_model"]["path"] = tiny_models["reward"]
    for r in data.get("rewards", []):
        if r.get("function", "").startswith("examples/"):
            r["function"] = str(ROOT / r["function"])
    if data["data"].get("path"):
        data["data"]["path"] = str(ROOT / data["data"]["path"])
    steps, prompts, check = CHECKS.get(path.stem, (2, 2, None))
    data.update(steps=steps)
    data["checkpoint"] = {"dir": str(tmp_path / "run"), "interval": steps}
    data["eval"]["interval"] = steps  # one evaluation, at the end
    data["learner"]["ranks"] = 1
    data["rollout"]["prompts_per_step"] = prompts
    spec = parse_spec(data, str(path))
    summary = run(spec, progress=False)
    assert summary["steps"] == steps
    if check:
        check([json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()])
