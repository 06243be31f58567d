"""bench/compare.py's pure parts: the hint-writing teacher's rows, the paired bootstrap, and a
report that keeps the other pair's results when one pair is rerun."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from protege.core.data import Example, format_prompt
from protege.core.hints import extract_hint, hint_request

ROOT = Path(__file__).resolve().parents[2]


def _compare():
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_teacher_rows_render_as_the_student_prompt_and_the_hint_request():
    c = _compare()
    rows = c.teacher_rows([Example(prompt="Calculate 38 + 19.", answer="57")])
    answer, hint = rows
    # Under data.prompt_template "{question}" the answer row is the student's own user turn...
    assert format_prompt(answer["prompt"], template="{question}") == format_prompt("Calculate 38 + 19.")
    assert answer["response"] == "<answer>57</answer>"
    # ...and the hint row is what KEPO asks the teacher, answered with a hint that holds no answer.
    assert hint["prompt"] == hint_request("Calculate 38 + 19.", "57")
    assert extract_hint(hint["response"]) == "The last digit of the answer is 7."
    assert "57" not in hint["response"]


def test_paired_bootstrap_centres_on_the_mean_difference():
    c = _compare()
    mean, lo, hi = c.paired_bootstrap([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]], n=500)
    assert mean == 0.625 and lo <= mean <= hi
    assert c.paired_bootstrap([[0.0] * 5] * 3, n=100) == (0.0, 0.0, 0.0)


def test_a_rerun_pair_keeps_the_others_in_compare_json(tmp_path):
    c = _compare()
    (tmp_path / "compare.json").write_text(json.dumps({"pairs": {"tiny": {"runs": [], "kept": True}}}))
    args = SimpleNamespace(pair="smollm2", report=None)
    rep = c._write(tmp_path, args, {"steps": 5}, [{"algorithm": "grpo", "seed": 3, "error": "x"}], final=False)
    assert rep["pairs"]["tiny"] == {"runs": [], "kept": True}
    assert rep["pairs"]["smollm2"]["steps"] == 5 and rep["pairs"]["smollm2"]["complete"] is False
    assert rep["pairs"]["smollm2"]["seeds"] == [3]
    assert json.loads((tmp_path / "compare.json").read_text()) == rep
