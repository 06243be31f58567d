"""What `protege submit` does with each path a spec reads (cluster/job_inputs.py): classification
(local folder / local file / hub id / URI / shared / missing), the rewritten spec, what Ray would
pack, and the one-line refusal past Ray's upload limit. No Ray cluster: the slow end-to-end runs of
the README's examples are in tests/unit/cluster/test_jobs.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from protege.cluster import job_inputs, jobs
from protege.cluster.job_inputs import classify
from protege.jobs_cli import register
from protege.cluster.preflight import UserError
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
REMOTE = "http://head.cluster:8265"


def spec_dict(student: str, **extra) -> dict:
    return {
        "name": "job",
        "steps": 2,
        "models": {"student": {"path": student}},
        "data": {
            "source": "reasoning_gym",
            "task": "basic_arithmetic",
            "task_config": TASK,
            "size": 64,
            "eval_size": 4,
        },
        "rollout": {"samples_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 8},
        "learner": {"micro_batch": 4},
        "rewards": [{"name": "exact_match"}],
        "checkpoint": {"dir": "/shared/runs/{name}"},
        "eval": {"interval": 2, "size": 4},
        **extra,
    }


def model_folder(path: Path, weights: int = 1000) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(weights)  # sparse: a "2.3 GiB" model costs no disk
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "examples" / "data").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\n")
    (root / ".gitignore").write_text("models/\nruns/\n*.safetensors\n")
    (root / "examples" / "data" / "rows.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n')
    monkeypatch.chdir(root)
    return root


def kind(value: str, project: Path, *, remote: bool = True, what: str = "model") -> job_inputs.Input:
    packed = set(job_inputs.packed_files(project, jobs.EXCLUDES))
    return classify("models.student.path", value, what, project=project, remote=remote, packed=packed)


def test_classification(project, tmp_path, monkeypatch):
    model_folder(project / "models" / "tiny" / "student")
    local = kind("models/tiny/student", project)
    assert local.kind == "upload" and local.staged == "_inputs/models.student/student" and local.size > 1000
    # a data file the project upload already holds stays as written; one outside travels
    assert kind("examples/data/rows.jsonl", project, what="data").kind == "project"
    outside = tmp_path / "elsewhere" / "train.jsonl"
    outside.parent.mkdir()
    outside.write_text("{}\n")
    f = classify("data.path", str(outside), "data", project=project, remote=True, packed=set())
    assert f.kind == "upload" and f.staged == "_inputs/data/train.jsonl" and f.local == outside
    assert kind("HuggingFaceTB/SmolLM2-135M-Instruct", project).kind == "hub"
    assert kind("s3://bucket/models/student", project).kind == "uri"
    assert kind("models/tiny/nope", project).kind == "missing"  # two slashes: not a hub id either
    # an absolute path: this machine's own when the head is local, the cluster's when not here at all
    assert kind(str(project / "models" / "tiny" / "student"), project, remote=False).kind == "shared"
    assert kind("/mnt/cluster-only/student", project).kind == "shared"
    assert kind("/mnt/cluster-only/student", project, remote=False).kind == "missing"
    # on this machine's local disk, for a remote head: it travels, unless the folder is shared storage
    absolute = str(project / "models" / "tiny" / "student")
    assert kind(absolute, project).kind == "upload"
    monkeypatch.setenv(job_inputs.SHARED_PATHS_ENV, f"/nowhere:{project / 'models'}")
    assert kind(absolute, project).kind == "shared"


def test_network_filesystems_count_as_shared(monkeypatch, tmp_path):
    monkeypatch.setattr(job_inputs, "_mounts", lambda: [(str(tmp_path / "nfs"), "nfs4"), ("/", "ext4")])
    (tmp_path / "nfs" / "m").mkdir(parents=True)
    assert job_inputs.on_shared_storage(tmp_path / "nfs" / "m")
    assert not job_inputs.on_shared_storage(tmp_path)


def test_plan_rewrites_and_packs_inputs(project, tmp_path):
    model_folder(project / "models" / "tiny" / "student")
    spec = parse_spec(
        spec_dict(
            "models/tiny/student",
            algorithm={"type": "opd"},
            models={"student": {"path": "models/tiny/student"}, "teacher": {"path": "models/tiny/student"}},
        )
    )
    plan = jobs.plan_inputs(spec, project, REMOTE)
    assert [i.kind for i in plan.inputs] == ["upload", "upload"]
    assert list(plan.links) == ["_inputs/models.student/student"]  # one folder, two roles: sent once
    sent = job_inputs.rewritten(spec, plan)
    assert sent.models.student.path == sent.models.teacher.path == "_inputs/models.student/student"
    assert spec.models.student.path == "models/tiny/student"  # the caller's spec is untouched

    staged = jobs.stage_working_dir(sent, project, tmp_path / "staged", links=plan.links)
    packed = job_inputs.packed_files(staged, jobs.excludes(with_inputs=True))
    # the weights travel although models/ and *.safetensors are excluded everywhere else
    assert {
        "_inputs/models.student/student/model.safetensors",
        "_inputs/models.student/student/config.json",
        "examples/data/rows.jsonl",
        "spec.json",
    } <= set(packed)
    assert not any(p.startswith("models/") for p in packed)
    assert json.loads((staged / "spec.json").read_text())["models"]["teacher"]["path"] == sent.models.teacher.path
    assert (project / ".gitignore").read_text() == "models/\nruns/\n*.safetensors\n"  # the project is not written


def test_missing_and_too_big_are_refused_in_one_line(project, tmp_path, capsys):
    with pytest.raises(UserError, match=r"^models.student.path: 'models/nope/x' does not exist on this machine"):
        jobs.plan_inputs(parse_spec(spec_dict("models/nope/x")), project, REMOTE)

    big = model_folder(tmp_path / "disk" / "big", weights=int(2.3 * 2**30))
    spec = parse_spec(spec_dict(str(big)))
    with pytest.raises(UserError) as err:
        jobs.plan_inputs(spec, project, REMOTE)
    assert str(err.value) == (
        f"models.student.path: {big} is 2.3 GiB, larger than Ray's 500 MiB upload; "
        "put it on storage the cluster shares or use a bucket checkpoint.dir"
    )
    # the same folder with a bucket run dir goes through the bucket instead
    bucket = parse_spec({**spec_dict(str(big)), "checkpoint": {"dir": "s3://bucket/runs/{name}"}})
    assert jobs.plan_inputs(bucket, project, REMOTE).route == "bucket"
    # for a local head the absolute path is readable as it is
    assert jobs.plan_inputs(spec, project, "http://127.0.0.1:8265").inputs[0].kind == "shared"

    # the CLI: exit 2, one 'error:' line, nothing sent (port 9 would refuse a connection)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(spec_dict(str(big))))
    p = argparse.ArgumentParser(prog="protege")
    register(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(["submit", str(path), "--address", "http://10.255.255.1:9"])
    assert args.fn(args) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines == [f"error: {err.value}"]


def test_bucket_route_publishes_a_zip_ray_can_unpack(project, tmp_path):
    from zipfile import ZipFile

    model_folder(project / "models" / "tiny" / "student")
    spec = parse_spec(spec_dict("models/tiny/student"))
    plan = jobs.plan_inputs(spec, project, REMOTE)
    staged = jobs.stage_working_dir(job_inputs.rewritten(spec, plan), project, tmp_path / "job", links=plan.links)
    uri = f"file://{tmp_path}/bucket/runs/job/job/job-1.zip"
    assert job_inputs.publish(staged, uri, jobs.excludes(True)) == uri
    names = ZipFile(tmp_path / "bucket/runs/job/job/job-1.zip").namelist()
    assert "job/_inputs/models.student/student/model.safetensors" in names  # one top folder: Ray strips it
    assert "job/spec.json" in names and not any(n.startswith("job/models/") for n in names)
    env = jobs.runtime_env(uri, with_inputs=True)
    assert env["working_dir"] == uri and "excludes" not in env
