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

import weakref

import torch
from torch import Tensor


def response_logprobs(
    logits: Tensor, resp_pos: Tensor, targets: Tensor, temperature: float = 1.0
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


def _chunk_rows(
    head, h: Tensor, targets: Tensor, ids: Tensor | None, temperature: float, full: bool
) -> tuple[Tensor, ...]:
    """One chunk of positions: lm_head, the temperature, log_softmax and the gathers, for
    h [N, H] → sampled [N], entropy [N], (top-k [N, K]), (full rows [N, V]). The same operations
    in the same order as ``response_logprobs`` + ``entropy`` + ``logprobs_at``."""
    logp = (head(h).float() / temperature).log_softmax(-1)
    out = [logp.gather(-1, targets[:, None])[:, 0], entropy(logp)]
    if ids is not None:
        out.append(logp.gather(-1, ids))
    if full:
        out.append(logp)
    return tuple(out)


def chunked_response_logprobs(
    hidden: Tensor,
    head,
    resp_pos: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    *,
    chunk: int,
    topk_ids: Tensor | None = None,
    full: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(sampled [B, T], entropy [B, T], top-k [B, T, K] or None, full rows [B, T, V] or None) from
    the model's last hidden states ``hidden`` [B, L, H] and its output layer ``head`` (the lm_head
    module: hidden → logits), ``chunk`` response positions at a time.

    The same values as ``response_logprobs`` on ``head(hidden)`` (the response rows gathered in
    the shifted frame, float32, divided by ``temperature``, log_softmax), but the [chunk, V]
    logits and log-prob rows exist for one chunk at a time. With grad enabled each chunk runs
    under non-reentrant ``torch.utils.checkpoint``: autograd keeps only the chunk's input
    [chunk, H] and outputs ([chunk] and [chunk, K]) and recomputes lm_head + log_softmax in the
    backward, so memory grows with T × (H + K), not T × V, in the forward and the backward.
    (``full=True`` returns [B, T, V] rows: the algorithm asked for them, so they are kept; the
    chunking still saves the logits and the log_softmax buffers of the whole batch.)

    Positions are the flattened B × T response frame, so a chunk is ``chunk`` (row, token) pairs
    whatever the batch shape. Padded positions (resp_pos 0) are computed like today's path and
    masked by the caller. The head is called as a module, so its hooks run at each call and at
    the recomputation (DeepSpeed ZeRO-3 gathers a partitioned lm_head there: learners/learner.py).
    """
    from torch.utils.checkpoint import checkpoint

    B, T = targets.shape
    H = hidden.shape[-1]
    shifted = hidden[:, :-1]  # position j predicts token j + 1
    h = torch.gather(shifted, 1, resp_pos[..., None].expand(-1, -1, H)).reshape(B * T, H)
    tg = targets.reshape(B * T)
    ids = topk_ids.long().reshape(B * T, -1) if topk_ids is not None else None
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in _params(head)))
    parts = []
    for s in range(0, B * T, max(1, chunk)):
        e = min(B * T, s + max(1, chunk))
        args = (head, h[s:e], tg[s:e], ids[s:e] if ids is not None else None, temperature, full)
        parts.append(checkpoint(_chunk_rows, *args, use_reentrant=False) if grad else _chunk_rows(*args))
    cols = [torch.cat(c, 0) for c in zip(*parts)]
    lp, ent = cols[0].view(B, T), cols[1].view(B, T)
    topk = cols[2].view(B, T, -1) if ids is not None else None
    rows = cols[-1].view(B, T, -1) if full else None
    return lp, ent, topk, rows


def _params(head) -> list[Tensor]:
    return list(head.parameters()) if isinstance(head, torch.nn.Module) else []


_SPLIT_CHECKED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def hidden_and_head(model, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, torch.nn.Module] | None:
    """The last hidden states [B, L, H] (what the lm_head reads) and the lm_head module of a
    causal LM, from one forward of ``model`` that computes logits at the last position only;
    None when the model has no decoder/head split (then the caller uses the logits).

    ``model`` may be a wrapper with ``.module`` (DeepSpeed's engine): the forward goes through
    the wrapper, so its hooks run as in a normal forward (ZeRO-3's start/end-of-forward), and a
    forward hook on the decoder (``get_decoder()``) catches its ``last_hidden_state``, which is
    what Hugging Face causal LMs feed to ``get_output_embeddings()`` (tied or not: the head is the
    module, whatever weight it shares). ``logits_to_keep=1`` keeps the [B, L, V] logits from
    ever existing. A model that transforms the logits after the head (Gemma-2's soft-capping, a
    logit scale) would not match: the first call per model compares head(hidden) with the
    model's own last-position logits and raises if they differ."""
    inner = getattr(model, "module", model)
    get_head, get_dec = getattr(inner, "get_output_embeddings", None), getattr(inner, "get_decoder", None)
    head = get_head() if callable(get_head) else None
    body = get_dec() if callable(get_dec) else None
    if not isinstance(head, torch.nn.Module) or not isinstance(body, torch.nn.Module) or body is inner:
        return None
    caught: dict[str, Tensor] = {}

    def catch(_mod, _args, out):
        caught["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = body.register_forward_hook(catch)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1).logits
    finally:
        handle.remove()
    hidden = caught["h"]
    if inner not in _SPLIT_CHECKED and hidden.device.type != "meta":
        with torch.no_grad():
            mine = head(hidden[:, -1:]).float()
        if mine.shape != logits.shape or not torch.allclose(mine, logits.float(), rtol=1e-3, atol=1e-3):
            raise ValueError(
                f"{type(inner).__name__}: lm_head(last hidden state) differs from the model's logits (a "
                "transform after the head, e.g. logit soft-capping or scaling); chunked log-probs cannot "
                "be used for this model: set learner.logprob_chunk to null"
            )
        _SPLIT_CHECKED.add(inner)
    return hidden, head
