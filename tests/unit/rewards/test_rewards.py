"""Rule rewards (strings in, floats out), the reasoning-gym scorer and RewardRunner's isolation.

The runner and the reward model return raw components (the scorer contract, core/records.py
ScoreRecord); the weighted sums asserted here go through the driver's one combine
(cluster/scoring.py), as in a job."""

import doctest
import threading
import time

import pytest

from protege.cluster.scoring import Score, combine
from protege.core.data import Example, load_reasoning_gym
from protege.core.records import Rollout, Sample, ScoreRecord
from protege.rewards import rules
from protege.rewards.base import REWARD_FUNCTIONS, RewardRunner, get_reward_fn
from protege.rewards.rules import (
    exact_match,
    extract_answer,
    extract_final_answer,
    format_reward,
    math_verify_reward,
    reasoning_gym_reward,
)


def test_doctests():
    result = doctest.testmod(rules)
    assert result.failed == 0 and result.attempted >= 10


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>7</answer>", "7"),
        ("reasoning <answer>\n  7 \n</answer> trailing", "7"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>a <answer>b</answer>", "b"),  # the innermost opening tag before the last close
        ("<answer></answer>", ""),
        ("no tags at all", None),
        ("<answer>unclosed", None),
        ("</answer> close before <answer>", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{7}", "7"),
        (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"<answer>\boxed{9}</answer>", "9"),
        (r"<answer>9</answer> \boxed{8}", "9"),  # the tag wins over a box outside it
        (r"\boxed{unbalanced", None),
        ("3 + 4", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("<answer>4</answer>", "4", 1.0),
        ("<answer>4.0</answer>", "4", 1.0),
        ("<answer>1/2</answer>", "0.5", 1.0),
        ("<answer>  New   York. </answer>", "new york", 1.0),
        ("Paris.", "paris", 1.0),  # no tag: the whole completion is the answer
        ("<answer>-3</answer>", "-3.00", 1.0),
        ("<answer>5</answer>", "4", 0.0),
        ("the answer is 4", "4", 0.0),
        ("<answer>1e999999999</answer>", "1", 0.0),  # not parsed as a number (would stall on 10**N)
        ("<answer>four</answer>", "4", 0.0),
    ],
)
def test_exact_match(completion, reference, expected):
    assert exact_match(completion, reference) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>42</answer>", 1.0),
        ("Let me think. 6 * 7 = 42.\n<answer>42</answer>", 1.0),
        ("<answer>   </answer>", 0.0),
        ("<answer>1</answer><answer>2</answer>", 0.0),
        ("<answer>42", 0.0),
        ("42</answer>", 0.0),
        ("</answer>42<answer>", 0.0),
        ("42", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion, "42") == expected


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("3 + 4", "7", 0.0),  # restates "What is 3 + 4?": math-verify's default extraction says 1
        ("What is 3 + 4? It is 3 + 4", "7", 0.0),
        ("<answer>7</answer>", "7", 1.0),
        (r"\boxed{7}", "7", 1.0),
        (r"so the result is \boxed{\frac{14}{2}}", "7", 1.0),
        ("<answer>7.0</answer>", "7", 1.0),
        (r"<answer>\frac{1}{2}</answer>", "0.5", 1.0),
        ("<answer>3 + 4</answer>", "7", 0.0),  # unevaluated arithmetic for a numeric reference
        (r"<answer>2^{3}</answer>", "8", 0.0),
        ("<answer>8</answer>", "7", 0.0),
        ("<answer>x + 1</answer>", "1 + x", 1.0),  # symbolic references still compare symbolically
        ("<answer>banana</answer>", "7", 0.0),
        ("<answer></answer>", "7", 0.0),
    ],
)
def test_math_verify_reward(completion, reference, expected):
    assert math_verify_reward(completion, reference) == expected


def test_plain_math_verify_would_reward_the_restated_question():
    """Why math_verify_reward extracts the final answer itself: the library default says 1 here."""
    from math_verify import parse, verify

    assert verify(parse("7", parsing_timeout=None), parse("3 + 4", parsing_timeout=None), timeout_seconds=None)
    assert math_verify_reward("3 + 4", "7") == 0.0


def test_math_verify_reward_off_main_thread():
    """math-verify's default timeouts use SIGALRM, which fails off the main thread; ours are off."""
    got = []
    t = threading.Thread(target=lambda: got.append(math_verify_reward("<answer>7</answer>", "7")))
    t.start()
    t.join(30)
    assert got == [1.0]


@pytest.mark.parametrize("task", ["basic_arithmetic", "chain_sum"])
def test_reasoning_gym_reward_on_generated_entries(task):
    examples = load_reasoning_gym(task, size=5, seed=3)
    for ex in examples:
        assert reasoning_gym_reward(f"work... <answer>{ex.answer}</answer>", ex.answer, ex.meta) == 1.0
        wrong = str(int(ex.answer) + 1)
        assert reasoning_gym_reward(f"<answer>{wrong}</answer>", ex.answer, ex.meta) < 1.0
        assert reasoning_gym_reward(ex.answer + " with no answer marker", ex.answer, ex.meta) == 0.0


def test_reasoning_gym_reward_needs_meta():
    with pytest.raises(ValueError, match="needs meta"):
        reasoning_gym_reward("<answer>1</answer>", "1", None)


def test_registry():
    assert set(REWARD_FUNCTIONS) == {"exact_match", "format", "math_verify", "reasoning_gym"}
    assert get_reward_fn("format") is format_reward
    with pytest.raises(KeyError, match="valid rewards: exact_match, format, math_verify, reasoning_gym"):
        get_reward_fn("fromat")


def rollout_of(text: str, i: int = 0) -> Rollout:
    return Rollout(example_index=i, prompt_ids=[1, 2], sample=Sample([3], [-0.5], text, "stop"), policy_version=0)


def weighted(records, weights):
    """The rule runner's records as the driver scores them (cluster/scoring.py combine)."""
    return combine({"reward": records}, weights, len(records))


def test_runner_weighted_sum_and_components():
    with RewardRunner(["exact_match", "format"], timeout_s=5.0) as runner:
        texts = ["<answer>4</answer>", "4", "<answer>5</answer>"]
        records = runner.score_texts(texts, ["4"] * 3, [None] * 3)
        assert records == [
            ScoreRecord({"exact_match": 1.0, "format": 1.0}, {}),
            ScoreRecord({"exact_match": 1.0, "format": 0.0}, {}),
            ScoreRecord({"exact_match": 0.0, "format": 1.0}, {}),
        ]
        scores = weighted(records, {"exact_match": 1.0, "format": 0.5})
        assert scores == [
            Score(1.5, {"exact_match": 1.0, "format": 1.0}, {}),
            Score(1.0, {"exact_match": 1.0, "format": 0.0}, {}),
            Score(0.5, {"exact_match": 0.0, "format": 1.0}, {}),
        ]
        # The scorer contract: rollouts[i] scored against examples[i] (its text, answer and meta).
        examples = [Example(prompt="2 + 2?", answer="4") for _ in texts]
        assert runner.score([rollout_of(t, i) for i, t in enumerate(texts)], examples) == records
        assert runner.score_one("<answer>4</answer>", "4") == records[0]
        assert runner.score([], []) == [] and runner.score_texts([], [], []) == []
        with pytest.raises(ValueError, match="equal lengths"):
            runner.score_texts(["a"], [], [])
        with pytest.raises(ValueError, match="equal lengths"):
            runner.score([rollout_of("a")], [])
    with pytest.raises(KeyError, match="valid rewards"):
        RewardRunner(["nope"])


def test_runner_survives_raising_hanging_and_nan_rewards():
    release = threading.Event()

    def boom(completion, reference, meta=None):
        raise RuntimeError("bad reward")

    def hang(completion, reference, meta=None):
        release.wait(10)  # sleeps 10 s unless released at the end of the test
        return 1.0

    def nan(completion, reference, meta=None):
        return float("nan")

    functions = {"boom": boom, "hang": hang, "nan": nan, "format": format_reward}
    runner = RewardRunner(["boom", "hang", "nan", "format"], timeout_s=0.3, max_workers=2, functions=functions)
    weights = {"boom": 1.0, "hang": 1.0, "nan": 1.0, "format": 2.0}
    try:
        start = time.monotonic()
        scores = weighted(runner.score_texts(["<answer>1</answer>", "none"], ["1", "1"], [None, None]), weights)
        elapsed = time.monotonic() - start
        # Two hung calls on two workers: each is abandoned after ~0.3 s and replaced.
        assert elapsed < 3.0
        for score, fmt in zip(scores, [1.0, 0.0]):
            assert score.components == {"boom": 0.0, "hang": 0.0, "nan": 0.0, "format": fmt}
            assert score.value == 2.0 * fmt
            assert score.errors == {"boom/exception": 1, "hang/timeout": 1, "nan/exception": 1}
        # The replacement workers serve the next step; the stuck threads are still sleeping.
        again = runner.score_texts(["<answer>1</answer>"], ["1"], [None])
        assert again[0].components["format"] == 1.0 and again[0].errors["hang/timeout"] == 1

        # Abandoned threads beyond the cap: no replacements, so calls are skipped, not blocked.
        capped = RewardRunner(["hang"], timeout_s=0.2, max_workers=1, max_abandoned=1, functions=functions)
        start = time.monotonic()
        scores = capped.score_texts(["a", "b", "c"], ["", "", ""], [None] * 3)
        assert time.monotonic() - start < 3.0
        assert [s.errors for s in scores] == [{"hang/timeout": 1}, {"hang/skipped": 1}, {"hang/skipped": 1}]

        # The cap is per reward: once 'hang' has used its one abandoned thread it is skipped without
        # running (costing no time), and 'format' keeps scoring on the remaining worker.
        mixed = RewardRunner(["hang", "format"], timeout_s=0.2, max_workers=1, max_abandoned=1, functions=functions)
        for _ in range(3):
            scores = mixed.score_texts(["<answer>1</answer>"] * 4, ["1"] * 4, [None] * 4)
            assert [s.components["format"] for s in scores] == [1.0] * 4
            assert all(set(s.errors) <= {"hang/timeout", "hang/skipped"} for s in scores)
        assert sum(s.errors.get("hang/timeout", 0) for s in scores) == 0  # tripped: not even tried
    finally:
        release.set()
        runner.close()


# ------------------------------------------------------------------ user reward functions
def test_user_reward_functions_load_from_a_file_or_a_module(tmp_path):
    from protege.rewards.custom import RewardImportError, load_function

    f = tmp_path / "my_rewards.py"
    f.write_text("def short(completion, reference, meta=None):\n    return 1.0 if len(completion) < 5 else 0.0\n")
    fn = load_function(f"{f}:short", field="rewards.1.function")
    assert fn("abc", "x") == 1.0 and fn("abcdef", "x") == 0.0
    assert load_function("tests.fault_rewards:raise_sometimes").__name__ == "raise_sometimes"
    # It travels by value: a process that cannot import the file still gets a working function.
    from ray import cloudpickle

    import subprocess
    import sys

    blob = cloudpickle.dumps(fn)
    f.unlink()  # gone from disk, and never imported in the child: only the pickled code remains
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ray import cloudpickle; "
            "fn = cloudpickle.loads(sys.stdin.buffer.read()); print(fn('ab', 'x'), fn('abcdefg', 'x'))",
        ],
        input=blob,
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    assert child.stdout.decode().split() == ["1.0", "0.0"]

    with pytest.raises(RewardImportError, match=r"^rewards\.1\.function: file 'nope\.py' not found"):
        load_function("nope.py:f", field="rewards.1.function")
    f.write_text("def short(c, r, m=None):\n    return 0.0\n")
    with pytest.raises(RewardImportError, match=r"has no callable named 'missing'"):
        load_function(f"{f}:missing", field="rewards.1.function")
    with pytest.raises(RewardImportError, match=r"cannot import 'no_such_pkg\.mod': ModuleNotFoundError"):
        load_function("no_such_pkg.mod:f", field="rewards.1.function")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_at_all\n")
    with pytest.raises(RewardImportError, match=r"cannot import .*broken\.py.*no_such_module_at_all"):
        load_function(f"{broken}:f", field="rewards.2.function")


def test_user_reward_runs_in_the_runner_with_timeouts_and_errors():
    from tests.fault_rewards import raise_sometimes

    runner = RewardRunner(["raises"], timeout_s=1.0, functions={"raises": raise_sometimes})
    scores = weighted(runner.score_texts([chr(65 + i) for i in range(8)], ["x"] * 8, [None] * 8), {"raises": 1.0})
    # sum(ord) % 4: 0/1 raise, 2 NaN, 3 -> 1.0; 'A'..'H' are 65..72 -> 1,2,3,0,1,2,3,0
    assert [s.value for s in scores] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert sum(s.errors.get("raises/exception", 0) for s in scores) == 6
    runner.close()


def test_a_job_with_a_broken_user_reward_fails_before_any_resource(tmp_path, monkeypatch):
    """The driver imports user rewards before it connects to Ray: the error names the field."""
    import ray

    from protege.cluster.driver import JobError, run
    from protege.core.spec import parse_spec

    f = tmp_path / "r.py"
    f.write_text("def ok(c, r, m=None):\n    return 0.0\n")
    spec = parse_spec(
        {
            "name": "j",
            "models": {"student": {"path": "HuggingFaceTB/none"}},
            "data": {"source": "reasoning_gym", "task": "basic_arithmetic", "size": 20, "eval_size": 0},
            "rewards": [{"name": "exact_match"}, {"name": "mine", "function": f"{f}:typo"}],
            "checkpoint": {"dir": str(tmp_path / "run")},
        }
    )
    monkeypatch.setattr("protege.cluster.driver._check_tokenizers", lambda spec: None)
    monkeypatch.setattr("protege.cluster.driver.Encoder", lambda *a, **k: None)
    with pytest.raises(JobError, match=r"rewards\.1\.function: .* has no callable named 'typo'"):
        run(spec, progress=False)
    assert not ray.is_initialized()


# ------------------------------------------------------------------ reward model
def test_reward_model_scorer_matches_a_plain_forward(tiny_models):
    """Batched, padded scoring equals scoring each conversation alone with transformers (the head
    reads the last real token, not a pad); truncation keeps the end; a multi-output head is refused."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from protege.rewards.reward_model import RewardModelScorer

    scorer = RewardModelScorer(tiny_models["reward"], batch_size=3)
    prompts = ["What is 2 + 3?", "What is 7 + 1?", "Add 4 and 4.", "What is 9 + 0?"]
    completions = ["<answer>5</answer>", "I think it is <answer>8</answer>, because seven and one make eight", "8", ""]
    got = scorer.values(prompts, completions)
    # The scorer contract: one record per rollout, the raw score as the component 'reward_model'.
    records = scorer.score(
        [rollout_of(c, i) for i, c in enumerate(completions)], [Example(prompt=p, answer="") for p in prompts]
    )
    assert [r.components for r in records] == [{"reward_model": v} for v in got]
    assert all(r.errors == {} and r.teacher is None for r in records)

    tok = AutoTokenizer.from_pretrained(tiny_models["reward"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"]).eval()
    want = []
    for p, c in zip(prompts, completions):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
        )
        with torch.no_grad():
            want.append(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item())
    assert len(set(round(w, 4) for w in want)) == 4  # the model does tell them apart
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4

    short = RewardModelScorer(tiny_models["reward"], max_length=8)
    ids = tok(short.render(prompts[1], completions[1]), add_special_tokens=False)["input_ids"][-8:]
    with torch.no_grad():
        tail = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert abs(short.values(prompts[1:2], completions[1:2])[0] - tail) < 1e-4

    with pytest.raises(ValueError, match="equal lengths"):
        scorer.values(["a"], [])
    with pytest.raises(ValueError, match="equal lengths"):
        scorer.score([rollout_of("a")], [])


def test_reward_model_with_two_outputs_is_refused(tiny_models, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from protege.rewards.reward_model import RewardModelScorer

    config = AutoConfig.from_pretrained(tiny_models["reward"], num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "cls2")
    AutoTokenizer.from_pretrained(tiny_models["reward"]).save_pretrained(tmp_path / "cls2")
    with pytest.raises(ValueError, match=r"models.reward_model: .* has 2 outputs"):
        RewardModelScorer(str(tmp_path / "cls2"))


def test_reward_model_spec_rules():
    from protege.core.spec import SpecError, parse_spec

    base = {
        "name": "j",
        "models": {"student": {"path": "s"}},
        "data": {"source": "reasoning_gym", "task": "basic_arithmetic"},
    }
    ok = parse_spec(
        {
            **base,
            "models": {"student": {"path": "s"}, "reward_model": {"path": "rm"}},
            "rewards": [{"name": "exact_match"}, {"name": "reward_model", "weight": 0.5}],
        }
    )
    assert [r.name for r in ok.rewards] == ["exact_match", "reward_model"]
    with pytest.raises(SpecError) as e:
        parse_spec({**base, "rewards": [{"name": "reward_model"}]})
    assert e.value.errors[0][0] == "models.reward_model"
    with pytest.raises(SpecError) as e:
        parse_spec(
            {
                **base,
                "models": {"student": {"path": "s"}, "reward_model": {"path": "rm"}},
                "rewards": [{"name": "exact_match"}],
            }
        )
    assert e.value.errors[0][0] == "rewards" and "reward_model" in e.value.errors[0][1]
