"""Checkpoint layout, shared by the driver (save / resume) and serve/ (published versions).

    RUN_DIR/checkpoints/step_000010/model/        the student, Hugging Face format (transformers, vLLM)
    RUN_DIR/checkpoints/step_000010/deepspeed/    optimizer + scheduler + model shards per rank
    RUN_DIR/checkpoints/step_000010/state.json    step, data position, RNG, policy version (written last)

Atomic: everything is written into a hidden temp folder beside the final one, state.json
last, then one ``os.rename``. A crash at any point leaves either the previous checkpoint or
the complete new one; half-written temp folders are ignored and cleaned on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

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


def commit(tmp: Path, state: dict, *, keep: int) -> Path:
    """Write state.json into ``tmp``, fsync, rename to step_N, prune to the last ``keep``."""
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
    for old in list_checkpoints(tmp.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not every filesystem lets a directory be fsynced
        pass
