"""Checkpoint layout: atomic commit, keep-K pruning, crashes leave the previous one intact."""

from __future__ import annotations

import os

import pytest

from protege.core import checkpoints


def _save(run, step, keep=2, payload="w"):
    tmp = checkpoints.tmp_dir(run, step)
    (tmp / "model").mkdir()
    (tmp / "model" / "weights").write_text(f"{payload}{step}")
    return checkpoints.commit(tmp, {"step": step, "version": step}, keep=keep)


def test_commit_and_keep_last_k(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s)
    names = [p.name for p in checkpoints.list_checkpoints(tmp_path)]
    assert names == ["step_000002", "step_000003"]
    assert checkpoints.read_state(checkpoints.latest(tmp_path)) == {"step": 3, "version": 3}


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path):
    _save(tmp_path, 1)
    tmp = checkpoints.tmp_dir(tmp_path, 2)  # the process "dies" while writing step 2
    (tmp / "model").mkdir()
    (tmp / "model" / "weights").write_text("half")
    latest = checkpoints.latest(tmp_path)
    assert latest.name == "step_000001"
    assert (latest / "model" / "weights").read_text() == "w1"
    # the next save sweeps the stale temp folder
    _save(tmp_path, 2)
    assert not list(checkpoints.ckpt_root(tmp_path).glob(".tmp-*"))


def test_state_json_written_last_marks_completeness(tmp_path):
    _save(tmp_path, 1)
    # a folder without state.json (e.g. copied by hand, interrupted) is not a checkpoint
    bogus = checkpoints.ckpt_root(tmp_path) / "step_000009"
    bogus.mkdir()
    assert checkpoints.latest(tmp_path).name == "step_000001"


def test_failed_commit_keeps_previous(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    tmp = checkpoints.tmp_dir(tmp_path, 2)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", full_disk)
    try:
        checkpoints.commit(tmp, {"step": 2, "version": 2}, keep=2)
    except OSError as e:
        assert e.errno == 28
    monkeypatch.undo()
    assert checkpoints.latest(tmp_path).name == "step_000001"


def test_keep_best_spares_the_best_checkpoint_by_an_eval_metric(tmp_path):
    """keep=1, keep_best=eval/accuracy: after saves at accuracy 0.2, 0.6, 0.4, 0.3 the folder holds
    the last (step 4) and the best (step 2); a spec naming a non-eval metric is refused."""
    from protege.core import checkpoints
    from protege.core.spec import CheckpointSpec

    for step, acc in enumerate([0.2, 0.6, 0.4, 0.3], start=1):
        tmp = checkpoints.tmp_dir(tmp_path, step)
        tmp.mkdir(parents=True, exist_ok=True)
        checkpoints.commit(tmp, {"step": step, "metrics": {"eval/accuracy": acc}}, keep=1, keep_best="eval/accuracy")
    kept = [checkpoints.read_state(c)["step"] for c in checkpoints.list_checkpoints(tmp_path)]
    assert kept == [2, 4]
    assert (
        checkpoints.read_state(checkpoints.best(checkpoints.list_checkpoints(tmp_path), "eval/accuracy"))["step"] == 2
    )
    with pytest.raises(Exception, match="eval metric"):
        CheckpointSpec(keep_best="loss/total")
