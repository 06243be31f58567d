"""Job submission against a real Ray head: `protege submit` / `protege jobs ...` and the REST job API.

The tests start their own Ray head with token auth (`ray start --head --block` in a private
--temp-dir and session, stopped by signal: `ray stop` would stop every Ray on the machine), submit
tiny real GRPO jobs and follow one to SUCCEEDED; together about a minute on 2 cores. The fast
tests of the same commands, without Ray, are in tests/unit/cluster/test_jobs.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from protege.cluster import jobs
from protege.cluster.jobs import JobsClient
from tests.unit.cluster.test_jobs import BAD, cli, spec_dict


# ------------------------------------------------------------------------------ a Ray head of our own
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM `ray start --block` (it drains and stops its node), then kill by pid anything left
    from this head only: processes of its session, or running inside its temp dir (job drivers)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            ours = os.getsid(pid) == proc.pid or os.readlink(f"/proc/{pid}/cwd").startswith(temp_dir)
            if ours and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with token auth, private ports, temp dir and session; yields the job server URL."""
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    token = secrets.token_hex(16)
    dash = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dash,
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
    }
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--temp-dir",
        temp_dir,
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
        *[str(x) for kv in ports.items() for x in kv],
    ]
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    os.environ["RAY_AUTH_TOKEN"] = token  # the client side: what a user exports
    os.environ["RAY_AUTH_MODE"] = "token"
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            try:
                JobsClient(address).list()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield {"address": address, "token": token}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        log.close()
        _stop_head(proc, temp_dir)


def _ids(address) -> list[str]:
    return [j["id"] for j in JobsClient(address).list()]


@pytest.mark.slow
def test_job_server_requires_ray_token(ray_head):
    import httpx

    assert httpx.get(f"{ray_head['address']}/api/jobs/").status_code == 401
    ok = httpx.get(f"{ray_head['address']}/api/jobs/", headers=jobs.ray_auth_headers())
    assert ok.status_code == 200


@pytest.mark.slow
def test_invalid_spec_is_never_submitted(ray_head, tmp_path, tiny_models, capsys):
    before = _ids(ray_head["address"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**spec_dict(tmp_path, tiny_models["student"]), **BAD}))
    with pytest.raises(SystemExit) as exc:
        cli("submit", str(bad), "--address", ray_head["address"])
    assert exc.value.code == 2
    assert "algorithm.eps_low" in capsys.readouterr().err
    assert _ids(ray_head["address"]) == before


@pytest.mark.slow
def test_rest_api_against_ray(ray_head, tmp_path, tiny_models):
    from fastapi.testclient import TestClient

    from protege.cluster.job_api import create_app

    address = ray_head["address"]
    api = TestClient(create_app(address, token="api-token"))
    auth = {"Authorization": "Bearer api-token"}
    good = spec_dict(tmp_path, tiny_models["student"], name="rest", steps=500)
    before = _ids(address)
    assert api.post("/v1/jobs", json=good).status_code == 401
    # Ray's own token is not the API's token
    assert api.post("/v1/jobs", json=good, headers={"Authorization": f"Bearer {ray_head['token']}"}).status_code == 401
    r = api.post("/v1/jobs", json={**good, **BAD}, headers=auth)
    assert r.status_code == 422 and len(r.json()["errors"]) == 3
    assert _ids(address) == before

    r = api.post("/v1/jobs", json=good, headers=auth)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert job_id.startswith("rest-") and r.json()["warnings"] == []
    assert job_id in [j["id"] for j in api.get("/v1/jobs", headers=auth).json()["jobs"]]
    s = api.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert s["state"] in {"PENDING", "RUNNING"} and s["run_dir"] == str(tmp_path / "rest") and s["steps"] == 500
    assert api.get("/v1/jobs/nope", headers=auth).status_code == 404
    r = api.delete(f"/v1/jobs/{job_id}", headers=auth)
    assert r.status_code == 200 and r.json()["stopped"] is True
    assert JobsClient(address).wait(job_id, timeout=60) == "STOPPED"


@pytest.mark.slow
def test_submit_follow_status_logs_stop(ray_head, tmp_path, tiny_models, capsys):
    address = ray_head["address"]
    client = JobsClient(address)

    # a long job, stopped once it runs
    long = tmp_path / "long.json"
    long.write_text(json.dumps(spec_dict(tmp_path, tiny_models["student"], name="long", steps=500)))
    assert cli("submit", str(long), "--address", address) == 0
    long_id = capsys.readouterr().out.strip()
    client.wait(long_id, timeout=60, states={"RUNNING"})
    assert cli("jobs", "stop", long_id, "--address", address) == 0
    assert client.wait(long_id, timeout=60) == "STOPPED"
    assert cli("jobs", "stop", long_id, "--address", address) == 0
    assert "already ended" in capsys.readouterr().out

    # a 2-step job, followed to the end through `jobs logs --follow`
    # A stopped job's actors and placement groups are released asynchronously (slowly on 2 busy
    # cores); give the next job longer than the default 30 s to be placed.
    ok_spec = spec_dict(tmp_path, tiny_models["student"], name="ok", steps=2)
    ok_spec["resources"] = {"placement_timeout_s": 180}
    ok = tmp_path / "ok.yaml"
    ok.write_text(json.dumps(ok_spec))
    assert cli("submit", str(ok), "--address", address) == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("ok-")
    rc = []
    follower = threading.Thread(
        target=lambda: rc.append(cli("jobs", "logs", job_id, "--follow", "--address", address)), daemon=True
    )
    follower.start()
    follower.join(timeout=300)
    if follower.is_alive():
        client.stop(job_id)
        pytest.fail(f"job {job_id} did not finish in 5 min:\n{client.logs(job_id)[-3000:]}")
    followed = capsys.readouterr().out
    assert rc == [0], followed[-3000:]
    assert "done: 2 steps" in followed  # the run's closing line, printed at the end

    s = client.status(job_id)
    assert s["state"] == "SUCCEEDED" and s["readable"] and s["step"] == 2 and s["steps"] == 2
    assert "reward/mean" in s["metrics"]
    assert [(c["step"], c["policy_version"]) for c in s["checkpoints"]] == [(1, 1), (2, 2)]
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["steps"] == 2

    assert cli("jobs", "status", job_id, "--address", address) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and "step:    2 / 2" in out and "step 2 (v2)" in out
    assert cli("jobs", "logs", job_id, "--address", address) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert cli("jobs", "list", "--address", address) == 0
    listed = dict(line.split("\t")[:2] for line in capsys.readouterr().out.splitlines())
    assert listed[job_id] == "SUCCEEDED" and listed[long_id] == "STOPPED"
    assert cli("jobs", "status", "no-such-job", "--address", address) == 1


# ------------------------------------------------------------------- the README's examples, submitted
@pytest.fixture(scope="module")
def project_copy(tmp_path_factory, tiny_models):
    """The project's tracked files in a temp folder, plus the models the README's examples read:
    models/tiny (`protege models tiny models/tiny`) and the SFT warm-start checkpoint that
    grpo_cpu.yaml starts from (here the tiny student). Neither folder is in the project upload."""
    root = tmp_path_factory.mktemp("project")
    src = jobs.project_root()
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=src, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        if (src / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, root / rel)
    shutil.copytree(Path(tiny_models["student"]).parent, root / "models" / "tiny")
    shutil.copytree(tiny_models["student"], root / "runs/sft-warmstart/checkpoints/step_000050/model")
    return root


def _submit_example(ray_head, project_copy, monkeypatch, capsys, example: str, *sets: str) -> tuple[str, str]:
    """`protege submit examples/EXAMPLE --set steps=2 ...` from the project copy; (job id, stderr)."""
    monkeypatch.chdir(project_copy)
    monkeypatch.setattr(jobs, "project_root", lambda: project_copy)
    # A previous job's actors are released asynchronously: give this one time to be placed.
    argv = [
        "submit",
        f"examples/{example}",
        "--address",
        ray_head["address"],
        "--set",
        "steps=2",
        "--set",
        "resources.placement_timeout_s=180",
        *[a for s in sets for a in ("--set", s)],
    ]
    rc = cli(*argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out.strip(), out.err


def _finished(address: str, job_id: str) -> str:
    client = JobsClient(address)
    state = client.wait(job_id, timeout=600)
    logs = client.logs(job_id)
    assert state == "SUCCEEDED", logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    return logs


@pytest.mark.slow
# grpo_cpu.yaml's data.eval_size 200 is more than the 121 distinct questions its task has (the split
# holds out whole questions), which `protege run` refuses anywhere; that is the example's, not the
# upload's: a fitting held-out size here.
@pytest.mark.parametrize(
    "example,sets", [("grpo_tiny.yaml", ()), ("grpo_cpu.yaml", ("data.eval_size=40", "eval.size=40"))]
)
def test_readme_example_submitted_runs_there(ray_head, project_copy, monkeypatch, capsys, example, sets):
    job_id, err = _submit_example(ray_head, project_copy, monkeypatch, capsys, example, *sets)
    assert "models.student.path:" in err and "travels with the job as _inputs/models.student/" in err
    logs = _finished(ray_head["address"], job_id)
    assert "done: 2 steps" in logs  # `protege run`'s summary, printed at the end


@pytest.mark.slow
def test_inputs_past_the_upload_limit_go_through_the_bucket(ray_head, project_copy, monkeypatch, capsys, tmp_path):
    from protege.cluster import job_inputs

    monkeypatch.setattr(job_inputs, "UPLOAD_LIMIT", 1)  # everything is "too big" for Ray's upload
    bucket = f"file://{tmp_path}/bucket"
    job_id, err = _submit_example(
        ray_head, project_copy, monkeypatch, capsys, "grpo_tiny.yaml", f"checkpoint.dir={bucket}/{{name}}"
    )
    assert "go through the run's bucket" in err
    assert (tmp_path / "bucket" / "grpo-tiny" / "job" / f"{job_id}.zip").is_file()
    assert JobsClient(ray_head["address"]).status(job_id)["entrypoint"].endswith("run spec.json")
    _finished(ray_head["address"], job_id)
    assert json.loads((tmp_path / "bucket" / "grpo-tiny" / "summary.json").read_text())["steps"] == 2
