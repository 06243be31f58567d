"""Every example spec completes through `protege run` on CPU (tiny models, 2 steps, tiny batches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from protege.core.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TINY = [p for p in sorted((ROOT / "examples").glob("*_tiny.yaml"))]


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
    data.update(steps=2)
    data["checkpoint"] = {"dir": str(tmp_path / "run"), "interval": 2}
    data["learner"]["ranks"] = 1
    data["rollout"]["prompts_per_step"] = 2
    summary = run(parse_spec(data, str(path)), progress=False)
    assert summary["steps"] == 2
