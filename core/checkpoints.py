"""Checkpoint layout, shared by the driver (save / resume) and serve/ (published versions).

    RUN_DIR/checkpoints/step_000010/model/        the student, Hugging Face format (transformers, vLLM)
    RUN_DIR/checkpoints/step_000010/deepspeed/    optimizer + scheduler + model shards per rank
    RUN_DIR/checkpoints/step_000010/state.json    step, data position, RNG, policy version (written last)

Atomic: everything is written into a hidden temp folder beside the final one, state.json
last, then one ``os.rename``. A crash at any point leaves either the previous checkpoint or
the complete new one; half-written temp folders are ignored and cleaned on the next save.

A run dir may also be an object-store URI (``s3://bucket/runs/x``; ``core/storage.py``): the
checkpoint is staged locally by the same code, uploaded, and ``state.json`` is uploaded last as the
commit marker. Every reader here (``list_checkpoints``, ``latest``, ``read_state``) takes either a
local path or a URI and returns locations of the same kind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from protege.core import storage

_STEP = re.compile(r"^step_(\d{6,})$")


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tmp_dir(run_dir: str | Path, step: int) -> Path:
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    d = root / f".tmp-step_{step:06d}-{os.getpid()}"
    d.mkdir()
    return d


def commit(tmp: Path, state: dict, *, keep: int, keep_best: str | None = None) -> Path:
    """Write state.json into ``tmp``, fsync, rename to step_N, prune to the last ``keep`` (and the
    best by ``keep_best``, see ``prunable``)."""
    step = int(state["step"])
    with open(tmp / "state.json.part", "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp / "state.json.part", tmp / "state.json")
    final = tmp.parent / f"step_{step:06d}"
    if final.exists():  # re-saving the same step (resume of an identical run): replace whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    for old in prunable(list_checkpoints(tmp.parent.parent), keep=keep, keep_best=keep_best):
        _remove_local(old)
    return final


def prunable(ckpts: list, *, keep: int, keep_best: str | None = None) -> list:
    """Checkpoints (oldest first) to delete: all but the last ``keep``, sparing the one with the
    highest ``keep_best`` metric (recorded in its state.json at save time), since users keep the
    best student, not the last."""
    old = ckpts[:-keep] if keep else list(ckpts)
    b = best(ckpts, keep_best) if keep_best else None
    return [c for c in old if c != b]


def best(ckpts: list, metric: str):
    """The checkpoint with the highest ``metric`` among ``ckpts`` (the latest on ties), or None."""
    scored = [(read_state(c).get("metrics", {}).get(metric), i, c) for i, c in enumerate(ckpts)]
    scored = [x for x in scored if isinstance(x[0], (int, float))]
    return max(scored)[2] if scored else None


def _remove_local(ckpt: Path) -> None:
    # state.json first: a crash mid-delete must not leave a folder that still looks complete
    (ckpt / "state.json").unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)


# ------------------------------------------------------------------------------ object stores
def remote_path(run_uri: str, step: int) -> str:
    return storage.join(run_uri, "checkpoints", f"step_{step:06d}")


def prepare_remote(run_uri: str, step: int) -> str:
    """Make room for uploading step ``step``: drop leftovers of an upload cut short (step folders
    without state.json) and an earlier complete copy of the same step. Returns its URI."""
    root = storage.join(run_uri, "checkpoints")
    complete = {_step_of(c) for c in list_checkpoints(run_uri)}
    for name in storage.subdirs(root):
        m = _STEP.match(name)
        if m and (int(m.group(1)) not in complete or int(m.group(1)) == step):
            storage.remove(storage.join(root, name), marker="state.json")
    return remote_path(run_uri, step)


def commit_remote(dest: str, state: dict, *, run_uri: str, keep: int, keep_best: str | None = None) -> str:
    """All files of ``dest`` are uploaded: write state.json (the commit marker), prune to ``keep``."""
    storage.write_text(storage.join(dest, "state.json"), json.dumps(state))
    for old in prunable(list_checkpoints(run_uri), keep=keep, keep_best=keep_best):
        storage.remove(old, marker="state.json")
    return dest


# ------------------------------------------------------------------------------ readers
def list_checkpoints(run_dir: str | Path) -> list:
    """Complete checkpoints (with state.json), oldest first: Paths, or URIs for a URI run dir."""
    if storage.is_uri(run_dir):
        root = storage.join(str(run_dir), "checkpoints")
        fs, path = storage.filesystem(root)
        markers = fs.glob(storage.join(path, "step_*", "state.json"))
        found = []
        for marker in markers:
            name = marker.rstrip("/").rsplit("/", 2)[-2]
            if m := _STEP.match(name):
                found.append((int(m.group(1)), storage.join(root, name)))
        return [u for _, u in sorted(found)]
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path):
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_state(ckpt: str | Path) -> dict:
    if storage.is_uri(ckpt):
        return json.loads(storage.read_text(storage.join(str(ckpt), "state.json")))
    return json.loads((Path(ckpt) / "state.json").read_text())


def _step_of(ckpt: str | Path) -> int:
    return int(_STEP.match(str(ckpt).rstrip("/").rsplit("/", 1)[-1]).group(1))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not every filesystem lets a directory be fsynced
        pass
