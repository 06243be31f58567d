"""The teacher scorer through vLLM (CPU build, float32) against the transformers forward. The
payload checks on the HF engine are in tests/unit/rewards/test_teacher.py."""

from __future__ import annotations

import pytest
import torch

from protege.core.data import Example
from protege.core.records import Rollout, Sample
from protege.rewards.teacher import TeacherScorer


def as_rollouts(items):
    """(prompt ids, response ids) pairs as the rollouts (and their examples) the contract takes."""
    rollouts = [
        Rollout(example_index=i, prompt_ids=p, sample=Sample(r, [0.0] * len(r), "", "stop"), policy_version=0)
        for i, (p, r) in enumerate(items)
    ]
    return rollouts, [Example(prompt="", answer="") for _ in items]


def payloads(scorer, items):
    return [rec.teacher for rec in scorer.score(*as_rollouts(items))]


@pytest.mark.slow
def test_vllm_scoring_matches_the_transformers_forward(tiny_models):
    """The teacher scored through vLLM's prompt log-probs (batched prefills, no decoding) gives the
    same sampled-token log-probs, the same top-k ids and values and the same tail as the HF
    forward (float32, CPU vLLM); full rows and temperatures other than 1 fall back to HF."""
    vllm_scorer = TeacherScorer(
        tiny_models["teacher"], engine="vllm", score_engine="vllm", max_logprobs=8, kv_cache_bytes=64 << 20, top_k=8
    )
    hf_scorer = TeacherScorer(tiny_models["teacher"], engine="hf", top_k=8)
    items = [([5, 17, 42, 9], [33, 7, 250, 11, 3]), ([8, 8, 1], [99, 100]), ([4, 4, 4, 4, 4, 4], [12])]
    try:
        assert vllm_scorer.scores_with_vllm(vllm_scorer.full) and not hf_scorer.scores_with_vllm(hf_scorer.full)
        got = payloads(vllm_scorer, items)
        want = payloads(hf_scorer, items)
        assert vllm_scorer._generator is not None and vllm_scorer._model is None  # scored by vLLM alone
        assert hf_scorer._generator is None  # the transformers forward, no engine started
        assert sum(a.nbytes() for a in got) == sum(b.nbytes() for b in want)
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a.logprobs, b.logprobs, atol=1e-4)
            assert torch.equal(a.topk_ids, b.topk_ids)
            assert torch.allclose(a.topk_logprobs.float(), b.topk_logprobs.float(), atol=2e-3)
            assert torch.allclose(a.tail_logprobs, b.tail_logprobs, atol=1e-3)
        # Full rows fall back to the transformers forward (same engine settings, full: true).
        full = TeacherScorer(
            tiny_models["teacher"],
            engine="vllm",
            score_engine="vllm",
            max_logprobs=8,
            kv_cache_bytes=64 << 20,
            full=True,
        )
        assert not full.scores_with_vllm(full.full)
        assert payloads(full, items)[0].full_logprobs is not None and full._generator is None
    finally:
        vllm_scorer._generator.close()


def test_teacher_replicas_answer_each_call_as_one_teacher(tiny_models, ray_local):
    """resources.teacher.replicas: a pool of teacher actors splits every call into contiguous
    chunks and returns the results in order, equal to one teacher's (scores, DPO reference
    log-probs, greedy generations); its pid is every replica's, so a restart shows."""
    import ray

    from protege.cluster.launch import TeacherActor
    from protege.cluster.launch import ReplicaPool

    one = TeacherScorer(tiny_models["teacher"], engine="hf", top_k=8)
    pool = ReplicaPool(
        [TeacherActor.options(num_cpus=0).remote(tiny_models["teacher"], engine="hf", top_k=8) for _ in range(2)]
    )
    items = [([5, 17, 42, 9], [33, 7, 250, 11, 3]), ([8, 8, 1], [99, 100]), ([4, 4, 4, 4, 4, 4], [12])]
    try:
        got = [r.teacher for r in ray.get(pool.score.remote(*as_rollouts(items)))]
        for a, b in zip(got, payloads(one, items), strict=True):
            assert torch.equal(a.topk_ids, b.topk_ids)
            assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
            assert torch.allclose(a.topk_logprobs.float(), b.topk_logprobs.float(), atol=1e-5)
        assert ray.get(pool.sequence_logprobs.remote(items)) == pytest.approx(one.sequence_logprobs(items), abs=1e-4)
        prompts = [p for p, _ in items]
        assert ray.get(pool.generate.remote(prompts, n=1, max_tokens=4)) == one.generate(prompts, n=1, max_tokens=4)
        assert ray.get(pool.generate_ids.remote([], max_tokens=4)) == []  # an empty call still answers
        pids = ray.get(pool.pid.remote())
        assert len(set(pids)) == 2
    finally:
        for a in pool.actors:
            ray.kill(a)
