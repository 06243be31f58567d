"""What a person sees: Protégé's own lines on the console, everything else in the run's logs.

By default every actor (rollout workers, learner ranks, scorers) writes its stdout and stderr —
vLLM, DeepSpeed, torch, transformers and Ray worker output included, C-level writes too — to
``RUN_DIR/logs/<role>-<pid>.log`` (a restarted actor gets a new file), and the driver sends
third-party logging and Python warnings to ``RUN_DIR/logs/driver.log``. ``-v``/``--verbose``
(``PROTEGE_VERBOSE=1``) leaves all of it on the console instead.

Actors find their file through two environment variables the launcher puts in each actor's
runtime_env; on a multi-node cluster the file is on the node that ran the actor (Ray's own
worker logs keep a copy there too).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

LOG_DIR_ENV, LOG_NAME_ENV, VERBOSE_ENV = "PROTEGE_LOG_DIR", "PROTEGE_LOG_NAME", "PROTEGE_VERBOSE"
# Loggers of ours that keep talking on the console.
OWN = ("protege",)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def actor_env(run_dir: Path, name: str) -> dict[str, str]:
    """env_vars for one actor's runtime_env: where its output goes (none when verbose)."""
    if verbose():
        return {}
    return {LOG_DIR_ENV: str(Path(run_dir).resolve() / "logs"), LOG_NAME_ENV: name}


def capture_actor_output() -> str | None:
    """First thing in an actor: point fds 1 and 2 at its log file. Returns the path (None when
    not asked to). dup2 rather than swapping sys.stdout, so native code (vLLM's C++ kernels,
    DeepSpeed's op builder, NCCL/gloo) lands there as well."""
    folder, name = os.environ.get(LOG_DIR_ENV), os.environ.get(LOG_NAME_ENV)
    if not folder or not name:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = os.path.join(folder, f"{name}-{os.getpid()}.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path


def quiet_driver(run_dir: Path) -> Path | None:
    """In the driver process: third-party logging and warnings to RUN_DIR/logs/driver.log; our
    own loggers and plain prints stay on the console. Returns the log path (None when verbose)."""
    if verbose():
        return None
    folder = Path(run_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "driver.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler._protege = True  # a second run in the same process (the demo) replaces it
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_protege", False) or (
            isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # Libraries that attach their own console handlers (ray, transformers, deepspeed, vllm).
    for name in list(logging.root.manager.loggerDict) + ["ray", "transformers", "deepspeed", "vllm", "torch"]:
        if name.split(".")[0] in OWN:
            continue
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return path


class Progress:
    """One progress display for a run: a live bar on a terminal, a line every ``every`` steps
    otherwise: five lines a run (a log file gets lines, not one long carriage-return line)."""

    def __init__(self, start: int, total: int, *, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled, self.total, self.step, self.t0 = enabled, total, start, time.perf_counter()
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, (total - start) // 5)
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=self.stream, dynamic_ncols=True)

    def update(self, step: int, fields: dict[str, str]) -> None:
        self.step = step
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(fields, refresh=False)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            self.line(f"step {step}/{self.total}  " + "  ".join(f"{k} {v}" for k, v in fields.items()))

    def line(self, text: str) -> None:
        """A line of ours that must not break the bar (eval, checkpoint, restarts)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
