"""Algorithm variants through the real pipeline (Ray + vLLM + DeepSpeed, tiny models), a few steps each.

Each example spec is its algorithm's main pipeline test (tests/integration/test_examples_run.py);
this file holds the variants and properties no example covers."""

from __future__ import annotations

import json

import pytest

from protege.core.spec import parse_spec

pytestmark = pytest.mark.slow

TASK = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+"],
    "allow_negation": False,
    "allow_parentheses": False,
}


def spec_for(tmp_path, tiny, name, algorithm, *, teacher=True, steps=2, **over):
    d = {
        "name": name,
        "seed": 0,
        "steps": steps,
        "models": {"student": {"path": tiny["student"]}, **({"teacher": {"path": tiny["teacher"]}} if teacher else {})},
        "data": {
            "source": "reasoning_gym",
            "task": "basic_arithmetic",
            "task_config": TASK,
            "size": 100,
            "eval_size": 4,
        },
        "algorithm": algorithm,
        "rollout": {"samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 8},
        "learner": {"ranks": 1, "zero_stage": 2, "lr": 1e-3, "micro_batch": 8},
        "rewards": [{"name": "exact_match"}],
        "checkpoint": {"dir": str(tmp_path / name), "interval": 10},
        "eval": {"interval": 10, "size": 4},
    }
    d.update(over)
    return parse_spec(d)


def metrics(spec):
    return [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]


def run(spec):
    from protege.cluster.driver import run as drive

    summary = drive(spec, progress=False)
    assert summary["steps"] == spec.steps
    return metrics(spec)


def test_rlad_alpha_one_reproduces_grpo(tmp_path, tiny_models, ray_local):
    """α = 1 is plain GRPO (Eq. 3): same seed → the same rewards, losses and weights."""
    g = run(spec_for(tmp_path, tiny_models, "grpo", {"type": "grpo"}, teacher=False, steps=3))
    r = run(spec_for(tmp_path, tiny_models, "rlad1", {"type": "rlad", "alpha": 1.0}, steps=3))
    for a, b in zip(g[1:], r[1:]):
        for k in ("reward/mean", "loss/pg", "loss/total", "policy/entropy", "learner/grad_norm"):
            assert a[k] == b[k], k
    from safetensors.torch import load_file

    from protege.core import checkpoints

    wa = load_file(checkpoints.latest(tmp_path / "grpo") / "model" / "model.safetensors")
    wb = load_file(checkpoints.latest(tmp_path / "rlad1") / "model" / "model.safetensors")
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)


def test_kepo_topk_jsd(tmp_path, tiny_models, ray_local):
    m = run(
        spec_for(
            tmp_path,
            tiny_models,
            "kepojsd",
            {"type": "kepo", "divergence": "jsd", "top_k": 8, "hints": False, "gate_threshold": 0.0},
        )
    )
    assert m[1]["kepo/gate_open_frac"] == 1.0  # τ = 0 opens the gate for every response
    assert m[1]["kepo/distill"] > 0


def test_online_dpo_teacher_reference(tmp_path, tiny_models, ray_local):
    """reference: teacher (the initial reference runs as examples/dpo_online_tiny.yaml)."""
    m = run(
        spec_for(
            tmp_path,
            tiny_models,
            "dpo-teacher",
            {"type": "dpo", "mode": "online", "reference": "teacher"},
            rewards=[{"name": "exact_match"}, {"name": "format", "weight": 0.1}],
        )
    )
    assert "dpo/pairs" in m[1]


def test_offline_dpo_from_file(tmp_path, tiny_models, ray_local):
    # The rejected answer is the same refusal everywhere, so the preference generalises across
    # batches even for a tiny random model (a per-prompt off-by-one would not, at 3 steps).
    rows = [
        {"prompt": f"What is {a} + 1?", "chosen": f"<answer>{a + 1}</answer>", "rejected": "I do not know."}
        for a in range(12)
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = spec_for(
        tmp_path,
        tiny_models,
        "dpo-off",
        {"type": "dpo", "mode": "offline"},
        teacher=False,
        steps=3,
        data={"source": "file", "path": str(path), "eval_size": 2},
        eval={"interval": 10, "size": 2},
    )
    m = run(s)
    assert m[-1]["dpo/reward_margin"] > m[1]["dpo/reward_margin"]  # the student learns to prefer chosen


def test_sft_on_teacher_responses(tmp_path, tiny_models, ray_local):
    """targets: teacher (SFT on the data's answers runs as examples/sft_tiny.yaml)."""
    m = run(spec_for(tmp_path, tiny_models, "sft-t", {"type": "sft", "targets": "teacher"}))
    assert "sft/nll" in m[1]


def test_offline_distillation_from_the_teachers_top_k(tmp_path, tiny_models, ray_local):
    """The algorithm added to show the seams (core/spec.py DistillSpec, one case in each of
    learners/algorithms.py's functions, losses.distill_loss): no generation, no reward; the
    teacher scores the data's answers and the student moves towards its top-k."""
    m = run(
        spec_for(tmp_path, tiny_models, "distill", {"type": "distill", "top_k": 8, "divergence": "forward_kl"}, steps=4)
    )
    assert m[-1]["distill/forward_kl"] < m[1]["distill/forward_kl"]  # the student moves towards the teacher
    assert m[1]["teacher/bytes_per_token"] > 0 and "reward/mean" not in m[1]  # scored by the teacher only
    assert "time/generate" in m[1] and "rollout/tokens_per_s" not in m[1]  # nothing sampled from the student


def test_mismatched_teacher_tokenizer_is_refused(tmp_path, tiny_models):
    from protege.cluster.driver import JobError, run as drive
    from protege.core.models import build_tiny

    other = build_tiny(tmp_path / "other", vocab_size=600)
    s = spec_for(tmp_path, tiny_models, "mismatch", {"type": "rlad"})
    s.models.teacher.path = str(other["teacher"])
    with pytest.raises(JobError, match="must share a tokenizer"):
        drive(s, progress=False)


def test_rlad_with_a_reward_model(tmp_path, tiny_models, ray_local):
    """models.reward_model scores every rollout in its own actor, next to the rule rewards and the
    teacher; its score is the component 'reward_model', weighted into the reward as the spec says.
    (GRPO without a teacher runs it in tests/integration/test_examples_run.py.)"""
    from protege.rewards.reward_model import RewardModelScorer

    spec = spec_for(
        tmp_path,
        tiny_models,
        "rlad-rm",
        {"type": "rlad"},
        models={
            "student": {"path": tiny_models["student"]},
            "teacher": {"path": tiny_models["teacher"]},
            "reward_model": {"path": tiny_models["reward"]},
        },
        rewards=[{"name": "exact_match"}, {"name": "reward_model", "weight": 0.5}],
    )
    rows = run(spec)[1:]
    for r in rows:
        rm, em = r["reward/component/reward_model"], r["reward/component/exact_match"]
        assert rm != 0.0 and abs(r["reward/mean"] - (em + 0.5 * rm)) < 1e-5
    assert json.loads((spec.run_dir / "actors.json").read_text())["reward_model"] > 0
    # The logged samples carry the reward model's own score for that (question, response).
    samples = [json.loads(x) for x in (spec.run_dir / "samples.jsonl").read_text().splitlines()]
    scorer = RewardModelScorer(tiny_models["reward"])
    want = scorer.values([s["question"] for s in samples], [s["response"] for s in samples])
    for s, w in zip(samples, want):
        assert abs(s["components"]["reward_model"] - w) < 1e-4
        assert abs(s["reward"] - (s["components"]["exact_match"] + 0.5 * w)) < 1e-4
