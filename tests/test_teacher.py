"""The teacher scorer's payload (tiny real teacher, in-process): sampled log-probs in the learner's
frame, top-k ids / values / tail and full rows as compact tensors, and the bytes it reports."""

from __future__ import annotations

import math

import torch

from protege.cluster.records import TeacherScores
from protege.rewards.teacher import PAYLOAD_DTYPE, TeacherScorer


def _direct_rows(model, prompt, resp):
    ids = torch.tensor([prompt + resp])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(resp)]
    return logits.float().log_softmax(-1)


def test_teacher_payload_matches_a_direct_forward(tiny_models):
    scorer = TeacherScorer(tiny_models["teacher"], engine="hf")
    items = [([5, 17, 42, 9], [33, 7, 250, 11, 3]), ([8, 8, 1], [99, 100])]
    out = scorer.score(items, top_k=8, full=True)
    assert out["tokens"] == 7
    for (prompt, resp), ts in zip(items, out["scores"]):
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
    assert out["bytes"] == per_token * 7
    # Without a dense request the payload is one float32 per token.
    assert scorer.score(items)["bytes"] == 4 * 7


def test_teacher_logprobs_line_up_with_the_learners_frame(tiny_models):
    """The same weights scored by the teacher scorer and by the learner's own forward give the
    same sampled-token log-probs, token for token (so log π_θ − log π_T compares like with like)."""
    from protege.cluster import spec as S
    from protege.learners.learner import Learner

    scorer = TeacherScorer(tiny_models["teacher"], engine="hf")
    ln = Learner(rank=0, world_size=1, model_path=tiny_models["teacher"], learner_spec=S.LearnerSpec(),
                 algo=S.GRPOSpec(), temperature=1.0, grad_accum=1)
    ln.attach(scorer.model, device="cpu", pad_id=scorer.pad_id)
    prompt, resp = [5, 17, 42, 9, 100], [33, 7, 250, 11]
    ours = ln.logprobs(prompt, resp)
    theirs = scorer.score([(prompt, resp)])["scores"][0].logprobs.tolist()
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-5
    assert all(math.isfinite(x) for x in ours)
