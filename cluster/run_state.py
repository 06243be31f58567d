"""A run's durable state: checkpoints (the learners' weights plus the driver's step, data
position and RNG), the object-store mirror of the run dir, and the summary at the end."""

from __future__ import annotations

import random
import shutil
import time

import numpy as np
import ray
import torch

from protege.cluster.launch import Roles, gather
from protege.cluster.phases import JobError
from protege.core import checkpoints, storage

# Local-only files of the staging dir that are never mirrored to an object store.
NOT_MIRRORED = ("checkpoints", "actors.json")


def save(spec, roles: Roles, data_state: dict, step: int, version: int, evals: dict | None = None):
    state = {
        "step": step,
        "version": version,
        "data": data_state,
        "rng": get_rng(),
        "time": time.time(),
        "metrics": evals or {},
    }  # the newest eval metrics: checkpoint.keep_best ranks by them
    keep, best = spec.checkpoint.keep, spec.checkpoint.keep_best
    try:
        tmp = checkpoints.tmp_dir(spec.run_dir, step)
        gather([ln.save_checkpoint.remote(str(tmp)) for ln in roles.learners])
        if not spec.run_uri:
            return checkpoints.commit(tmp, state, keep=keep, keep_best=best)
        # Object store: each node uploads what its ranks wrote (nodes need not share a disk), then
        # state.json goes up last as the commit marker; the metrics mirror follows.
        dest = checkpoints.prepare_remote(spec.run_uri, step)
        gather([ln.upload_checkpoint.remote(str(tmp), dest) for ln in _one_learner_per_node(roles)])
        ckpt = checkpoints.commit_remote(dest, state, run_uri=spec.run_uri, keep=keep, keep_best=best)
        storage.upload_tree(spec.run_dir, spec.run_uri, exclude=NOT_MIRRORED)
        shutil.rmtree(tmp, ignore_errors=True)
        return ckpt
    except (OSError, ray.exceptions.RayTaskError) as err:
        if isinstance(err, ray.exceptions.RayTaskError) and not isinstance(err.cause, OSError):
            raise
        cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
        last = checkpoints.latest(spec.run_location)
        raise JobError(
            f"could not write the checkpoint of step {step} under {spec.run_location}: {cause}. "
            f"The previous checkpoint is intact: {last or 'none yet'}. Free space (or fix access "
            "to the bucket) and run `protege run SPEC --resume`."
        ) from err


def _one_learner_per_node(roles: Roles) -> list:
    nodes = ray.get([ln.node_id.remote() for ln in roles.learners])
    first = {}
    for ln, node in zip(roles.learners, nodes):
        first.setdefault(node, ln)
    return list(first.values())


def open_remote_run(spec, resume: bool) -> None:
    """Check the object store before anything starts (the write of the spec is the probe) and, on
    resume in a fresh staging dir (a new pod), fetch the run's metrics and samples so they continue."""
    uri, run_dir = spec.run_uri, spec.run_dir
    try:
        if resume:
            for name in ("metrics.jsonl", "samples.jsonl"):
                if not (run_dir / name).exists() and storage.exists(storage.join(uri, name)):
                    (run_dir / name).write_text(storage.read_text(storage.join(uri, name)))
        storage.write_text(storage.join(uri, "resolved_spec.json"), spec.model_dump_json(indent=2))
    except (OSError, RuntimeError) as err:
        raise JobError(f"checkpoint.dir: cannot write to {uri}: {err}") from err


def get_rng() -> dict:
    return {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _jsonable(x):
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def summary(spec, step: int, version: int, plot) -> dict:
    from protege.cluster.metrics import read_metrics

    rows = read_metrics(spec.run_dir / "metrics.jsonl")
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    return {
        "run_dir": spec.run_location,
        "steps": step,
        "policy_version": version,
        "eval_accuracy_first": evals[0][1] if evals else None,
        "eval_accuracy_last": evals[-1][1] if evals else None,
        "eval_curve": evals,
        "checkpoint": str(checkpoints.latest(spec.run_location) or ""),
        "plot": str(plot or ""),
        **(
            {
                "best_checkpoint": str(
                    checkpoints.best(checkpoints.list_checkpoints(spec.run_location), spec.checkpoint.keep_best) or ""
                )
            }
            if spec.checkpoint.keep_best
            else {}
        ),
    }
