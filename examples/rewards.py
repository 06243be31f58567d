"""Your own reward functions, named in a spec as `function: examples/rewards.py:NAME`.

Each is called as f(completion, reference, meta) -> float by the reward actor, with the same
guards as the built-ins (a per-call timeout; an exception or NaN scores 0 and is counted).
"""

from __future__ import annotations


def brevity(completion: str, reference: str, meta=None) -> float:
    """1.0 for an answer of at most 24 characters, falling linearly to 0 at 96: discourages rambling."""
    n = len(completion)
    return 1.0 if n <= 24 else max(0.0, 1.0 - (n - 24) / 72)
