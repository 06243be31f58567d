"""Rule-based rewards: pure functions `fn(completion, reference, meta=None) -> float`.

Each takes the raw completion text and scores only its final answer (see `extract_answer` and
`extract_final_answer`), so reasoning text before the answer never matches by accident.
They may raise on misuse (e.g. missing meta); `RewardRunner` turns that into a 0 score and
counts it. `math_verify` and `reasoning_gym` are imported on first use.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Any

_OPEN, _CLOSE = "<answer>", "</answer>"


def extract_answer(text: str) -> str | None:
    """Content of the last <answer>...</answer> block, stripped; None if there is none.

    >>> extract_answer("First 3 + 4 = 7, so <answer> 7 </answer>")
    '7'
    >>> extract_answer("<answer>1</answer> no, <answer>2</answer>")
    '2'
    >>> extract_answer("the answer is 7") is None
    True
    """
    end = text.rfind(_CLOSE)
    if end < 0:
        return None
    start = text.rfind(_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(_OPEN) : end].strip()


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), stripped; None if there is none.

    >>> extract_boxed(r"so \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    """
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None


def extract_final_answer(text: str) -> str | None:
    """The <answer> tag content if present, else the last \\boxed{} content, else None.

    >>> extract_final_answer(r"<answer>\\boxed{7}</answer>")
    '7'
    >>> extract_final_answer(r"3 + 4 = \\boxed{7}")
    '7'
    """
    answer = extract_answer(text)
    if answer is None:
        return extract_boxed(text)
    boxed = extract_boxed(answer)
    return answer if boxed is None else boxed


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower().rstrip(".").strip()


# Matched before calling Fraction, whose exponent handling would compute 10**N for any N
# ("1e999999999" from a model would stall every thread: big-int power holds the GIL).
_NUMBER = re.compile(r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d{1,4})?|\d+/\d+)", re.IGNORECASE)


def _as_number(text: str) -> Fraction | None:
    text = text.replace(" ", "")
    if len(text) > 200 or not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def exact_match(completion: str, reference: str, meta: dict[str, Any] | None = None) -> float:
    """1.0 if the answer equals the reference after normalisation, else 0.0.

    The answer is the <answer> content when there is one, otherwise the whole completion.
    Normalisation: strip, collapse whitespace, lower-case, drop a trailing period; two values
    that both parse as numbers (int, decimal, "a/b", exponent) compare numerically.

    >>> exact_match("<answer>4.0</answer>", "4")
    1.0
    >>> exact_match("  Paris. ", "paris")
    1.0
    >>> exact_match("<answer>5</answer>", "4")
    0.0
    """
    answer = extract_answer(completion)
    got, want = _normalise(completion if answer is None else answer), _normalise(reference)
    if got == want:
        return 1.0
    got_n, want_n = _as_number(got), _as_number(want)
    return float(got_n is not None and got_n == want_n)


def format_reward(completion: str, reference: str = "", meta: dict[str, Any] | None = None) -> float:
    """1.0 if there is exactly one <answer>...</answer> block and its content is nonempty.

    >>> format_reward("thinking... <answer>42</answer>", "")
    1.0
    >>> format_reward("<answer>1</answer><answer>2</answer>", "")
    0.0
    >>> format_reward("<answer> </answer>", "")
    0.0
    """
    if completion.count(_OPEN) != 1 or completion.count(_CLOSE) != 1:
        return 0.0
    start, end = completion.find(_OPEN), completion.find(_CLOSE)
    return float(start < end and completion[start + len(_OPEN) : end].strip() != "")


# A number followed by an arithmetic operator and another operand, e.g. "3 + 4", "2^{10}",
# "6 \times 7". Unary minus ("-4") and fractions ("1/2", "\frac{1}{2}") do not match.
_UNEVALUATED = re.compile(r"\d\s*(?:[-+*×÷^]|\\times|\\cdot|\\div)\s*[\d({\\]")


def math_verify_reward(completion: str, reference: str, meta: dict[str, Any] | None = None) -> float:
    """1.0 if the final answer is mathematically equal to the reference (math-verify), else 0.0.

    Only the final answer is parsed: the <answer> content or the last \\boxed{}. math-verify's
    default extraction searches the whole text and so rewards a completion that merely restates
    the question ("3 + 4" for "What is 3 + 4?"); here that scores 0. For the same reason, when
    the reference is a plain number an unevaluated arithmetic answer ("<answer>3 + 4</answer>")
    scores 0 (deviation from math-verify, which would accept it). math-verify's signal-based
    timeouts are disabled (`parsing_timeout=None`, `timeout_seconds=None`) so this runs off the
    main thread; the caller (`RewardRunner`) enforces the time limit.

    >>> math_verify_reward("3 + 4", "7")
    0.0
    >>> math_verify_reward("<answer>7</answer>", "7"), math_verify_reward(r"\\boxed{\\frac{14}{2}}", "7")
    (1.0, 1.0)
    >>> math_verify_reward("<answer>3 + 4</answer>", "7")
    0.0
    """
    answer = extract_final_answer(completion)
    if not answer:
        return 0.0
    if _as_number(reference.strip()) is not None and _UNEVALUATED.search(answer):
        return 0.0
    from math_verify import parse, verify

    gold = parse(reference, parsing_timeout=None)
    pred = parse(answer, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=None))


_scorers: dict[tuple[str, str], Any] = {}
_scorers_lock = threading.Lock()


def _reasoning_gym_scorer(task: str, config: dict[str, Any]):
    """The task's `score_answer`, built once per (task, config) and shared by all threads."""
    import json

    key = (task, json.dumps(config, sort_keys=True))
    with _scorers_lock:
        if key not in _scorers:
            import reasoning_gym

            # size/seed only affect generation, not scoring; some scorers read other config fields.
            dataset = reasoning_gym.create_dataset(task, size=1, seed=0, **config)
            _scorers[key] = dataset.score_answer
        return _scorers[key]


def reasoning_gym_reward(completion: str, reference: str, meta: dict[str, Any] | None = None) -> float:
    """The reasoning-gym task's own score (0.0 to 1.0) for the final answer.

    `meta` is what `protege.core.data.load_reasoning_gym` stores: {"task", "entry", "config"}. The
    answer is `extract_final_answer(completion)`; None (no answer marker) scores 0 in every task.
    `reference` is unused: the scorer reads the entry (some tasks have no single reference).

    >>> from protege.core.data import load_reasoning_gym
    >>> ex = load_reasoning_gym("chain_sum", size=1, seed=0)[0]
    >>> reasoning_gym_reward(f"<answer>{ex.answer}</answer>", ex.answer, ex.meta)
    1.0
    """
    if not meta or "task" not in meta or "entry" not in meta:
        raise ValueError("reasoning_gym_reward needs meta with 'task' and 'entry' (from load_reasoning_gym)")
    from protege.core.data import from_json_safe

    score_answer = _reasoning_gym_scorer(meta["task"], meta.get("config") or {})
    return float(score_answer(extract_final_answer(completion), from_json_safe(meta["entry"])))
