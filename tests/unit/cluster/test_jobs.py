"""Job submission: `protege submit` / `protege jobs ...` and the REST job API.

These cover the working-dir excludes (through Ray's own matcher), Ray token lookup, run-dir
progress and the REST API's auth and validation, without a Ray cluster. The same commands against
a real Ray head are in tests/integration/test_jobs.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

from protege.cluster import jobs
from protege.cluster.jobs import EXCLUDES
from protege.jobs_cli import register
from protege.core.spec import parse_spec

TASK = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+"],
    "allow_negation": False,
    "allow_parentheses": False,
}


def spec_dict(run_root, student="/models/student", name="job", steps=2) -> dict:
    return {
        "name": name,
        "seed": 0,
        "steps": steps,
        "models": {"student": {"path": student}},
        "data": {
            "source": "reasoning_gym",
            "task": "basic_arithmetic",
            "task_config": TASK,
            "size": 64,
            "eval_size": 4,
        },
        "algorithm": {"type": "grpo"},
        "rollout": {"samples_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 8},
        "learner": {"ranks": 1, "zero_stage": 2, "micro_batch": 4},
        "rewards": [{"name": "exact_match"}],
        "checkpoint": {"dir": str(Path(run_root) / name), "interval": 1, "keep": 2},
        "eval": {"interval": 2, "size": 4},
    }


# Three field errors at once: the API and the CLI must report all of them.
BAD = {"steps": 0, "algorithm": {"type": "grpo", "eps_low": 2.0}, "learnig_rate": 1}


def cli(*argv: str) -> int:
    p = argparse.ArgumentParser(prog="protege")
    register(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(list(argv))
    return args.fn(args)


# ------------------------------------------------------------------------------------------ fast
def _uploaded(root: Path) -> set[str]:
    """What Ray would pack from ``root``: its own traversal and matcher, with the job's excludes."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    found = set()

    def add(p: Path):
        if p.is_file():
            found.add(str(p.relative_to(root)))

    _dir_travel(root, [_get_excludes(root, list(EXCLUDES))], add, include_gitignore=True)
    return found


def test_working_dir_excludes_and_spec(tmp_path):
    project = tmp_path / "project"
    files = [
        "pyproject.toml",
        "core/spec.py",
        "cluster/__pycache__/spec.cpython-311.pyc",
        "protege/cli.py",
        "examples/grpo_tiny.yaml",
        "examples/data/d.jsonl",
        "bench/run.py",
        "bench/results/r.json",
        ".venv/bin/python",
        ".cache/torch_extensions/x.so",
        "runs/a/metrics.jsonl",
        "models/tiny/config.json",
        ".git/HEAD",
        "w.safetensors",
        "examples/m.gguf",
        "spec.json",
    ]
    for f in files:
        (project / f).parent.mkdir(parents=True, exist_ok=True)
        (project / f).write_text("x")
    spec = parse_spec(spec_dict("/shared/runs"))
    staged = jobs.stage_working_dir(spec, project, tmp_path / "staged")
    assert _uploaded(staged) == {
        "pyproject.toml",
        "core/spec.py",
        "examples/grpo_tiny.yaml",
        "examples/data/d.jsonl",
        "bench/run.py",
        "spec.json",
    }
    # the project's own spec.json is shadowed by the job's, and the project is not written to
    assert parse_spec(json.loads((staged / "spec.json").read_text())) == spec
    assert (project / "spec.json").read_text() == "x"

    env = jobs.runtime_env(staged)
    assert env["working_dir"] == str(staged) and env["excludes"] == EXCLUDES
    for key in ("OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING", "DS_ACCELERATOR", "HF_HUB_OFFLINE"):
        assert env["env_vars"][key] == os.environ[key]
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


def test_real_project_upload_is_small(tmp_path):
    staged = jobs.stage_working_dir(parse_spec(spec_dict("/r")), jobs.project_root(), tmp_path)
    up = _uploaded(staged)
    assert "cluster/jobs.py" in up and "examples/grpo_tiny.yaml" in up
    assert not any(p.startswith((".venv/", "runs/", "models/", ".git/", "protege/")) for p in up)
    assert sum((staged / p).stat().st_size for p in up) < 20 * 2**20


def test_entrypoint_interpreter():
    assert jobs.default_python("http://127.0.0.1:8265") == sys.executable
    assert jobs.default_python("http://head.cluster:8265") == "python"
    assert jobs.entrypoint("/opt/my env/python") == "'/opt/my env/python' -m protege.cli run spec.json"


def test_ray_token_lookup(tmp_path, monkeypatch):
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.ray_auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert jobs.ray_auth_headers() == {"Authorization": "Bearer home-token"}
    (tmp_path / "tok").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.ray_auth_headers() == {"Authorization": "Bearer path-token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert jobs.ray_auth_headers() == {"Authorization": "Bearer env-token"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.ray_auth_headers() == {}


def test_run_progress_and_warnings(tmp_path):
    assert jobs.run_progress(tmp_path / "missing")["readable"] is False
    assert jobs.run_progress("runs/relative")["readable"] is False
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.1}\n{"step": 1, "reward/mean": 0.5}\n{"st')
    for step, version in ((1, 1), (2, 2)):
        d = tmp_path / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"step": step, "version": version}))
    (tmp_path / "checkpoints" / ".tmp-step_000003-1").mkdir()  # half-written: not a version
    p = jobs.run_progress(tmp_path)
    assert p["readable"] and p["step"] == 1 and p["metrics"] == {"step": 1, "reward/mean": 0.5}
    assert [(c["step"], c["policy_version"]) for c in p["checkpoints"]] == [(1, 1), (2, 2)]

    rel = parse_spec({**spec_dict("/r"), "checkpoint": {"dir": "runs/{name}"}})
    assert any("checkpoint.dir" in w for w in jobs.spec_warnings(rel, tmp_path))
    assert jobs.spec_warnings(parse_spec(spec_dict("/r")), tmp_path) == []
    bucket = parse_spec({**spec_dict("/r"), "checkpoint": {"dir": "s3://bucket/runs/{name}"}})
    assert jobs.spec_warnings(bucket, tmp_path) == []  # a bucket is readable from anywhere


class RecordingJobs:
    """Stands in for JobsClient in the pure auth/validation tests: only records what reaches it."""

    def __init__(self, project):
        self.project, self.address, self.submitted = project, "http://stub", []

    def submit(self, spec):
        self.submitted.append(spec)
        return f"{spec.name}-0001"

    def list(self):
        return [{"id": s.name} for s in self.submitted]


def test_api_auth_and_validation_reach_nothing(tmp_path):
    from fastapi.testclient import TestClient

    from protege.cluster.job_api import create_app

    with pytest.raises(RuntimeError, match="PROTEGE_JOBS_TOKEN"):
        create_app("http://stub", token="")
    stub = RecordingJobs(tmp_path)
    api = TestClient(create_app(token="s3cret-token", jobs=stub))
    good = spec_dict("/shared/runs")
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret-token"},
        {"Authorization": "Basic s3cret-token"},
    ):
        r = api.post("/v1/jobs", json=good, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert api.get("/v1/jobs", headers=headers).status_code == 401
        assert api.delete("/v1/jobs/x", headers=headers).status_code == 401
    auth = {"Authorization": "Bearer s3cret-token"}
    r = api.post("/v1/jobs", json={**good, **BAD}, headers=auth)
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} == {"steps", "algorithm.eps_low", "learnig_rate"}
    assert api.post("/v1/jobs", content=b"{not json", headers=auth).status_code == 422
    assert stub.submitted == []
    r = api.post("/v1/jobs", json=good, headers=auth)
    assert r.status_code == 201 and r.json()["id"] == "job-0001" and r.headers["location"] == "/v1/jobs/job-0001"
    assert api.get("/v1/jobs", headers=auth).json() == {"jobs": [{"id": "job"}]}


def test_submit_invalid_spec_sends_nothing(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**spec_dict(tmp_path), **BAD}))
    with pytest.raises(SystemExit) as exc:  # port 9 (discard): a connection attempt would fail differently
        cli("submit", str(path), "--address", "http://127.0.0.1:9")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "steps:" in err and "algorithm.eps_low:" in err and "learnig_rate: unknown field" in err
