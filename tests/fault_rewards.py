"""Misbehaving reward functions, plugged into real jobs as user rewards (`rewards.N.function`) by
tests/integration/test_faults.py: the reward actor must time them out / catch them per call and go on."""

from __future__ import annotations

import time


def hang_sometimes(completion: str, reference: str, meta=None) -> float:
    """Never returns for about one completion in three (longer than any test runs)."""
    if sum(map(ord, completion)) % 3 == 0:
        time.sleep(3600)
    return 0.0


def raise_sometimes(completion: str, reference: str, meta=None) -> float:
    """Raises for about half of the completions, returns NaN for some others, else 1."""
    h = sum(map(ord, completion)) % 4
    if h in (0, 1):
        raise RuntimeError("reward backend unavailable")
    if h == 2:
        return float("nan")
    return 1.0
