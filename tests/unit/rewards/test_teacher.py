"""The teacher scorer's payload (tiny real teacher, in-process): sampled log-probs in the learner's
frame, top-k ids / values / tail and full rows as compact tensors, and the bytes and seconds its
records report (the scorer contract, core/records.py ScoreRecord). vLLM's scoring against the
transformers forward is in tests/integration/test_teacher.py."""

from __future__ import annotations

import math

import pytest
import torch

from protege.cluster.scoring import assemble
from protege.core.data import Example
from protege.core.records import Rollout, Sample, TeacherScores
from protege.rewards.teacher import PAYLOAD_DTYPE, TeacherScorer


def as_rollouts(items):
    """(prompt ids, response ids) pairs as the rollouts (and their examples) the contract takes."""
    rollouts = [
        Rollout(example_index=i, prompt_ids=p, sample=Sample(r, [0.0] * len(r), "", "stop"), policy_version=0)
        for i, (p, r) in enumerate(items)
    ]
    return rollouts, [Example(prompt="", answer="") for _ in items]


def payloads(scorer, items):
    return [rec.teacher for rec in scorer.score(*as_rollouts(items))]


def _direct_rows(model, prompt, resp):
    ids = torch.tensor([prompt + resp])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(resp)]
    return logits.float().log_softmax(-1)


def test_teacher_payload_matches_a_direct_forward(tiny_models):
    scorer = TeacherScorer(tiny_models["teacher"], engine="hf", top_k=8, full=True)
    items = [([5, 17, 42, 9], [33, 7, 250, 11, 3]), ([8, 8, 1], [99, 100])]
    records = scorer.score(*as_rollouts(items))
    assert all(r.components == {} and r.errors == {} and r.seconds > 0 for r in records)
    out = assemble({"teacher": records}, {}, len(items), tokens=7)  # what the driver reads
    assert out.teacher == [r.teacher for r in records]
    assert out.metrics["teacher/seconds"] == sum(r.seconds for r in records)
    for (prompt, resp), ts in zip(items, out.teacher, strict=True):
        rows = _direct_rows(scorer.model, prompt, resp)
        want = rows.gather(-1, torch.tensor(resp)[:, None])[:, 0]
        assert isinstance(ts, TeacherScores) and ts.logprobs.dtype == torch.float32
        assert torch.allclose(ts.logprobs, want, atol=1e-5)
        assert ts.topk_ids.dtype == torch.int32 and ts.topk_logprobs.dtype == PAYLOAD_DTYPE
        assert ts.topk_ids.shape == (len(resp), 8) and ts.full_logprobs.shape == rows.shape
        top = rows.topk(8, dim=-1)
        assert torch.allclose(ts.topk_logprobs.float(), top.values, atol=1e-2)
        assert torch.equal(rows.gather(-1, ts.topk_ids.long()), top.values)  # the ids are the top-k
        mass = top.values.exp().sum(-1)
        assert torch.allclose(ts.tail_logprobs, torch.log1p(-mass), atol=1e-5)
        assert torch.allclose(ts.full_logprobs.float(), rows, atol=2e-2)
    per_token = 4 + 8 * (4 + 2) + 4 + rows.shape[-1] * 2  # sampled f32, ids i32 + values f16, tail f32, row f16
    assert sum(ts.nbytes() for ts in out.teacher) == per_token * 7
    assert out.metrics["teacher/bytes_per_token"] == per_token
    # Without a dense request the payload is one float32 per token.
    sampled = TeacherScorer(tiny_models["teacher"], engine="hf")
    assert sum(ts.nbytes() for ts in payloads(sampled, items)) == 4 * 7
    with pytest.raises(ValueError, match="equal lengths"):
        scorer.score(as_rollouts(items)[0], [])


def test_teacher_logprobs_line_up_with_the_learners_frame(tiny_models):
    """The same weights scored by the teacher scorer and by the learner's own forward give the
    same sampled-token log-probs, token for token (so log π_θ − log π_T compares like with like)."""
    from protege.core import spec as S
    from protege.learners.learner import Learner

    scorer = TeacherScorer(tiny_models["teacher"], engine="hf")
    ln = Learner(
        rank=0,
        world_size=1,
        model_path=tiny_models["teacher"],
        learner_spec=S.LearnerSpec(),
        algo=S.GRPOSpec(),
        temperature=1.0,
        grad_accum=1,
    )
    ln.attach(scorer.model, device="cpu", pad_id=scorer.pad_id)
    prompt, resp = [5, 17, 42, 9, 100], [33, 7, 250, 11]
    ours = ln.logprobs(prompt, resp)
    theirs = payloads(scorer, [(prompt, resp)])[0].logprobs.tolist()
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-5
    assert all(math.isfinite(x) for x in ours)


def test_auto_score_engine_follows_the_spec():
    from protege.core.spec import parse_spec

    base = {
        "models": {"student": {"path": "s"}, "teacher": {"path": "t"}},
        "data": {"task": "basic_arithmetic"},
        "algorithm": {"type": "opd"},
        "rollout": {"temperature": 1.0},
    }
    assert parse_spec(base).teacher_score_engine() == "vllm"
    assert parse_spec({**base, "rollout": {"temperature": 0.7}}).teacher_score_engine() == "hf"
    assert parse_spec({**base, "algorithm": {"type": "opd", "estimator": "full"}}).teacher_score_engine() == "hf"
    hf = {**base, "models": {"student": {"path": "s"}, "teacher": {"path": "t", "score_engine": "hf"}}}
    assert parse_spec(hf).teacher_score_engine() == "hf"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_dpo_teacher_reference_is_at_the_sampling_temperature(tiny_models, temperature):
    """The learner reads π_θ and the initial reference at rollout.temperature; a teacher reference
    must be at the same temperature, or DPO's log-ratio mixes two distributions."""
    scorer = TeacherScorer(tiny_models["teacher"], engine="hf", temperature=temperature)
    prompt, resp = [5, 17, 42, 9], [33, 7, 250, 11, 3]
    ids = torch.tensor([prompt + resp])
    with torch.no_grad():
        logits = scorer.model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(resp)]
    want = (logits.float() / temperature).log_softmax(-1).gather(-1, torch.tensor(resp)[:, None]).sum()
    (got,) = scorer.sequence_logprobs([(prompt, resp)])
    assert math.isclose(got, float(want), rel_tol=1e-5, abs_tol=1e-5)
