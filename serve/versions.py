"""Which checkpoint the endpoint serves. Pure: files in, answers out; no Ray, no engine.

A run's *published* versions are its complete checkpoints (``checkpoints.list_checkpoints``: a
``state.json`` is written last, so a half-written checkpoint is never seen). The served version is

- the one pinned in ``RUN_DIR/published.json`` (written by ``protege serve --version N`` and
  ``protege serve rollback``), or
- without a pin, the newest published one, so a server follows a job that is still training.

The version number is the checkpoint's policy version (``state.json["version"]``), the same
number the rollout workers and metrics use.

A run dir may be an object-store URI (``s3://bucket/runs/x``): versions are listed there, the pin
is a file there, and the version to serve is downloaded once into a local cache
(``storage.local_copy``) because vLLM and transformers load from disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from protege.core import storage
from protege.core.checkpoints import list_checkpoints, read_state

PIN_FILE = "published.json"
CACHED_VERSIONS = 3  # local copies kept per bucket run (the served one, and two to roll back to)


@dataclass(frozen=True)
class Version:
    number: int
    step: int | None
    model_path: Path | str  # a Hugging Face folder (a URI in listings of a bucket run; see materialize)


@dataclass(frozen=True)
class Target:
    """What ``protege serve PATH`` serves: ``run_dir`` is set when it should follow new versions."""

    version: Version
    run_dir: Path | str | None  # a URI for a run in an object store


def list_versions(run_dir: str | Path) -> list[Version]:
    """Published versions, oldest first."""
    return [_from_checkpoint(ckpt) for ckpt in list_checkpoints(run_dir)]


def _from_checkpoint(ckpt: Path | str) -> Version:
    state = read_state(ckpt)
    step = int(state["step"])
    model = storage.join(ckpt, "model") if storage.is_uri(ckpt) else Path(ckpt) / "model"
    return Version(int(state.get("version", step)), step, model)


def materialize(version: Version) -> Version:
    """The same version with a local model folder (downloads a bucket's checkpoint once)."""
    if storage.is_uri(version.model_path):
        uri = str(version.model_path)
        run = uri.rsplit("/checkpoints/", 1)[0]  # the run's copies share a cache folder, newest 3 kept
        return Version(version.number, version.step, storage.local_copy(uri, group=run, keep=CACHED_VERSIONS))
    return version


def read_pin(run_dir: str | Path) -> int | None:
    if storage.is_uri(run_dir):
        uri = storage.join(str(run_dir), PIN_FILE)
        return json.loads(storage.read_text(uri))["version"] if storage.exists(uri) else None
    path = Path(run_dir) / PIN_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())["version"]


def write_pin(run_dir: str | Path, version: int | None) -> None:
    """Pin ``version``, or follow the newest (``None``). Atomic: servers polling never read half a file."""
    if storage.is_uri(run_dir):
        uri = storage.join(str(run_dir), PIN_FILE)
        if version is None:
            if storage.exists(uri):
                storage.remove(uri)
        else:
            storage.write_text(uri, json.dumps({"version": int(version)}))
        return
    path = Path(run_dir) / PIN_FILE
    if version is None:
        path.unlink(missing_ok=True)
        return
    part = path.with_name(f".{PIN_FILE}.{os.getpid()}")
    part.write_text(json.dumps({"version": int(version)}))
    os.replace(part, path)


def current(run_dir: str | Path) -> Version | None:
    """The version a server of ``run_dir`` should serve now; ``None`` if there is none to serve.

    A pin naming a version that is not (or no longer) published yields ``None``: a running server
    then keeps what it serves rather than guessing (``resolve`` reports the error at start).
    For a bucket run the model path is a URI: ``materialize`` it before loading.
    """
    versions = list_versions(run_dir)
    pin = read_pin(run_dir)
    if pin is None:
        return versions[-1] if versions else None
    return next((v for v in versions if v.number == pin), None)


def resolve(path: str | Path) -> Target:
    """A run dir, a checkpoint (``step_N``), or a model folder -> what to serve. Raises ValueError."""
    if storage.is_uri(path):
        return _resolve_uri(str(path).rstrip("/"))
    path = Path(path)
    if (path / "checkpoints").is_dir() or (path / "resolved_spec.json").is_file():
        return _run_target(path)
    if (path / "state.json").is_file() and (path / "model").is_dir():
        return Target(_from_checkpoint(path), None)
    if (path / "config.json").is_file():
        if (path.parent / "state.json").is_file():  # step_N/model: label it with its checkpoint's version
            ckpt = _from_checkpoint(path.parent)
            return Target(Version(ckpt.number, ckpt.step, path), None)
        return Target(Version(0, None, path), None)
    raise ValueError(f"{path}: not a run dir, a checkpoint (step_N/) or a Hugging Face model folder")


def rollback(run_dir: str | Path, to: int | None = None) -> tuple[int | None, int]:
    """Pin the version before the one served now (or ``to``). Returns (previous, now pinned)."""
    versions = [v.number for v in list_versions(run_dir)]
    now = current(run_dir)
    served = now.number if now else None
    if to is None:
        earlier = [v for v in versions if served is not None and v < served]
        if not earlier:
            raise ValueError(f"{run_dir}: no published version before {served} (published: {versions})")
        to = earlier[-1]
    elif to not in versions:
        raise ValueError(f"{run_dir}: version {to} is not published (published: {versions})")
    write_pin(run_dir, to)
    return served, to


def _run_target(run: Path | str) -> Target:
    """What a server of run dir ``run`` starts with, downloaded when the run is in a bucket."""
    version = current(run)
    if version is None:
        have, pin = [v.number for v in list_versions(run)], read_pin(run)
        if pin is not None:
            raise ValueError(f"{run}/{PIN_FILE} pins version {pin}, but the published versions are {have}")
        raise ValueError(f"{run}: no complete checkpoint yet (nothing under {run}/checkpoints/step_*)")
    return Target(materialize(version), run)


def _resolve_uri(uri: str) -> Target:
    try:
        if storage.exists(storage.join(uri, "checkpoints")) or storage.exists(storage.join(uri, "resolved_spec.json")):
            return _run_target(uri)
        if storage.exists(storage.join(uri, "state.json")):
            return Target(materialize(_from_checkpoint(uri)), None)
        if storage.exists(storage.join(uri, "config.json")):
            return Target(Version(0, None, storage.local_copy(uri)), None)
    except (OSError, RuntimeError) as err:  # no backend, no access, no such bucket
        raise ValueError(f"{uri}: {err}") from err
    raise ValueError(f"{uri}: not a run dir, a checkpoint (step_N/) or a Hugging Face model folder")
