"""JobSpec: examples validate, bad specs fail with field paths, cross-field rules hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from protege.core.spec import JobSpec, SpecError, load_spec, parse_spec

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _minimal(**over):
    d = {"models": {"student": {"path": "s"}}, "data": {"source": "reasoning_gym", "task": "chain_sum"}}
    d.update(over)
    return d


def test_examples_exist_for_every_algorithm():
    types = {load_spec(p).algorithm.type for p in (ROOT / "examples").rglob("*.yaml")}
    assert {"grpo", "dpo", "kepo", "rlad", "opd", "sft", "distill"} <= types


@pytest.mark.parametrize("path", [p for p in (ROOT / "examples").rglob("*.yaml")], ids=lambda p: p.name)
def test_every_example_validates(path):
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)


def test_defaults_follow_algorithms_md():
    s = parse_spec(_minimal(algorithm={"type": "rlad"}, models={"student": {"path": "s"}, "teacher": {"path": "t"}}))
    assert (s.algorithm.alpha, s.algorithm.clamp, s.algorithm.eps_low, s.algorithm.eps_high) == (0.5, 1.0, 0.2, 0.28)
    d = parse_spec(_minimal(algorithm={"type": "dpo"}))
    assert d.algorithm.beta == 0.1
    g = parse_spec(_minimal())
    assert g.algorithm.type == "grpo" and g.algorithm.kl_coef == 0.0 and g.algorithm.kl_estimator == "k3"


def test_cpu_threads_auto_or_a_positive_count_and_overlap_follows_staleness():
    s = parse_spec(_minimal())
    assert s.rollout.cpu_threads == "auto" and not s.rollout_overlaps_training()
    assert s.learner.cpu_threads == "auto"
    s = parse_spec(
        _minimal(rollout={"cpu_threads": 2}, learner={"cpu_threads": 3}, algorithm={"type": "grpo", "max_staleness": 1})
    )
    assert s.rollout.cpu_threads == 2 and s.learner.cpu_threads == 3 and s.rollout_overlaps_training()
    assert not parse_spec(_minimal(algorithm={"type": "sft"})).rollout_overlaps_training()
    for role in ("rollout", "learner"):
        for bad in (0, "many"):
            with pytest.raises(SpecError) as e:
                parse_spec(_minimal(**{role: {"cpu_threads": bad}}))
            assert [loc for loc, _ in e.value.errors] == [f"{role}.cpu_threads"], e.value.errors


def test_errors_name_every_field():
    bad = _minimal(algorithm={"type": "rlad", "alpha": 2}, learner={"lr": -1, "zero": 3})
    with pytest.raises(SpecError) as e:
        parse_spec(bad)
    locs = dict(e.value.errors)
    assert locs["algorithm.alpha"] == "must be between 0 and 1"
    assert "learner.lr" in locs and locs["learner.zero"] == "unknown field"


@pytest.mark.parametrize("algo", ["rlad", "kepo", "opd"])
def test_teacher_algorithms_need_a_teacher(algo):
    with pytest.raises(SpecError) as e:
        parse_spec(_minimal(algorithm={"type": algo}))
    assert e.value.errors == [("models.teacher", f"algorithm '{algo}' needs a teacher model")]


def test_cross_field_rules():
    with pytest.raises(SpecError) as e:
        parse_spec(_minimal(rollout={"samples_per_prompt": 1}))
    assert e.value.errors[0][0] == "rollout.samples_per_prompt"
    with pytest.raises(SpecError, match="offline dpo"):
        parse_spec(_minimal(algorithm={"type": "dpo", "mode": "offline"}))
    with pytest.raises(SpecError, match="data.task: source 'reasoning_gym' needs a task name"):
        parse_spec({"models": {"student": {"path": "s"}}, "data": {"source": "reasoning_gym"}})
    with pytest.raises(SpecError, match="serve.autoscale.max_replicas: must be at least min_replicas"):
        parse_spec(_minimal(serve={"autoscale": {"min_replicas": 3, "max_replicas": 1}}))


def test_unknown_algorithm_type_is_a_field_error():
    with pytest.raises(SpecError) as e:
        parse_spec(_minimal(algorithm={"type": "ppo"}))
    assert e.value.errors[0][0] == "algorithm"


def test_json_and_yaml_load_the_same(tmp_path):
    data = _minimal(steps=3)
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    assert load_spec(tmp_path / "a.json") == load_spec(tmp_path / "a.yaml")


def test_broken_yaml_reports_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("models: {student: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "protege.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_validate_ok_and_bad(tmp_path):
    ok = _cli("validate", "examples/grpo_tiny.yaml")
    assert ok.returncode == 0 and "algorithm:" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_minimal(algorithm={"type": "rlad", "alpha": 1.5}, steps=0)))
    r = _cli("validate", str(bad))
    assert r.returncode == 2
    assert "algorithm.alpha: must be between 0 and 1" in r.stderr
    assert "steps:" in r.stderr


def test_cli_set_override_is_revalidated():
    r = _cli("validate", "examples/grpo_tiny.yaml", "--set", "rollout.temperature=5")
    assert r.returncode == 2 and "rollout.temperature" in r.stderr
    r = _cli("validate", "examples/grpo_tiny.yaml", "--set", "steps=7", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["steps"] == 7


def test_cli_help_explains():
    r = _cli("--help")
    assert r.returncode == 0 and "validate" in r.stdout and "models" in r.stdout


# ------------------------------------------------------------------ defaults that follow the user
# A field the user did not write takes its value from the ones they did; an explicit conflict is
# still an error naming the field they wrote.
def test_eval_size_follows_data_eval_size():
    s = parse_spec(_minimal(data={"task": "chain_sum", "eval_size": 4}))
    assert s.eval.size == 4 and "size" not in s.eval.model_fields_set
    assert parse_spec(_minimal(data={"task": "chain_sum", "eval_size": 100})).eval.size == 32  # min with its default
    assert parse_spec(_minimal(data={"task": "chain_sum", "eval_size": 0})).eval.size == 32  # no eval: unused
    with pytest.raises(SpecError) as e:
        parse_spec(_minimal(data={"task": "chain_sum", "eval_size": 4}, eval={"size": 8}))
    assert e.value.errors[0][0] == "eval.size" and "cannot exceed data.eval_size (4)" in e.value.errors[0][1]


def test_data_eval_size_follows_size_and_eval_size():
    s = parse_spec(_minimal(data={"task": "chain_sum", "size": 16}))
    assert (s.data.eval_size, s.eval.size) == (8, 8)  # at most half of a small generated set
    assert parse_spec(_minimal(data={"task": "chain_sum", "size": 1})).data.eval_size == 0
    s = parse_spec(_minimal(eval={"size": 64}))
    assert (s.data.eval_size, s.eval.size) == (64, 64)  # hold out what will be evaluated
    with pytest.raises(SpecError) as e:
        parse_spec(_minimal(data={"task": "chain_sum", "size": 16, "eval_size": 16}))
    assert e.value.errors == [("data.eval_size", "must be smaller than size (16)")]
    with pytest.raises(SpecError) as e:  # eval.size as written cannot fit: it is what the user must change
        parse_spec(_minimal(data={"task": "chain_sum", "size": 16}, eval={"size": 20}))
    assert e.value.errors[0][0] == "eval.size"


def test_data_source_follows_path():
    s = parse_spec({"models": {"student": {"path": "s"}}, "data": {"path": "rows.jsonl"}})
    assert s.data.source == "file" and [r.name for r in s.rewards] == ["exact_match"]
    with pytest.raises(SpecError, match="data.task: source 'reasoning_gym' needs a task name"):
        parse_spec({"models": {"student": {"path": "s"}}, "data": {"source": "reasoning_gym", "path": "rows.jsonl"}})


def test_rewards_follow_data_and_reward_model():
    file_data = {"source": "file", "path": "rows.jsonl"}
    assert [r.name for r in parse_spec(_minimal(data=file_data)).rewards] == ["exact_match"]
    s = parse_spec(_minimal(models={"student": {"path": "s"}, "reward_model": {"path": "r"}}))
    assert [r.name for r in s.rewards] == ["reasoning_gym", "reward_model"]
    with pytest.raises(SpecError) as e:  # written rewards are taken as written
        parse_spec(_minimal(data=file_data, rewards=[{"name": "reasoning_gym"}]))
    assert e.value.errors[0][0] == "rewards"
    with pytest.raises(SpecError, match="no reward uses it"):
        parse_spec(
            _minimal(
                models={"student": {"path": "s"}, "reward_model": {"path": "r"}}, rewards=[{"name": "exact_match"}]
            )
        )


def test_max_replicas_follows_min_replicas():
    s = parse_spec(_minimal(serve={"autoscale": {"min_replicas": 3}}))
    assert (s.serve.autoscale.min_replicas, s.serve.autoscale.max_replicas) == (3, 3)
    assert parse_spec(_minimal()).serve.autoscale.max_replicas == 2


def test_derived_fields_stay_unwritten_and_round_trip():
    s = parse_spec(_minimal(data={"task": "chain_sum", "eval_size": 4}))
    assert s.model_dump(exclude_unset=True) == _minimal(data={"task": "chain_sum", "eval_size": 4})
    assert parse_spec(json.loads(s.model_dump_json())) == s  # what we print loads back


def test_cli_set_derives_again(tmp_path):
    """--set re-validates what the user wrote, so an unset field follows the new value."""
    from protege.spec_args import _apply_overrides

    s = parse_spec(_minimal(data={"task": "chain_sum", "eval_size": 4}))
    assert _apply_overrides(s, ["data.eval_size=8"]).eval.size == 8
    assert _apply_overrides(s, ["data.size=6"]).data.eval_size == 4  # written: kept (4 < 6)
    t = parse_spec(_minimal(data={"task": "chain_sum"}))
    assert _apply_overrides(t, ["data.size=10"]).data.eval_size == 5


def test_fit_data_follows_a_small_file():
    s = parse_spec(_minimal(data={"source": "file", "path": "rows.jsonl"}))
    s.fit_data(10)
    assert (s.data.eval_size, s.eval.size) == (5, 5)
    assert parse_spec(json.loads(s.model_dump_json())) == s
    t = parse_spec(_minimal(data={"source": "file", "path": "rows.jsonl", "eval_size": 9}))
    t.fit_data(10)
    assert t.data.eval_size == 9  # written: kept (the pre-flight check says whether it fits)
    assert t.data.held_out(10) == 9 and s.data.held_out(4) == 2


def test_max_model_len_covers_kepo_hints():
    assert parse_spec(_minimal(rollout={"max_new_tokens": 16, "max_prompt_tokens": 100})).max_model_len == 180
    kepo = _minimal(
        algorithm={"type": "kepo", "hint_max_tokens": 50},
        rollout={"max_new_tokens": 16},
        models={"student": {"path": "s"}, "teacher": {"path": "t"}},
    )
    assert parse_spec(kepo).max_model_len == 256 + 50 + 64


def test_algorithms_declare_what_they_need():
    """The declarations the driver, launcher, learner and data loading read instead of names."""
    from protege.core.spec import DistillSpec, DPOSpec, GRPOSpec, KEPOSpec, OPDSpec, RLADSpec, SFTSpec

    assert GRPOSpec().needs().generates and GRPOSpec().needs().groups and not GRPOSpec().needs().reference
    assert GRPOSpec(kl_coef=0.1).needs().reference
    assert RLADSpec().needs().teacher.top_k == 0 and RLADSpec().needs().teacher_model
    kepo = KEPOSpec(hint_max_tokens=48).needs()
    assert kepo.hints and kepo.extra_tokens == 48 and KEPOSpec(hints=False).needs().extra_tokens == 0
    assert OPDSpec(estimator="topk", top_k=8).needs().teacher.top_k == 8 and not OPDSpec().needs().rewards
    off = DPOSpec(mode="offline").needs()
    assert off.responses == "preferences" and off.pairs and not off.generates and off.reference
    assert DPOSpec(reference="teacher").needs().teacher_reference and not DPOSpec(reference="teacher").needs().reference
    assert SFTSpec().needs().responses == "answers" and SFTSpec(targets="teacher").needs().responses == "teacher"
    d = DistillSpec().needs()
    assert (d.responses, d.rewards, d.teacher.top_k, d.teacher_model) == ("answers", False, 32, True)
    assert DistillSpec(estimator="full").needs().teacher.full


def test_offline_distillation_spec():
    with pytest.raises(SpecError) as e:
        parse_spec(_minimal(algorithm={"type": "distill"}))
    assert e.value.errors == [("models.teacher", "algorithm 'distill' needs a teacher model")]
    s = parse_spec(
        _minimal(
            algorithm={"type": "distill", "top_k": 8},
            rewards=[],
            models={"student": {"path": "s"}, "teacher": {"path": "t"}},
        )
    )
    assert s.rows_per_step() == s.rollout.prompts_per_step and s.teacher_request().top_k == 8
    with pytest.raises(SpecError, match="algorithm.estimator"):
        parse_spec(_minimal(algorithm={"type": "distill", "estimator": "sampled"}))


def test_rollout_compile_auto_compiles_gpu_rollouts_only():
    base = _minimal()
    cpu = parse_spec({**base, "steps": 1000})
    gpu = parse_spec({**base, "steps": 2, "resources": {"rollout": {"gpus": 1}}})
    assert cpu.rollout.compile == "auto" and not cpu.rollout_compiled() and gpu.rollout_compiled()
    assert not parse_spec(
        {**base, "rollout": {"compile": "eager"}, "resources": {"rollout": {"gpus": 1}}}
    ).rollout_compiled()
    assert parse_spec({**base, "steps": 2, "rollout": {"compile": "compiled"}}).rollout_compiled()


def _decoder_config(folder: Path, *, hidden: int, layers: int, vocab: int) -> str:
    folder.mkdir()
    cfg = {"hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": 2 * hidden}
    (folder / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 2, "tie_word_embeddings": True}))
    return str(folder)


def test_rollout_engine_auto_picks_by_student_size_and_device(monkeypatch, tmp_path):
    import importlib.util

    from protege.core.models import approx_parameters
    from protege.core.spec import HF_ROLLOUT_BELOW_PARAMS

    # hand-worked: embeddings 512*64 (tied), per layer q,o 2*64*64 + k,v 2*64*64 + MLP 3*64*128 = 40960
    assert (
        approx_parameters(
            {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "vocab_size": 512,
                "intermediate_size": 128,
                "num_attention_heads": 2,
            }
        )
        == 512 * 64 + 2 * 40960
    )
    assert approx_parameters({"model_type": "unknown"}) is None
    small = _decoder_config(tmp_path / "small", hidden=64, layers=2, vocab=512)
    large = _decoder_config(tmp_path / "large", hidden=512, layers=8, vocab=32000)
    assert approx_parameters(json.loads(Path(large, "config.json").read_text())) >= HF_ROLLOUT_BELOW_PARAMS

    def engine(path: str, **over) -> str:
        return parse_spec(
            {**_minimal(rollout={"engine": "auto"}), "models": {"student": {"path": path}}, **over}
        ).rollout.engine

    if importlib.util.find_spec("vllm"):
        assert engine(small) == "hf"  # vLLM's per-step overhead loses at this size on CPU
        assert engine(large) == "vllm"
        assert engine(small, resources={"rollout": {"gpus": 1}}) == "vllm"
        assert engine("org/not-in-the-cache") == "vllm"  # size unknown where parsed: the default engine
    assert (
        parse_spec(_minimal(rollout={"engine": "vllm"}, models={"student": {"path": small}})).rollout.engine == "vllm"
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert engine(large) == "hf"  # no vLLM build


def test_prompt_template_must_place_the_question():
    with pytest.raises(SpecError, match=r"data.prompt_template: .*must contain '\{question\}'"):
        parse_spec(_minimal(data={"source": "reasoning_gym", "task": "chain_sum", "prompt_template": "Answer:"}))
    spec = parse_spec(_minimal(data={"source": "reasoning_gym", "task": "chain_sum", "prompt_template": "{question}"}))
    assert spec.data.prompt_template == "{question}"


def test_response_field_needs_a_file():
    with pytest.raises(SpecError, match=r"data.response_field: only a file's rows"):
        parse_spec(_minimal(data={"source": "reasoning_gym", "task": "chain_sum", "response_field": "trace"}))
    spec = parse_spec(_minimal(data={"path": "rows.jsonl", "response_field": "trace"}))
    assert spec.data.response_field == "trace"
