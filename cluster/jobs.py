"""Protégé jobs on a Ray cluster, through the Ray Jobs API (the dashboard's job server).

    submit(spec)   validate → stage the project + spec.json → JobSubmissionClient.submit_job → id
    list / status / logs / follow / stop / wait

What a job is on the cluster:

* working_dir: the project (this repository), minus :data:`EXCLUDES` (virtualenvs, caches, run and
  model folders, ``.git``, weights), plus the resolved spec as ``spec.json`` at its root. Relative
  paths in the spec (``examples/data/...``) therefore resolve inside the uploaded copy. The files
  the spec reads that the cluster could not (a model under ``models/`` or ``runs/``, a folder on
  this machine's disk) travel too, under ``_inputs/``, with the submitted spec pointing at them;
  past Ray's upload limit they go through the run's bucket, or the submit is refused
  (cluster/job_inputs.py). ``checkpoint.dir`` should be an absolute path on shared storage or a
  bucket, and :func:`spec_warnings` says so.
* entrypoint: ``python -m protege.cli run spec.json``. The code that runs is the ``protege``
  installed in the cluster's Python (an image with ``pip install protege[gpu]`` or ``[cpu]``);
  the uploaded ``protege/`` folder is excluded so it cannot shadow that install (the repository
  layout maps ``protege.cluster`` to ``cluster/``, which only an install resolves). Against a local
  head (127.0.0.1 / localhost) the entrypoint uses this process's interpreter, ``sys.executable``,
  so a head started from the project's venv runs the project's code.
* env_vars: the CPU/threading defaults from :func:`protege.core.env.worker_env` as set in the submitting
  process, plus ``RAY_OVERRIDE_JOB_RUNTIME_ENV=1`` because the driver's own ``ray.init`` passes the
  same variables again (launch.connect) and Ray refuses overlapping keys otherwise.
* metadata: ``protege_name`` / ``protege_run_dir`` / ``protege_steps`` / ``protege_algorithm``, so
  ``status`` can find the run directory's ``metrics.jsonl`` and checkpoints.

Authentication (Ray 2.60 token auth, on by default for ``ray start``): the token is read the way
Ray's own loader reads it, ``$RAY_AUTH_TOKEN``, then the file ``$RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token``, and sent as ``Authorization: Bearer`` on every request, whether or not
``RAY_AUTH_MODE=token`` is set here: Ray's client adds the header only if ``RAY_AUTH_MODE=token`` was
in the environment when Ray's config was first loaded in this process, so a CLI or API process that
imported Ray earlier would not. ``RAY_AUTH_MODE=disabled`` sends nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from protege.core import storage
from protege.cluster import job_inputs
from protege.core.checkpoints import list_checkpoints, read_state

# Ray applies these with .gitignore syntax, relative to the working dir's root. "/protege": the
# installed package must win over the uploaded folder (see the module docstring).
EXCLUDES = [
    ".venv",
    ".cache",
    "runs",
    "models",
    ".git",
    "bench/results",
    "__pycache__",
    "*.safetensors",
    "*.gguf",
    "/protege",
]
SPEC_FILE = "spec.json"
INPUTS_DIR = job_inputs.INPUTS_DIR
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class JobNotFound(KeyError):
    pass


def project_root() -> Path:
    """The repository this module lives in (editable install), else the current directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def ray_auth_headers() -> dict[str, str]:
    """``Authorization: Bearer <token>`` from Ray's token sources, or {} (none, or auth disabled)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if token:
            break
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def entrypoint(python: str) -> str:
    return f"{shlex.quote(python)} -m protege.cli run {SPEC_FILE}"


def _is_local(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in _LOOPBACK


def default_python(address: str) -> str:
    """This interpreter for a head on this machine; ``python`` (the image's) for a remote one."""
    return sys.executable if _is_local(address) else "python"


def excludes(with_inputs: bool = False) -> list[str]:
    """:data:`EXCLUDES`, and with inputs a last rule that keeps ``_inputs/`` whole: a model folder
    staged there is under ``models/`` here and holds ``*.safetensors``, which the others drop."""
    return [*EXCLUDES, f"!/{INPUTS_DIR}/**"] if with_inputs else list(EXCLUDES)


def runtime_env(
    working_dir: str | Path, extra_env: dict[str, str] | None = None, *, with_inputs: bool = False
) -> dict[str, Any]:
    from protege.core.env import worker_env

    env = {**worker_env(), **(extra_env or {}), "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    if storage.is_uri(working_dir):  # a zip in the run's bucket, packed with the excludes already
        return {"working_dir": str(working_dir), "env_vars": env}
    return {"working_dir": str(working_dir), "excludes": excludes(with_inputs), "env_vars": env}


def stage_working_dir(spec, project: Path, into: Path, links: dict[str, Path] | None = None) -> Path:
    """A folder holding links to the project's top-level entries plus ``spec.json``, and ``links``
    (``_inputs/...`` -> a local file or folder the job reads, cluster/job_inputs.py).

    Ray follows the links when it packs the working dir and applies :data:`EXCLUDES` (and the
    project's .gitignore) to what lies behind them; nothing under the project is written. With
    inputs, the root .gitignore is a copy that ends by keeping ``_inputs/`` whole (see excludes()).
    """
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray itself applies

    top = PathSpec.from_lines("gitwildmatch", EXCLUDES)
    into.mkdir(parents=True, exist_ok=True)
    for entry in project.iterdir():
        if entry.name != SPEC_FILE and not top.match_file(entry.name) and not (links and entry.name == ".gitignore"):
            (into / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    if links:
        ignore = project / ".gitignore"
        text = ignore.read_text() if ignore.is_file() else ""
        (into / ".gitignore").write_text(f"{text.rstrip()}\n!/{INPUTS_DIR}/**\n")
        for rel, target in links.items():
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            (into / rel).symlink_to(target, target_is_directory=target.is_dir())
    # Only what the user wrote: derived fields are derived again there (from the same values).
    (into / SPEC_FILE).write_text(spec.model_dump_json(indent=2, exclude_unset=True))
    return into


def spec_warnings(spec, project: Path) -> list[str]:
    """Paths in the spec that will not mean on the cluster what they mean here. (Inputs, local
    model folders included, travel with the job: cluster/job_inputs.py.)"""
    out = []
    if spec.run_uri is None and not Path(spec.checkpoint.dir).is_absolute():
        out.append(
            f"checkpoint.dir '{spec.checkpoint.dir}' is relative: the run lands in the job's working "
            "directory on the cluster, which Ray deletes later and this side cannot read; use an "
            "absolute path on shared storage or an object-store URI (s3://…)"
        )
    return out


def plan_inputs(spec, project: Path, address: str) -> job_inputs.Plan:
    """How each path the spec reads reaches the cluster at ``address`` (raises preflight.UserError)."""
    return job_inputs.plan(spec, project, remote=not _is_local(address), excludes=list(EXCLUDES))


def run_progress(run_dir: str | Path | None) -> dict[str, Any]:
    """Step, latest metrics and checkpoints of a run, read from its directory.

    Only works where the run directory is readable from this process: the same machine as the
    job, storage the cluster shares, or an object-store URI this process can read (there the
    metrics are as of the last checkpoint: they are mirrored when one is saved). Otherwise
    ``readable`` is False and the rest empty.
    """
    out: dict[str, Any] = {
        "run_dir": str(run_dir) if run_dir else None,
        "readable": False,
        "step": None,
        "metrics": None,
        "checkpoints": [],
    }
    text = _read_metrics_text(run_dir)
    if text is None:
        return out
    out["readable"] = True
    if text:
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written right now
                pass
        if rows:
            out["step"], out["metrics"] = rows[-1].get("step"), rows[-1]
    for ckpt in list_checkpoints(run_dir):
        try:
            state = read_state(ckpt)
        except (OSError, json.JSONDecodeError):
            continue  # pruned between the listing and the read
        out["checkpoints"].append(
            {"step": state.get("step"), "policy_version": state.get("version"), "path": str(ckpt)}
        )
    return out


def _read_metrics_text(run_dir) -> str | None:
    """metrics.jsonl's text ('' if none yet), or None when the run dir cannot be read from here."""
    if not run_dir:
        return None
    if storage.is_uri(run_dir):
        try:
            uri = storage.join(str(run_dir), "metrics.jsonl")
            return storage.read_text(uri) if storage.exists(uri) else ""
        except (OSError, RuntimeError, ValueError):  # no backend or no credentials here
            return None
    run_dir = Path(run_dir)
    if not run_dir.is_absolute() or not run_dir.is_dir():
        return None
    path = run_dir / "metrics.jsonl"
    return path.read_text() if path.is_file() else ""


class JobsClient:
    """Ray Jobs API for Protégé jobs at ``address`` (the dashboard, ``http://HEAD:8265``)."""

    def __init__(self, address: str | None = None, *, project: Path | None = None):
        self.address = address or default_address()
        self.project = project or project_root()
        self._client = None

    @property
    def client(self):
        # Created on first use: the constructor already talks to the cluster.
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address, headers=ray_auth_headers())
        return self._client

    def submit(
        self,
        spec,
        *,
        python: str | None = None,
        extra_env: dict[str, str] | None = None,
        submission_id: str | None = None,
        inputs: job_inputs.Plan | None = None,
    ) -> str:
        """Submit a validated JobSpec; returns the job id (``NAME-xxxxxxxx`` unless given).

        ``inputs`` (from :func:`plan_inputs`, computed here when not given) says which of the
        spec's files travel with the job; the submitted spec points at them in the working dir."""
        job_id = submission_id or f"{spec.name}-{secrets.token_hex(4)}"
        inputs = inputs or plan_inputs(spec, self.project, self.address)
        with tempfile.TemporaryDirectory(prefix="protege-job-") as tmp:
            wd: str | Path = stage_working_dir(
                job_inputs.rewritten(spec, inputs), self.project, Path(tmp) / "job", links=inputs.links
            )
            if inputs.route == "bucket":  # too big for Ray's upload: through the run's bucket
                wd = job_inputs.publish(
                    Path(wd), storage.join(spec.run_uri, "job", f"{job_id}.zip"), excludes(bool(inputs.links))
                )
            # submit_job packs and uploads the working dir before it returns, so tmp may go after.
            return self.client.submit_job(
                entrypoint=entrypoint(python or default_python(self.address)),
                submission_id=job_id,
                runtime_env=runtime_env(wd, extra_env, with_inputs=bool(inputs.links)),
                metadata={
                    "protege_name": spec.name,
                    "protege_run_dir": spec.run_location,
                    "protege_steps": str(spec.steps),
                    "protege_algorithm": spec.algorithm.type,
                },
            )

    def list(self) -> list[dict[str, Any]]:
        """Protégé jobs (those submitted with our metadata), oldest first."""
        jobs = [d for d in self.client.list_jobs() if d.submission_id and "protege_name" in (d.metadata or {})]
        return [self._brief(d) for d in sorted(jobs, key=lambda d: d.start_time or 0)]

    def status(self, job_id: str) -> dict[str, Any]:
        """Ray's state of the job plus its run's step, latest metrics and checkpoints (see run_progress)."""
        d = self._info(job_id)
        return {
            **self._brief(d),
            "message": d.message,
            "entrypoint": d.entrypoint,
            **run_progress((d.metadata or {}).get("protege_run_dir")),
        }

    def state(self, job_id: str) -> str:
        return str(self._info(job_id).status.value)

    def logs(self, job_id: str) -> str:
        self._info(job_id)
        return self.client.get_job_logs(job_id)

    def follow(self, job_id: str) -> Iterator[str]:
        """Log chunks as the job writes them, until it ends."""
        self._info(job_id)
        agen = self.client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()

    def stop(self, job_id: str) -> bool:
        """Ask Ray to stop the job; False if it had already ended."""
        self._info(job_id)
        return bool(self.client.stop_job(job_id))

    def wait(self, job_id: str, timeout: float, states: set[str] = TERMINAL, poll: float = 1.0) -> str:
        deadline = time.monotonic() + timeout
        while (s := self.state(job_id)) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {s} after {timeout:.0f} s")
            time.sleep(poll)
        return s

    def _info(self, job_id: str):
        try:
            return self.client.get_job_info(job_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                raise JobNotFound(job_id) from None
            raise

    @staticmethod
    def _brief(d) -> dict[str, Any]:
        meta = d.metadata or {}
        return {
            "id": d.submission_id,
            "name": meta.get("protege_name"),
            "state": str(d.status.value),
            "algorithm": meta.get("protege_algorithm"),
            "steps": int(meta.get("protege_steps", 0)) or None,
            "start_time": d.start_time,
            "end_time": d.end_time,
        }


def format_status(s: dict[str, Any]) -> str:
    """Human-readable lines for ``protege jobs status``."""
    lines = [f"{s['id']}  {s['state']}  ({s.get('algorithm')}, {s.get('name')})"]
    if s.get("message"):
        lines.append(f"  message: {s['message']}")
    if s.get("run_dir"):
        lines.append(f"  run dir: {s['run_dir']}" + ("" if s.get("readable") else " (not readable from here)"))
    if s.get("step") is not None:
        lines.append(f"  step:    {s['step']} / {s.get('steps')}")
        keys = ("reward/mean", "reward/accuracy", "eval/accuracy", "loss/total", "time/step")
        shown = {k: s["metrics"][k] for k in keys if k in (s.get("metrics") or {})}
        if shown:
            lines.append("  latest:  " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    if s.get("checkpoints"):
        ckpts = ", ".join(f"step {c['step']} (v{c['policy_version']})" for c in s["checkpoints"])
        lines.append(f"  checkpoints: {ckpts}")
    return "\n".join(lines)


def shell_env_hint() -> str:
    """Shown when the job server answers 401: where Ray looks for the token."""
    return (
        "the Ray job server wants a token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, or put it in "
        "~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
    )


__all__ = [
    "EXCLUDES",
    "JobNotFound",
    "JobsClient",
    "entrypoint",
    "format_status",
    "project_root",
    "ray_auth_headers",
    "run_progress",
    "runtime_env",
    "spec_warnings",
    "stage_working_dir",
]
