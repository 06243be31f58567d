"""Training data: reasoning-gym tasks, JSONL / Parquet files, splits and a resumable prompt stream.

Everything here is plain Python; `reasoning_gym` and `pyarrow` are imported only inside the
functions that need them, so importing this module stays cheap (docs/design.md: heavy libraries stay behind narrow doors).

Errors in user files raise `DataError` naming the file, the 1-based line (JSONL) or row
(Parquet) and the field, so a bad row is found without opening a debugger.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

DEFAULT_INSTRUCTION = "Give only the final answer inside <answer></answer>."
DEFAULT_TEMPLATE = "{question}\n\n" + DEFAULT_INSTRUCTION


class DataError(ValueError):
    """A dataset could not be loaded or used; the message names the file, line/row and field."""


@dataclass
class Example:
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable


@dataclass
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str


# --------------------------------------------------------------------------------------------
# reasoning-gym


def load_reasoning_gym(task: str, *, size: int, seed: int, config: dict[str, Any] | None = None) -> list[Example]:
    """Generate `size` examples of a reasoning-gym task (deterministic in `seed`).

    `meta` is {"source": "reasoning_gym", "task", "config", "entry"}; `entry` is the generated
    entry in the JSON-safe encoding of `to_json_safe` (decode with `from_json_safe` before
    handing it back to the task's scorer). `prompt` is the bare question: chat formatting is the
    caller's job (`format_prompt`). Tasks whose answers are checked by a verifier (e.g.
    graph_color) have no reference answer; their `answer` is "".
    """
    config = dict(config or {})
    dataset = open_reasoning_gym(task, size=size, seed=seed, config=config)
    examples = []
    for i in range(size):
        entry = dataset[i]
        answer = entry.get("answer")
        examples.append(
            Example(
                prompt=str(entry["question"]),
                answer="" if answer is None else str(answer),
                meta={"source": "reasoning_gym", "task": task, "config": config, "entry": to_json_safe(entry)},
            )
        )
    return examples


def check_task(task: str) -> None:
    """Raise `DataError` unless reasoning-gym has a task named `task`; the message suggests close names."""
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        close = difflib.get_close_matches(task, list(DATASETS), n=5, cutoff=0.5)
        hint = f"did you mean: {', '.join(close)}?" if close else f"some tasks: {', '.join(sorted(DATASETS)[:8])}, ..."
        raise DataError(f"unknown reasoning-gym task {task!r}; {hint} ({len(DATASETS)} tasks available)")


def open_reasoning_gym(task: str, *, size: int, seed: int, config: dict[str, Any] | None = None):
    """The task's dataset object, its config checked. Cheap: reasoning-gym generates an entry only
    when it is read, so this also serves as the pre-flight check of a job's data section."""
    import reasoning_gym

    check_task(task)
    config = dict(config or {})
    for reserved in ("size", "seed"):
        if reserved in config:
            raise DataError(f"reasoning-gym task {task!r}: pass {reserved!r} as an argument, not inside config")
    if size < 1:
        raise DataError(f"reasoning-gym task {task!r}: size must be >= 1, got {size}")
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(f"reasoning-gym task {task!r}: invalid config {config}: {e}") from e


# Tuples and sets are tagged rather than flattened to lists: some scorers compare metadata
# exactly (arc_agi compares a parsed board, a tuple of tuples, with metadata["output"]), so a
# plain JSON round trip would silently change their scores.
# Dicts with non-string keys (graph_color's {node: colour}) become a tagged list of pairs.
_TUPLE, _SET, _ITEMS = "__tuple__", "__set__", "__items__"


def to_json_safe(value: Any) -> Any:
    """Encode a reasoning-gym entry as JSON-safe data that `from_json_safe` restores exactly.

    >>> to_json_safe({"board": ((1, 2),), "n": 3})
    {'board': {'__tuple__': [{'__tuple__': [1, 2]}]}, 'n': 3}
    >>> entry = {"board": ((1, 2),), "s": {3}, "colours": {0: 1}}
    >>> from_json_safe(json.loads(json.dumps(to_json_safe(entry)))) == entry
    True
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: to_json_safe(v) for k, v in value.items()}
        return {_ITEMS: [[to_json_safe(k), to_json_safe(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [to_json_safe(v) for v in value]
    if isinstance(value, tuple):
        return {_TUPLE: [to_json_safe(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {_SET: [to_json_safe(v) for v in sorted(value, key=repr)]}
    if hasattr(value, "item"):  # numpy scalar
        return to_json_safe(value.item())
    return str(value)


def from_json_safe(value: Any) -> Any:
    """Inverse of `to_json_safe`."""
    if isinstance(value, list):
        return [from_json_safe(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and _TUPLE in value:
            return tuple(from_json_safe(v) for v in value[_TUPLE])
        if len(value) == 1 and _SET in value:
            return {from_json_safe(v) for v in value[_SET]}
        if len(value) == 1 and _ITEMS in value:
            return {from_json_safe(k): from_json_safe(v) for k, v in value[_ITEMS]}
        return {k: from_json_safe(v) for k, v in value.items()}
    return value


def format_prompt(
    question: str, *, template: str | None = None, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """Chat messages for one question; the tokenizer's chat template is applied later.

    `template` must contain "{question}" (substituted literally, so other braces such as
    "\\boxed{}" are safe); by default the question is followed by DEFAULT_INSTRUCTION. A system
    message is included only when `system_prompt` is given.

    >>> format_prompt("What is 3 + 4?", system_prompt="Be brief.")  # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'system', 'content': 'Be brief.'},
     {'role': 'user', 'content': 'What is 3 + 4?\\n\\nGive only the final answer inside <answer></answer>.'}]
    """
    template = DEFAULT_TEMPLATE if template is None else template
    if "{question}" not in template:
        raise ValueError(f"prompt template must contain '{{question}}', got {template!r}")
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": template.replace("{question}", question)})
    return messages


# --------------------------------------------------------------------------------------------
# Files


def load_file(
    path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer", response_field: str | None = None
) -> list[Example]:
    """Load prompt/answer rows from JSON Lines (.jsonl, .json) or Parquet (.parquet).

    Other fields of a row are kept in `meta["fields"]`; `meta` also records the path and the
    line/row. With `response_field`, every row must have that text field too; it is kept as
    `meta["response"]` (a supervised response used verbatim). Blank lines are skipped; every other
    problem raises `DataError` at its line.
    """
    examples = []
    named = (prompt_field, answer_field, response_field)
    for where, row in _read_rows(path):
        meta = {"source": "file", "path": str(path), "location": where}
        meta["fields"] = {k: v for k, v in row.items() if k not in named}
        if response_field is not None:
            meta["response"] = _field(where, row, response_field)
        examples.append(Example(_field(where, row, prompt_field), _field(where, row, answer_field), meta))
    return examples


def load_preferences(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> list[PreferenceExample]:
    """Load prompt/chosen/rejected rows; same formats and error rules as `load_file`."""
    return [
        PreferenceExample(
            _field(where, row, prompt_field), _field(where, row, chosen_field), _field(where, row, rejected_field)
        )
        for where, row in _read_rows(path)
    ]


def _field(where: str, row: dict[str, Any], name: str) -> str:
    if name not in row:
        present = ", ".join(map(str, row)) or "none"
        raise DataError(f"{where}: missing field {name!r} (fields present: {present})")
    value = row[name]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: field {name!r} must be a string, got {kind} ({_short(value)})")
    return value


def _read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) pairs, where location is "file:LINE" (JSONL) or "file:row N" (Parquet)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give the .jsonl or .parquet file inside it")
    if not path.is_file():
        raise DataError(f"{path}: file not found (relative paths start at {Path.cwd()})")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = list(_jsonl_rows(path))
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r} (expected .jsonl, .json or .parquet)")
    if not rows:
        raise DataError(f"{path}: has no rows")
    return rows


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        content = path.read_bytes()
    except OSError as e:  # permissions, a vanished mount: the user's to fix, not a traceback
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    # Decode line by line (not the whole file) so a bad byte is reported at its own line.
    for lineno, raw in enumerate(content.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            truncated = e.pos >= len(line.rstrip())
            why = "truncated JSON" if truncated else "invalid JSON"
            raise DataError(f"{where}: {why} ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            hint = "; expected one JSON object per line (JSON Lines)" if isinstance(row, list) else ""
            raise DataError(f"{where}: expected a JSON object, got {_json_kind(row)}{hint}")
        yield where, row


def _parquet_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    return [(f"{path}:row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Splits and the prompt stream


def split(examples: list[Any], *, eval_size: int, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic train/eval split, disjoint by question; both parts keep the input order.

    ``eval_size`` distinct questions (same prompt text = same question) are held out, one example
    each, and *every* copy of them leaves the training set: a generated task with a small question
    space repeats questions, and a split by row would then test on questions seen in training.

    >>> split(list("abcdef"), eval_size=2, seed=0)
    (['a', 'b', 'd', 'f'], ['c', 'e'])
    >>> split(list("abcabd"), eval_size=2, seed=0)
    (['b', 'b', 'd'], ['a', 'c'])
    """
    keys = [getattr(ex, "prompt", ex) for ex in examples]
    first: dict[Any, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    if not 0 <= eval_size < len(first):
        raise DataError(
            f"eval_size must be >= 0 and < the number of distinct questions ({len(first)}"
            f"{f' in {len(examples)} examples' if len(first) != len(examples) else ''}), got {eval_size}"
        )
    order = list(first.values())
    random.Random(seed).shuffle(order)
    held_out = set(order[:eval_size])
    held_keys = {keys[i] for i in held_out}
    train = [ex for ex, k in zip(examples, keys) if k not in held_keys]
    return train, [examples[i] for i in sorted(held_out)]


class PromptStream:
    """Endless, deterministic, resumable batches over `examples`, reshuffled every epoch.

    The order depends only on (seed, epoch), so `state_dict()` is just the cursor; a batch that
    crosses an epoch boundary continues into the next epoch's order. `load_state_dict` refuses a
    state saved for different data or seed (checked by a fingerprint of the prompts).
    """

    def __init__(self, examples: list[Example], *, seed: int, shuffle: bool = True):
        if not examples:
            raise DataError("PromptStream needs at least one example")
        self._examples = list(examples)
        self._seed = seed
        self._shuffle = shuffle
        self._fingerprint = _fingerprint(self._examples)
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    @property
    def epoch(self) -> int:
        return self._epoch

    def next_batch(self, n: int) -> list[Example]:
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        batch = []
        while len(batch) < n:
            if self._position == len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._epoch_order(self._epoch)
            take = min(n - len(batch), len(self._order) - self._position)
            batch.extend(self._examples[i] for i in self._order[self._position : self._position + take])
            self._position += take
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "num_examples": len(self._examples),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_examples", "fingerprint"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"PromptStream state does not match this stream: {key} is {state.get(key)!r} in the state "
                    f"but {mine[key]!r} here (was it saved for other data or another seed?)"
                )
        if not 0 <= state["position"] <= len(self._examples) or state["epoch"] < 0:
            raise DataError(
                f"PromptStream state has an invalid cursor: epoch {state['epoch']}, position {state['position']}"
            )
        self._epoch, self._position = state["epoch"], state["position"]
        self._order = self._epoch_order(self._epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._examples)))
        if self._shuffle:
            # A str seed is hashed with SHA-512, so the order is the same in every process.
            random.Random(f"protege.PromptStream:{self._seed}:{epoch}").shuffle(order)
        return order


def _fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.prompt.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]
