"""core/logprobs.py, the response log-prob gather learner and teacher share, against a direct
computation: row by row, position by position, with Python loops over the packed frame."""

from __future__ import annotations

import math

import pytest
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


def _hf_lm(kind: str, dtype):
    """A random-init one-layer causal LM from its config (no download): Qwen2 with tied or untied
    embeddings, Gemma-2 with its logit soft-capping after the head."""
    import transformers as tf

    common = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
    )
    if kind == "gemma2":
        cfg = tf.Gemma2Config(final_logit_softcapping=5.0, **common)
    else:
        cfg = tf.Qwen2Config(tie_word_embeddings=kind == "tied", **common)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).to(dtype)


def _both_paths(model, b, ids, temperature):
    """(values, gradients) of today's logits path and of the chunked path on the same model."""
    from protege.core.logprobs import chunked_response_logprobs, hidden_and_head

    results = []
    for chunked in (False, True):
        model.zero_grad()
        if chunked:
            hidden, head = hidden_and_head(model, b["input_ids"], b["attention_mask"])
            lp, ent, topk, full = chunked_response_logprobs(
                hidden, head, b["resp_pos"], b["targets"], temperature, chunk=3, topk_ids=ids, full=True
            )
        else:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            lp, full = response_logprobs(logits, b["resp_pos"], b["targets"], temperature)
            ent, topk = entropy(full), logprobs_at(full, ids)
        w = torch.linspace(0.5, 1.5, full.shape[-1], dtype=full.dtype)
        (lp.sum() + 0.3 * topk.sum() + (full.exp() * w).sum() + 0.1 * ent.sum()).backward()
        results.append(([lp, ent, topk, full], [p.grad.clone() for p in model.parameters()]))
    return results


@pytest.mark.parametrize("kind", ["tied", "untied"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_logprobs_equal_the_logits_path_in_values_and_gradients(kind, dtype):
    """Sampled log-probs, entropy, top-k and full rows, and the gradients of every parameter
    (the tied embedding gets both its input and its head gradient), through a Hugging Face
    Qwen2 with the head applied 3 positions at a time under checkpointing: equal to 1e-6."""
    model = _hf_lm(kind, dtype)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (kind == "tied")
    b = pack([([5, 6, 7], [1, 2, 3, 4, 9]), ([9], [8, 10]), ([3, 3], [])], pad_id=0)
    ids = torch.randint(0, 64, (*b["targets"].shape, 4), generator=torch.Generator().manual_seed(1))
    (va, ga), (vb, gb) = _both_paths(model, b, ids, temperature=0.7)
    for x, y in zip(va, vb):
        assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-6, atol=1e-6), (x - y).abs().max()
    # Gradients are sums over positions taken in another order (3 at a time): in float32 that order
    # alone moves a small entry by ~1e-6 of the tensor's largest one (seen on CI), so float32 gets
    # 1e-5 of the largest entry; float64 keeps 1e-6. A wrong path is off by the entry's own size.
    scale = 1e-6 if dtype == torch.float64 else 1e-5
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-6, atol=scale * float(x.abs().max())), (x - y).abs().max()
    assert all(g.abs().sum() > 0 for g in ga)


def test_chunked_logprobs_refuse_a_model_that_transforms_its_logits():
    """Gemma-2 soft-caps the logits after the head: lm_head(hidden) is not its distribution, and
    the first call says so instead of training on the wrong log-probs."""
    from protege.core.logprobs import hidden_and_head

    model = _hf_lm("gemma2", torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)  # logits well beyond the cap
    b = pack(ITEMS, pad_id=0)
    with pytest.raises(ValueError, match="logprob_chunk"):
        hidden_and_head(model, b["input_ids"], b["attention_mask"])


def test_models_without_the_split_take_the_logits_path():
    from protege.core.logprobs import hidden_and_head

    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            raise AssertionError("not called")

    assert hidden_and_head(Plain(), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)) is None
