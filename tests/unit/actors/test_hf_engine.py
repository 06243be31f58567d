"""actors/engine.py::HFEngine: one left-padded generate call for the whole batch (the rollout
engine rollout.engine "auto" picks for very small students on CPU, and the teacher's fallback)."""

from __future__ import annotations

import torch


def test_batched_generate_matches_each_prompt_scored_alone(tiny_models):
    """Prompts of different lengths share one left-padded call: every sample's log-probs equal the
    model's own scoring of that prompt and response unpadded, groups come back in prompt order,
    a response stops at its end token, and an empty call answers empty."""
    from protege.actors.engine import HFEngine

    engine = HFEngine(tiny_models["student"])
    tok = engine.tokenizer
    prompts = [tok.encode("x" * k + "1+2=") for k in (0, 5, 17)]
    assert len({len(p) for p in prompts}) == 3
    eos = tok.eos_token_id
    groups = engine.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=12, seed=0, stop_token_ids=[eos])
    assert [len(g) for g in groups] == [2, 2, 2]
    for prompt, group in zip(prompts, groups):
        for s in group:
            assert 1 <= len(s.response_ids) <= 12 and len(s.logprobs) == len(s.response_ids)
            assert (s.finish_reason == "stop") == (s.response_ids[-1] == eos)
            assert eos not in s.response_ids[:-1]
            alone = engine.score(prompt, s.response_ids)
            assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(alone), atol=1e-4)
    again = engine.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=12, seed=0, stop_token_ids=[eos])
    assert [[s.response_ids for s in g] for g in again] == [[s.response_ids for s in g] for g in groups]
    assert engine.generate([], n=2, temperature=1.0, top_p=1.0, max_tokens=4) == []
