"""Object-store run dirs (checkpoint.dir = s3://…, gs://…) on the real stack, with file:// URIs: a
real job runs into a "bucket", the local staging dir is thrown away as a fresh pod would, the job
resumes from the bucket and its weights equal an uninterrupted run's; then the bucket's newest
checkpoint is served. The commit protocol itself is in tests/unit/core/test_storage.py.
"""

from __future__ import annotations

import json
import shutil

import pytest

from protege.core import checkpoints


@pytest.mark.slow
def test_job_into_bucket_resumes_on_a_fresh_pod_and_serves(tmp_path, tiny_models, ray_local):
    """checkpoint.dir = file://…: a real job (2 DeepSpeed ranks, ZeRO-2) checkpoints into the
    "bucket"; its staging dir is deleted (a new pod), `--resume` continues from the bucket, and the
    final weights equal an uninterrupted local run's. Then the bucket run is resolved for serving."""
    from safetensors.torch import load_file

    from protege.cluster.driver import run
    from protege.serve import versions
    from tests.integration.test_pipeline import make_spec

    opd = {"algorithm": {"type": "opd"}, "models.teacher": {"path": tiny_models["teacher"]}}
    full = make_spec(tmp_path, tiny_models, name="full", steps=4, **opd)
    run(full, progress=False)

    bucket = f"file://{tmp_path}/bucket/{{name}}"
    part = make_spec(
        tmp_path,
        tiny_models,
        name="part",
        steps=4,
        **opd,
        **{"checkpoint.dir": bucket, "checkpoint.local_dir": str(tmp_path / "stage/{name}")},
    )
    assert part.run_uri == f"file://{tmp_path}/bucket/part"
    first = run(part, stop_after=2, progress=False)
    assert first["steps"] == 2 and first["checkpoint"] == f"{part.run_uri}/checkpoints/step_000002"
    remote = tmp_path / "bucket/part"
    assert (remote / "checkpoints/step_000002/model/config.json").is_file()
    assert (remote / "checkpoints/step_000002/deepspeed/state").is_dir()
    assert (remote / "resolved_spec.json").is_file() and (remote / "metrics.jsonl").is_file()
    assert not list((tmp_path / "stage/part").glob("checkpoints/step_*"))  # nothing kept locally

    shutil.rmtree(tmp_path / "stage")  # the pod is gone; only the bucket remains
    second = run(part, resume=True, progress=False)
    assert second["steps"] == 4 and second["policy_version"] == 4
    steps = [json.loads(x)["step"] for x in (remote / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # the mirrored metrics continue: nothing repeated or skipped
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    a = load_file(checkpoints.latest(full.run_dir) / "model" / "model.safetensors")
    b = load_file(remote / "checkpoints/step_000004/model/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6

    target = versions.resolve(part.run_uri)  # what `protege serve s3://…/run` does
    assert target.version.number == 4 and target.run_dir == part.run_uri
    assert (target.version.model_path / "model.safetensors").is_file()  # a local copy vLLM can load

    # `protege serve versions|pin|rollback` work on the bucket as on a local run dir.
    from protege.cli import main

    assert main(["serve", "rollback", part.run_uri]) == 0
    assert versions.read_pin(part.run_uri) == 3 and json.loads((remote / "published.json").read_text()) == {
        "version": 3
    }
    assert versions.resolve(part.run_uri).version.number == 3
    assert main(["serve", "pin", part.run_uri, "latest"]) == 0
    assert versions.read_pin(part.run_uri) is None and not (remote / "published.json").exists()
