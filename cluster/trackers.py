"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow (``metrics.loggers``).

metrics.jsonl is always written (``protege jobs status``, the plot and resume read it); each
tracker named in ``metrics.loggers`` gets the same rows. TensorBoard is the default and needs
nothing extra; W&B and MLflow are optional packages (``pip install 'protege[trackers]'``), so
:func:`check_loggers` runs at ``protege validate`` / ``protege run`` time and a missing one is one
line naming ``metrics.loggers`` instead of an ImportError mid-run.

Credentials are the trackers' own business: W&B reads ``WANDB_API_KEY`` / ``~/.netrc`` itself
(``WANDB_MODE=offline`` writes a local run under RUN_DIR/wandb/), MLflow its tracking URI's. Nothing
here reads, prints or logs a credential; the config sent is the job spec, which holds none (an
API key is named by ``serve.api_key_env``, never written in a spec).

A resumed run continues the same tracker run: the ids are kept in RUN_DIR/trackers.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

#: logger name -> the module it needs (what ``pip install 'protege[trackers]'`` brings).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS_FILE = "trackers.json"


def missing_packages(loggers: list[str]) -> list[str]:
    return [name for name in loggers if importlib.util.find_spec(PACKAGES[name]) is None]


def check_loggers(spec) -> None:
    """Raise preflight.UserError (one line) when a chosen logger's package is not installed here.
    An unset ``metrics.loggers`` (TensorBoard) is exempt: without the package it is skipped, as ever."""
    from protege.cluster.preflight import UserError

    if "loggers" not in spec.metrics.model_fields_set:
        return
    if missing := missing_packages(spec.metrics.loggers):
        pkgs = " ".join("mlflow-skinny" if m == "mlflow" else m for m in missing)
        raise UserError(
            "metrics.loggers",
            f"{', '.join(repr(m) for m in missing)} needs a package that is not "
            f"installed here: pip install 'protege[trackers]' (or {pkgs}), or remove it from the list",
        )


class TensorBoard:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._w.add_scalar(k, v, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class Wandb:
    def __init__(self, run_dir: Path, settings, name: str, config: dict, run_id: str | None):
        import wandb

        # resume="allow" with the saved id: a resumed job appends to its own run.
        self._run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=name,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",
        )
        self.id = self._run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class Mlflow:
    def __init__(self, run_dir: Path, settings, name: str, config: dict, run_id: str | None):
        uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses a file store unless asked; a folder is what an offline run wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._Metric = Metric
        self._client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp = self._client.get_experiment_by_name(settings.project)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(settings.project)
            run_id = self._client.create_run(exp_id, run_name=name).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in _flatten(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params
                self._client.log_batch(run_id, params=params[i : i + 100])
            self._client.log_text(run_id, json.dumps(config, indent=2), "spec.json")
        self.id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._client.log_batch(self.id, metrics=[self._Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self._client.set_terminated(self.id)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_trackers(run_dir: Path, spec=None, *, resume: bool = False) -> list:
    """The trackers ``spec.metrics.loggers`` names (TensorBoard alone without a spec), opened."""
    loggers = spec.metrics.loggers if spec is not None else ["tensorboard"]
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
    out = []
    for name in loggers:
        if name == "tensorboard":
            try:
                out.append(TensorBoard(run_dir))
            except ImportError:  # the default logger without its package: JSONL and the plot still work
                if spec is not None and "loggers" in spec.metrics.model_fields_set:
                    raise
            continue
        settings = spec.metrics
        config = spec.model_dump(mode="json")
        tracker = (Wandb if name == "wandb" else Mlflow)(
            run_dir, settings, settings.run_name or spec.name, config, ids.get(name)
        )
        ids[name] = tracker.id
        out.append(tracker)
    if ids:
        ids_path.write_text(json.dumps(ids))
    return out
