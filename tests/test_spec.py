"""JobSpec: examples validate, bad specs fail with field paths, cross-field rules hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from protege.cluster.spec import JobSpec, SpecError, load_spec, parse_spec

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]




def _minimal(**over):
    d = {"models": {"student": {"path": "s"}}, "data": {"source": "reasoning_gym", "task": "chain_sum"}}
    d.update(over)
    return d


def test_examples_exist_for_every_algorithm():
    types = {load_spec(p).algorithm.type for p in (ROOT / "examples").rglob("*.yaml")}
    assert {"grpo", "dpo", "kepo", "rlad", "opd", "sft"} <= types


@pytest.mark.parametrize("path", [p for p in (ROOT / "examples").rglob("*.yaml")], ids=lambda p: p.name)
def test_every_example_validates(path):
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)


def test_defaults_follow_algorithms_md():
    s = parse_spec(_minimal(algorithm={"type": "rlad"}, models={"student": {"path": "s"}, "teacher": {"path": "t"}}))
    assert (s.algorithm.alpha, s.algorithm.clamp, s.algorithm.eps_low, s.algorithm.eps_high) == (0.5, 1.0, 0.2, 0.28)
    d = parse_spec(_minimal(algorithm={"type": "dpo"}))
    assert d.algorithm.beta == 0.1
    g = parse_spec(_minimal())
    assert g.algorithm.type == "grpo" and g.algorithm.kl_coef == 0.0 and g.algorithm.kl_estimator == "k3"


def test_errors_name_every_field():
    bad = _minimal(algorithm={"type": "rlad", "alpha": 2}, learner={"lr": -1, "zero": 3})
    with pytest.raises(SpecError) as e:
        parse_spec(bad)
    locs = dict(e.value.errors)
    assert locs["algorithm.alpha"] == "must be between 0 and 1"
    assert "learner.lr" in locs and locs["learner.zero"] == "unknown field"


@pytest.mark.parametrize("algo", ["rlad", "kepo", "opd"])
def test_teacher_algorithms_need_a_teacher(algo):
    with pytest.raises(SpecError) as e:
        parse_spec(_minimal(algorithm={"type": algo}))
    assert e.value.errors == [("models.teacher", f"algorithm '{algo}' needs a teacher model")]


def test_cross_field_rules():
    with pytest.raises(SpecError) as e:
        parse_spec(_minimal(rollout={"samples_per_prompt": 1}))
    assert e.value.errors[0][0] == "rollout.samples_per_prompt"
    with pytest.raises(SpecError, match="offline dpo"):
        parse_spec(_minimal(algorithm={"type": "dpo", "mode": "offline"}))
    with pytest.raises(SpecError, match="data.task: source 'reasoning_gym' needs a task name"):
        parse_spec({"models": {"student": {"path": "s"}}, "data": {"source": "reasoning_gym"}})
    with pytest.raises(SpecError, match="serve.autoscale.max_replicas: must be at least min_replicas"):
        parse_spec(_minimal(serve={"autoscale": {"min_replicas": 3, "max_replicas": 1}}))


def test_unknown_algorithm_type_is_a_field_error():
    with pytest.raises(SpecError) as e:
        parse_spec(_minimal(algorithm={"type": "ppo"}))
    assert e.value.errors[0][0] == "algorithm"


def test_json_and_yaml_load_the_same(tmp_path):
    data = _minimal(steps=3)
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    assert load_spec(tmp_path / "a.json") == load_spec(tmp_path / "a.yaml")


def test_broken_yaml_reports_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("models: {student: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "protege.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_validate_ok_and_bad(tmp_path):
    ok = _cli("validate", "examples/grpo_tiny.yaml")
    assert ok.returncode == 0 and "algorithm:" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_minimal(algorithm={"type": "rlad", "alpha": 1.5}, steps=0)))
    r = _cli("validate", str(bad))
    assert r.returncode == 2
    assert "algorithm.alpha: must be between 0 and 1" in r.stderr
    assert "steps:" in r.stderr


def test_cli_set_override_is_revalidated():
    r = _cli("validate", "examples/grpo_tiny.yaml", "--set", "rollout.temperature=5")
    assert r.returncode == 2 and "rollout.temperature" in r.stderr
    r = _cli("validate", "examples/grpo_tiny.yaml", "--set", "steps=7", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["steps"] == 7


def test_cli_help_explains():
    r = _cli("--help")
    assert r.returncode == 0 and "validate" in r.stdout and "models" in r.stdout
