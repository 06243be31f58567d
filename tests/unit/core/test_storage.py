"""Object-store run dirs (checkpoint.dir = s3://…, gs://…), exercised through fsspec with file:// URIs.

The unit tests check the commit protocol (state.json last, deleted first, cut-short uploads
ignored and cleaned); tests/integration/test_storage.py runs a real job into a "bucket", throws the
local staging dir away as a fresh pod would, resumes from the bucket and compares the weights with
an uninterrupted run; then serves the bucket's newest checkpoint.
"""

from __future__ import annotations


import pytest

from protege.core import checkpoints, storage
from protege.core.spec import SpecError, parse_spec


def _fake_ckpt(tmp_path, step: int):
    d = tmp_path / f"local-{step}"
    (d / "model").mkdir(parents=True)
    (d / "model" / "config.json").write_text("{}")
    (d / "deepspeed").mkdir()
    (d / "deepspeed" / "shard.pt").write_bytes(b"x" * 100)
    return d


def _upload(tmp_path, run_uri: str, step: int, keep: int = 2) -> str:
    dest = checkpoints.prepare_remote(run_uri, step)
    storage.upload_tree(_fake_ckpt(tmp_path, step), dest)
    return checkpoints.commit_remote(dest, {"step": step, "version": step}, run_uri=run_uri, keep=keep)


def test_remote_commit_list_and_prune(tmp_path):
    run_uri = f"file://{tmp_path}/bucket/run"
    assert checkpoints.list_checkpoints(run_uri) == [] and checkpoints.latest(run_uri) is None
    for step in (1, 2, 3):
        _upload(tmp_path, run_uri, step)
    listed = checkpoints.list_checkpoints(run_uri)
    assert [checkpoints.read_state(c)["step"] for c in listed] == [2, 3]
    assert listed[-1] == f"{run_uri}/checkpoints/step_000003"
    assert not (tmp_path / "bucket/run/checkpoints/step_000001").exists()  # pruned, all of it
    assert (tmp_path / "bucket/run/checkpoints/step_000003/deepspeed/shard.pt").read_bytes() == b"x" * 100


def test_cut_short_upload_is_invisible_and_cleaned(tmp_path, monkeypatch):
    run_uri = f"file://{tmp_path}/bucket/run"
    _upload(tmp_path, run_uri, 1)
    # The upload of step 2 dies after its first file: no state.json, so it is not a checkpoint.
    fs, _ = storage.filesystem(run_uri)
    real, calls = type(fs).put_file, []

    def dying(self, lpath, rpath, **kw):
        calls.append(rpath)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(self, lpath, rpath, **kw)

    monkeypatch.setattr(type(fs), "put_file", dying)
    dest = checkpoints.prepare_remote(run_uri, 2)
    with pytest.raises(OSError):
        storage.upload_tree(_fake_ckpt(tmp_path, 2), dest)
    monkeypatch.setattr(type(fs), "put_file", real)
    assert (tmp_path / "bucket/run/checkpoints/step_000002").is_dir()
    assert checkpoints.latest(run_uri).endswith("step_000001")  # the previous checkpoint still rules
    # The next save clears the leftover before uploading.
    _upload(tmp_path, run_uri, 3)
    assert not (tmp_path / "bucket/run/checkpoints/step_000002").exists()
    assert [checkpoints.read_state(c)["step"] for c in checkpoints.list_checkpoints(run_uri)] == [1, 3]


def test_state_json_goes_last_and_is_deleted_first(tmp_path, monkeypatch):
    run_uri = f"file://{tmp_path}/b/run"
    dest = checkpoints.prepare_remote(run_uri, 1)
    storage.upload_tree(_fake_ckpt(tmp_path, 1), dest)
    assert checkpoints.latest(run_uri) is None  # uploaded but not committed: not a checkpoint yet
    checkpoints.commit_remote(dest, {"step": 1}, run_uri=run_uri, keep=1)
    assert checkpoints.latest(run_uri) == dest

    removed = []
    fs, _ = storage.filesystem(run_uri)
    real_rm_file = type(fs).rm_file
    monkeypatch.setattr(type(fs), "rm_file", lambda self, p, **kw: (removed.append(p), real_rm_file(self, p, **kw)))
    monkeypatch.setattr(type(fs), "rm", lambda self, p, recursive=False, **kw: removed.append(("rm", p)))
    storage.remove(dest, marker="state.json")
    assert removed[0].endswith("step_000001/state.json") and removed[1][0] == "rm"


def test_spec_accepts_object_store_uris_and_names_bad_ones():
    base = {
        "name": "j",
        "models": {"student": {"path": "s"}},
        "data": {"source": "reasoning_gym", "task": "basic_arithmetic"},
        "rewards": [{"name": "exact_match"}],
    }
    s = parse_spec({**base, "checkpoint": {"dir": "s3://bucket/runs/{name}", "local_dir": "/tmp/stage/{name}"}})
    assert s.run_uri == "s3://bucket/runs/j" and str(s.run_dir) == "/tmp/stage/j" and s.run_location == s.run_uri
    assert parse_spec({**base, "checkpoint": {"dir": "gs://b/{name}/"}}).run_uri == "gs://b/j"
    local = parse_spec({**base, "checkpoint": {"dir": "runs/{name}"}})
    assert local.run_uri is None and local.run_location == "runs/j"
    with pytest.raises(SpecError) as e:
        parse_spec({**base, "checkpoint": {"dir": "s4://bucket/x"}})
    assert e.value.errors[0][0] == "checkpoint.dir" and "s4://" in e.value.errors[0][1]
    with pytest.raises(SpecError) as e:
        parse_spec({**base, "checkpoint": {"dir": "s3://b/x", "local_dir": "s3://b/y"}})
    assert e.value.errors[0][0] == "checkpoint.local_dir"


def test_missing_backend_says_what_to_install():
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401

        pytest.skip("s3fs is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match=r"pip install 'protege\[s3\]'"):
        storage.filesystem("s3://bucket/run")


def test_local_copy_downloads_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEGE_CACHE", str(tmp_path / "cache"))
    src = _fake_ckpt(tmp_path, 7) / "model"
    uri = f"file://{src}"
    a = storage.local_copy(uri)
    assert (a / "config.json").read_text() == "{}" and (a / ".complete").is_file()
    (src / "config.json").write_text('{"changed": 1}')
    assert storage.local_copy(uri) == a and (a / "config.json").read_text() == "{}"  # cached, not refetched

    # One run's copies share a folder and only the newest `keep` stay (a server following a long run).
    import time

    copies = []
    for step in (1, 2, 3):
        src = _fake_ckpt(tmp_path, 100 + step) / "model"
        copies.append(storage.local_copy(f"file://{src}", group="file:///bucket/run", keep=2))
        time.sleep(0.01)
    assert not copies[0].exists() and copies[1].is_dir() and copies[2].is_dir()
    assert a.is_dir()  # another group is untouched


def test_job_status_reads_a_bucket_run(tmp_path):
    """`protege jobs status` / GET /v1/jobs/{id} read step, metrics and checkpoints from the bucket."""
    from protege.cluster.jobs import run_progress

    run_uri = f"file://{tmp_path}/bucket/run"
    assert run_progress(run_uri)["readable"] and run_progress(run_uri)["step"] is None  # nothing yet
    _upload(tmp_path, run_uri, 2)
    storage.write_text(
        storage.join(run_uri, "metrics.jsonl"),
        '{"step": 1, "reward/mean": 0.1}\n{"step": 2, "reward/mean": 0.25}\n{"step": 3, "rew',
    )
    p = run_progress(run_uri)
    assert p["step"] == 2 and p["metrics"]["reward/mean"] == 0.25  # the half-written line is skipped
    assert p["checkpoints"] == [{"step": 2, "policy_version": 2, "path": f"{run_uri}/checkpoints/step_000002"}]
    import importlib.util

    if importlib.util.find_spec("s3fs") is None:  # no backend here: "not readable", not a crash
        assert run_progress("s3://no-backend-here/run")["readable"] is False


def test_bucket_versions_are_listed_without_downloading(tmp_path, monkeypatch):
    """Choosing a version (current, rollback, `serve versions`) only lists the bucket; only what is
    served is downloaded (resolve / the follow loop), and the listing marks it as served."""
    from protege.serve import versions

    monkeypatch.setenv("PROTEGE_CACHE", str(tmp_path / "cache"))
    run_uri = f"file://{tmp_path}/bucket/run"
    for step in (1, 2):
        _upload(tmp_path, run_uri, step)
    now = versions.current(run_uri)
    assert now == versions.list_versions(run_uri)[-1] and now.number == 2
    assert versions.rollback(run_uri) == (2, 1)
    assert not (tmp_path / "cache").exists()  # nothing downloaded so far
    served = versions.resolve(run_uri).version
    assert served.number == 1 and (served.model_path / "config.json").is_file()
