"""core/logprobs.py, the response log-prob gather learner and teacher share, against a direct
computation: row by row, position by position, with Python loops over the packed frame."""

from __future__ import annotations

import math

import torch

from protege.core.logprobs import entropy, logprobs_at, pack, response_logprobs, tail_logprob, topk_logprobs

ITEMS = [([5, 6, 7], [1, 2, 3, 4]), ([9], [8, 0]), ([3, 3], [])]  # the last one has no response


def test_pack_frame():
    b = pack(ITEMS, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 2, 3, 4], [9, 8, 0, 0, 0, 0, 0], [3, 3, 0, 0, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]]
    # logits at j predict token j + 1: response token t of a prompt of length P is read at P − 1 + t
    assert b["resp_pos"].tolist() == [[2, 3, 4, 5], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert b["targets"].tolist() == [[1, 2, 3, 4], [8, 0, 0, 0], [0, 0, 0, 0]]


def test_response_logprobs_match_a_direct_computation():
    torch.manual_seed(0)
    b = pack(ITEMS, pad_id=0)
    V, temperature = 11, 0.7
    logits = torch.randn(len(ITEMS), b["input_ids"].shape[1], V, dtype=torch.bfloat16)
    lp, rows = response_logprobs(logits, b["resp_pos"], b["targets"], temperature)
    assert lp.dtype == rows.dtype == torch.float32 and rows.shape == (3, 4, V)
    for i, (prompt, resp) in enumerate(ITEMS):
        for t, token in enumerate(resp):
            z = [float(x) / temperature for x in logits[i, len(prompt) - 1 + t]]
            lse = math.log(sum(math.exp(v) for v in z))
            assert abs(float(lp[i, t]) - (z[token] - lse)) < 1e-5
            assert max(abs(float(rows[i, t, v]) - (z[v] - lse)) for v in range(V)) < 1e-5
    # temperature 1 is the plain log-softmax of the position before each response token
    lp1, _ = response_logprobs(logits, b["resp_pos"], b["targets"])
    direct = logits[0, 2:6].float().log_softmax(-1).gather(-1, torch.tensor([[1], [2], [3], [4]]))[:, 0]
    assert torch.allclose(lp1[0], direct, atol=1e-6)


def test_gradients_flow_through_the_gather():
    b = pack(ITEMS[:1], pad_id=0)
    logits = torch.randn(1, 7, 5, requires_grad=True)
    lp, _ = response_logprobs(logits, b["resp_pos"], b["targets"])
    lp.sum().backward()
    assert logits.grad[0, 6].abs().sum() == 0  # the last position predicts nothing
    assert logits.grad[0, 2:6].abs().sum() > 0 and logits.grad[0, :2].abs().sum() == 0  # prompt-only positions


def test_topk_tail_entropy_and_ids_by_hand():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logp = p.log()[None]  # one row
    vals, ids, tail = topk_logprobs(logp, 2)
    assert ids.tolist() == [[0, 1]] and torch.allclose(vals.exp(), torch.tensor([[0.5, 0.25]]))
    assert torch.allclose(tail.exp(), torch.tensor([0.25]))  # mass outside the top 2
    whole = float(tail_logprob(p.log()))  # all the mass inside: clamped to log(1 − e^−1e-6), tiny but finite
    assert math.isfinite(whole) and abs(whole - math.log(1e-6)) < 1e-3
    assert topk_logprobs(logp, 10)[1].shape == (1, 4)  # k is capped at the row size
    want = -sum(q * math.log(q) for q in p.tolist())  # 1.75 bits, in nats
    assert abs(float(entropy(logp)[0]) - want) < 1e-6
    assert torch.allclose(logprobs_at(logp[None], torch.tensor([[[3, 0]]])), p[[3, 0]].log()[None, None])
