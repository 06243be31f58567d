"""Data loading: reasoning-gym, JSONL/Parquet with line-accurate errors, splits, PromptStream resume."""

import doctest
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import protege.core.data
from protege.core.data import (
    DataError,
    Example,
    PreferenceExample,
    PromptStream,
    format_prompt,
    from_json_safe,
    load_file,
    load_preferences,
    load_reasoning_gym,
    split,
)


def test_doctests():
    result = doctest.testmod(protege.core.data)
    assert result.failed == 0 and result.attempted >= 4


def _write_lines(tmp_path, lines, name="train.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


# --- reasoning-gym --------------------------------------------------------------------------


def test_load_reasoning_gym_is_deterministic_and_json_safe():
    a = load_reasoning_gym("chain_sum", size=4, seed=7, config={"min_terms": 2, "max_terms": 2})
    b = load_reasoning_gym("chain_sum", size=4, seed=7, config={"min_terms": 2, "max_terms": 2})
    assert a == b and len(a) == 4
    ex = a[0]
    assert ex.prompt == from_json_safe(ex.meta["entry"])["question"]
    assert ex.answer == from_json_safe(ex.meta["entry"])["answer"]
    assert ex.meta["source"] == "reasoning_gym" and ex.meta["task"] == "chain_sum"
    assert json.loads(json.dumps(ex.meta)) == ex.meta
    assert load_reasoning_gym("chain_sum", size=4, seed=8) != a


def test_load_reasoning_gym_errors():
    with pytest.raises(DataError, match=r"unknown reasoning-gym task 'chainsum'; did you mean: chain_sum"):
        load_reasoning_gym("chainsum", size=2, seed=0)
    with pytest.raises(DataError, match="invalid config"):
        load_reasoning_gym("chain_sum", size=2, seed=0, config={"no_such_option": 1})
    with pytest.raises(DataError, match="pass 'seed' as an argument"):
        load_reasoning_gym("chain_sum", size=2, seed=0, config={"seed": 1})


def test_task_check_and_lazy_dataset():
    from protege.core.data import check_task, open_reasoning_gym

    check_task("chain_sum")
    with pytest.raises(DataError, match=r"did you mean: basic_arithmetic"):
        check_task("basic_arithmtic")
    dataset = open_reasoning_gym("chain_sum", size=100_000, seed=0)  # entries are generated when read
    assert dataset[0]["question"]
    with pytest.raises(DataError, match="invalid config"):
        open_reasoning_gym("basic_arithmetic", size=2, seed=0, config={"min_terms": 5, "max_terms": 1})


def test_format_prompt():
    assert format_prompt("Q?") == [
        {"role": "user", "content": "Q?\n\nGive only the final answer inside <answer></answer>."}
    ]
    messages = format_prompt("Q?", template=r"Solve {question} and put it in \boxed{}.", system_prompt="S")
    assert messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": r"Solve Q? and put it in \boxed{}."},
    ]
    with pytest.raises(ValueError, match="must contain"):
        format_prompt("Q?", template="no placeholder")


# --- files ----------------------------------------------------------------------------------


def test_load_jsonl(tmp_path):
    path = _write_lines(
        tmp_path,
        ['{"prompt": "1+1?", "answer": "2", "id": 5}', "", "   ", '{"prompt": "2+2?", "answer": "4"}'],
    )
    examples = load_file(path)
    assert [(e.prompt, e.answer) for e in examples] == [("1+1?", "2"), ("2+2?", "4")]
    assert examples[0].meta == {"source": "file", "path": str(path), "location": f"{path}:1", "fields": {"id": 5}}
    assert examples[1].meta["location"] == f"{path}:4"  # blank lines still count
    renamed = _write_lines(tmp_path, ['{"question": "q", "solution": "s"}'], name="renamed.json")
    assert load_file(renamed, prompt_field="question", answer_field="solution") == [
        Example("q", "s", {"source": "file", "path": str(renamed), "location": f"{renamed}:1", "fields": {}})
    ]


def test_response_field_is_kept_verbatim_and_required_on_every_row(tmp_path):
    path = _write_lines(
        tmp_path,
        [
            '{"prompt": "2+3?", "answer": "5", "trace": "<think>2 and 3</think> <answer>5</answer>"}',
            '{"prompt": "1+1?", "answer": "2"}',
        ],
    )
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: missing field 'trace'"):
        load_file(path, response_field="trace")
    first = load_file(path)[0]
    assert "response" not in first.meta and first.meta["fields"]["trace"].startswith("<think>")
    ok = _write_lines(
        tmp_path, ['{"prompt": "2+3?", "answer": "5", "trace": "<think>2 and 3</think> 5"}'], name="ok.jsonl"
    )
    (e,) = load_file(ok, response_field="trace")
    assert e.meta["response"] == "<think>2 and 3</think> 5" and e.meta["fields"] == {} and e.answer == "5"


GOOD = '{"prompt": "p", "answer": "a"}'


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "p", "answer": "a"', r"truncated JSON"),
        ('{"prompt": "p" "answer": "a"}', r"invalid JSON \(Expecting ',' delimiter at column 16\)"),
        ('["p", "a"]', r"expected a JSON object, got array"),
        ('"just a string"', r"expected a JSON object, got string"),
        ('{"question": "p", "solution": "a"}', r"missing field 'prompt' \(fields present: question, solution\)"),
        ('{"prompt": "p"}', r"missing field 'answer' \(fields present: prompt\)"),
        ('{"prompt": "p", "answer": 42}', r"field 'answer' must be a string, got int \(42\)"),
        ('{"prompt": null, "answer": "a"}', r"field 'prompt' must be a string, got null"),
        (b'{"prompt": "caf\xe9", "answer": "a"}', r"not valid UTF-8 \(byte 0xe9 at column 16\)"),
    ],
)
def test_load_file_errors_name_file_line_and_field(tmp_path, bad_line, message):
    path = _write_lines(tmp_path, [GOOD, "", bad_line, GOOD])  # the bad line is line 3
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: {message}"):
        load_file(path)


def test_non_utf8_bytes_reported_at_their_line(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.encode() + b"\n" + b'{"prompt": "\xff\xfe", "answer": "a"}\n')
    with pytest.raises(DataError) as err:
        load_file(path)
    assert str(err.value).startswith(f"{path}:3: not valid UTF-8")


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n  \n")
    with pytest.raises(DataError, match=f"^{re.escape(str(empty))}: has no rows$"):
        load_file(empty)
    with pytest.raises(DataError, match="file not found"):
        load_file(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is a folder; give the .jsonl or .parquet file inside it"):
        load_file(tmp_path)
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'"):
        load_file(csv)
    array = _write_lines(tmp_path, ['[{"prompt": "p", "answer": "a"}]'], name="array.json")
    with pytest.raises(DataError, match=r":1: expected a JSON object, got array; expected one JSON object per line"):
        load_file(array)


def test_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "answer": ["a1", "a2"], "level": [1, 2]}), path)
    examples = load_file(path)
    assert [(e.prompt, e.answer, e.meta["fields"]) for e in examples] == [
        ("p1", "a1", {"level": 1}),
        ("p2", "a2", {"level": 2}),
    ]
    assert examples[1].meta["location"] == f"{path}:row 2"

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2", None], "answer": ["a1", "a2", "a3"]}), bad)
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}:row 3: field 'prompt' must be a string, got null"):
        load_file(bad)
    with pytest.raises(DataError, match=r"row 1: missing field 'chosen' \(fields present: prompt, answer\)"):
        load_preferences(bad)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_file(garbage)


def test_load_preferences(tmp_path):
    path = _write_lines(
        tmp_path,
        ['{"prompt": "p", "chosen": "good", "rejected": "bad"}', '{"prompt": "p", "chosen": "good"}'],
    )
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: missing field 'rejected'"):
        load_preferences(path)
    path = _write_lines(tmp_path, ['{"q": "p", "c": "good", "r": "bad"}'], name="prefs.jsonl")
    assert load_preferences(path, prompt_field="q", chosen_field="c", rejected_field="r") == [
        PreferenceExample("p", "good", "bad")
    ]


# --- split and stream -----------------------------------------------------------------------


def _examples(n):
    return [Example(f"prompt {i}", str(i), {}) for i in range(n)]


def test_split_is_deterministic_and_disjoint():
    data = _examples(50)
    train, held_out = split(data, eval_size=10, seed=1)
    assert (train, held_out) == split(data, eval_size=10, seed=1)
    assert len(train) == 40 and len(held_out) == 10
    assert sorted(e.prompt for e in train + held_out) == sorted(e.prompt for e in data)
    assert split(data, eval_size=10, seed=2)[1] != held_out
    assert split(data, eval_size=0, seed=1) == (data, [])
    for bad in (50, 51, -1):
        with pytest.raises(DataError, match="eval_size must be"):
            split(data, eval_size=bad, seed=1)


def test_split_holds_out_questions_not_rows():
    """A generated task repeats questions: 200 rows over 20 distinct prompts. Holding out 5 must
    take every copy of those 5 out of training, and keep one copy of each in the eval set."""
    data = [Example(f"prompt {i % 20}", str(i % 20), {}) for i in range(200)]
    train, held_out = split(data, eval_size=5, seed=3)
    held = {e.prompt for e in held_out}
    assert len(held_out) == len(held) == 5
    assert not held & {e.prompt for e in train}
    assert len(train) == 150
    with pytest.raises(DataError, match="distinct questions \\(20 in 200 examples\\)"):
        split(data, eval_size=20, seed=3)


def test_prompt_stream_epochs_and_resume():
    data = _examples(10)
    uninterrupted = PromptStream(data, seed=3)
    batches = [uninterrupted.next_batch(4) for _ in range(6)]  # 24 prompts: crosses two epochs
    first_epoch = [e.prompt for b in batches[:2] for e in b] + [e.prompt for e in batches[2][:2]]
    assert sorted(first_epoch) == sorted(e.prompt for e in data)  # each example once per epoch
    assert first_epoch != [e.prompt for e in data]  # shuffled
    assert batches[2][2:] + batches[3] + batches[4][:2] != batches[0] + batches[1] + batches[2][:2]  # reshuffled

    stream = PromptStream(data, seed=3)
    for _ in range(3):
        stream.next_batch(4)
    state = json.loads(json.dumps(stream.state_dict()))  # survives a checkpoint file
    resumed = PromptStream(data, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next_batch(4) == batches[3]
    assert resumed.next_batch(4) == batches[4] and resumed.epoch == 1

    with pytest.raises(DataError, match="seed"):
        PromptStream(data, seed=4).load_state_dict(state)
    with pytest.raises(DataError, match="num_examples"):
        PromptStream(data[:9], seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="fingerprint"):
        PromptStream(_examples(9) + [Example("other", "x", {})], seed=3).load_state_dict(state)


def test_unreadable_file_is_a_data_error(tmp_path, monkeypatch):
    path = _write_lines(tmp_path, ['{"prompt": "p", "answer": "a"}'])

    def refuse(self):  # chmod 000 does not stop root, so refuse the read itself
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: cannot read \\(Permission denied\\)$"):
        load_file(path)
