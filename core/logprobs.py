"""Log-probs of response tokens from a causal LM's logits: the one gather learner and teacher share.

Both the learner (π_θ, π_old, π_ref) and the teacher scorer (π_T) read the same quantity: for each
response token y_t, log softmax(logits / temperature) at the position that predicts it. Computing
it in one place keeps the two in the same frame, so log π_θ − log π_T compares like with like
(a frame shifted by one token, or a temperature applied on one side only, would silently bias
every distillation loss).

The frame: sequences are right-padded ``prompt + response``; logits at position j predict token
j+1, so response token t of a row with prompt length P sits at P − 1 + t of the shifted logits
[B, L−1, V]. ``resp_pos`` [B, T] holds those indices and ``targets`` [B, T] the response tokens
(``pack`` builds both; learners/batching.py ``collate`` builds the same ones with the rest of a
training micro-batch). Positions past a row's response are padding the caller masks out.

Pure torch functions, differentiable where the learner needs gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def response_logprobs(logits: Tensor, resp_pos: Tensor, targets: Tensor, temperature: float = 1.0
                      ) -> tuple[Tensor, Tensor]:
    """(sampled [B, T], rows [B, T, V]): log π(y_t) of the response tokens and the whole
    log-softmax rows they were read from, at ``temperature`` (the sampling distribution's).

    ``logits`` [B, L, V] is the model's output over the full sequences; float32 whatever the
    model's dtype. The response rows are gathered before the float cast and the softmax, so a
    long prompt costs no [B, L, V] float32 copy.
    """
    shifted = logits[:, :-1]  # position j predicts token j + 1
    rows = torch.gather(shifted, 1, resp_pos[..., None].expand(-1, -1, shifted.shape[-1]))  # [B, T, V]
    logp = (rows.float() / temperature).log_softmax(-1)
    return logp.gather(-1, targets[..., None])[..., 0], logp


def logprobs_at(logp: Tensor, ids: Tensor) -> Tensor:
    """log-probs [B, T, K] of the rows ``logp`` [B, T, V] at the ids [B, T, K] (e.g. the teacher's top-k)."""
    return logp.gather(-1, ids.long())


def topk_logprobs(logp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values [.., K], ids [.., K], tail [..]): the k largest log-probs of each row, their ids, and
    the log-mass outside them (computed from the float32 row, before any payload cast)."""
    vals, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return vals, ids, tail_logprob(vals)


def tail_logprob(logp: Tensor) -> Tensor:  # [..., K] -> [...]
    """log(1 − Σ_k exp(logp_k)): the log-mass outside the K ids. Clamped just below 0 in log
    space so a support holding (numerically) all the mass gives a finite, very small tail."""
    lse = torch.logsumexp(logp, dim=-1).clamp(max=-1e-6)
    return torch.log(-torch.expm1(lse))


def entropy(logp: Tensor) -> Tensor:
    """Entropy [..] of each log-prob row [.., V]."""
    return -(logp.exp() * logp).sum(-1)


def pack(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded (prompt ids, response ids) pairs in the frame above: input_ids [B, L],
    attention_mask [B, L], resp_pos [B, T] and targets [B, T] (T = the longest response, at least 1)."""
    B = len(items)
    L = max(len(p) + len(r) for p, r in items)
    T = max(1, max(len(r) for _, r in items))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    resp_pos = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    for i, (prompt, resp) in enumerate(items):
        seq = list(prompt) + list(resp)
        P, R = len(prompt), len(resp)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, : len(seq)] = 1
        if R:
            resp_pos[i, :R] = torch.arange(P - 1, P - 1 + R)
            targets[i, :R] = torch.tensor(resp, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attn, "resp_pos": resp_pos, "targets": targets}
