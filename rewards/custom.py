"""User reward functions named in a job spec: ``rewards: [{name: mine, function: "pkg.mod:fn"}]``.

A function is called as ``fn(completion, reference, meta) -> float``, exactly like the built-in
rules, by the same ``RewardRunner`` (threads, per-call timeout, errors and hangs score 0 and are
counted as ``<name>/exception`` / ``<name>/timeout``).

The driver imports it before any actor starts, so a typo fails the job up front naming the field.
The function then travels to the reward actor *by value* (cloudpickle), so a ``my_rewards.py`` that
exists only beside the spec on the submitting machine, or in the uploaded working dir at another
path on another node, still works on every node.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable


class RewardImportError(ValueError):
    """``field`` names the spec field (``rewards.N.function``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def load_function(ref: str, *, field: str = "rewards.function") -> Callable:
    """'package.module:function' or 'path/to/file.py:function' -> the callable."""
    target, _, attr = ref.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            if not path.is_file():
                raise RewardImportError(field, f"file '{target}' not found")
            # A private, stable module name per file, registered so cloudpickle can pickle by value.
            name = f"protege_user_reward_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            module = importlib.import_module(target)
    except RewardImportError:
        raise
    except Exception as err:  # the user's module failed to import: say which and why
        raise RewardImportError(field, f"cannot import '{target}': {type(err).__name__}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardImportError(field, f"'{target}' has no callable named '{attr}'")
    _pickle_by_value(module)
    return fn


def _pickle_by_value(module) -> None:
    # Ray pickles actor arguments with its own vendored cloudpickle, so register with that one.
    from ray import cloudpickle

    try:
        cloudpickle.register_pickle_by_value(module)
    except ValueError:  # not a plain module (builtin or a namespace package): pickle by reference
        pass


def reward_functions(specs) -> dict[str, Callable]:
    """name -> callable for every reward of a job spec (built-ins and user functions)."""
    from protege.rewards.base import REWARD_FUNCTIONS

    out = dict(REWARD_FUNCTIONS)
    for i, r in enumerate(specs):
        if r.function is not None:
            out[r.name] = load_function(r.function, field=f"rewards.{i}.function")
    return out
