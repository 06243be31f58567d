"""Pure batching helpers: rows → padded tensors, rows → micro-batches, ranks' shards.

The learner computes log-probs on right-padded (prompt + response) sequences and gathers the
response positions into a [B, T_resp] frame aligned with the loss functions' inputs.
"""

from __future__ import annotations

import math

import torch

from protege.core.records import TrainRow


def shard_rows(rows: list[TrainRow], world_size: int, *, group: int = 1) -> list[list[TrainRow]]:
    """Split rows over ranks in contiguous chunks of ``group`` rows (2 keeps DPO pairs together),
    padding with zero-weight copies so every rank gets the same count: DeepSpeed's collectives
    (ZeRO-2 gradient reduction, ZeRO-3 parameter gathers) need the same number of forward and
    backward calls on every rank."""
    units = [rows[i : i + group] for i in range(0, len(rows), group)]
    per_rank = max(1, math.ceil(len(units) / world_size))
    pad_src = units[0] if units else []
    shards = []
    for r in range(world_size):
        chunk = units[r * per_rank : (r + 1) * per_rank]
        while len(chunk) < per_rank:
            chunk.append([_padding(x) for x in pad_src])
        shards.append([row for unit in chunk for row in unit])
    return shards


def _padding(row: TrainRow) -> TrainRow:
    return TrainRow(
        prompt_ids=row.prompt_ids,
        response_ids=row.response_ids,
        advantage=0.0,
        teacher_logprobs=row.teacher_logprobs,
        teacher_topk_ids=row.teacher_topk_ids,
        teacher_topk_logprobs=row.teacher_topk_logprobs,
        teacher_tail_logprobs=row.teacher_tail_logprobs,
        teacher_full_logprobs=row.teacher_full_logprobs,
        gate=0.0,
        ref_seq_logprob=row.ref_seq_logprob,
        rollout_logprobs=row.rollout_logprobs,
        weight=0.0,
    )


def micro_batch_count(
    rows_per_rank: int,
    *,
    micro_batch: int,
    mini_batches: int = 1,
    tokens: int | None = None,
    max_len: int | None = None,
    group: int = 1,
) -> int:
    """Micro-batches per mini-batch (DeepSpeed's ``grad_accum``), fixed at launch so every rank
    runs the same number of forward/backward calls whatever a step's rows (its collectives).
    With a token budget ``tokens``, a micro-batch holds as many units (``group`` rows) of the
    longest possible sequence ``max_len`` as fit: enough micro-batches for any step's rows."""
    if tokens is None:
        return max(1, math.ceil(rows_per_rank / (micro_batch * mini_batches)))
    units = math.ceil(rows_per_rank / group)
    per_mb = max(1, tokens // (max(1, max_len or 1) * group))
    return max(1, math.ceil(units / (per_mb * mini_batches)))


def padded_tokens(rows: list[TrainRow]) -> int:
    """What ``collate`` allocates per token-wide tensor: rows × the longest prompt + response."""
    return len(rows) * max((len(r.prompt_ids) + len(r.response_ids) for r in rows), default=0)


def micro_batches(
    rows: list[TrainRow], n: int, *, group: int = 1, tokens: int | None = None, blocks: int = 1
) -> list[list[TrainRow]]:
    """Exactly ``n`` micro-batches (some may repeat a zero-weight padding row when rows are few).

    ``tokens`` unset: contiguous runs of rows in arrival order. ``tokens`` set (a token budget,
    ``learner.micro_batch_tokens``): the rows are split into ``blocks`` contiguous blocks (the
    mini-batches, ``n // blocks`` micro-batches each, the same blocks as without a budget), and
    each block's units (``group`` rows: a DPO pair stays whole) are sorted longest first and cut
    into at most ``n // blocks`` runs with the smallest possible largest ``padded_tokens``. The
    launch sized ``n`` so that this is within the budget (``micro_batch_count``); a longer
    sequence than it planned for goes over the budget rather than changing ``n``."""
    units = [rows[i : i + group] for i in range(0, len(rows), group)]
    if tokens is not None:
        per = max(1, n // max(1, blocks))
        out = []
        for j in range(blocks):
            block = [u for i, u in enumerate(units) if i * blocks // max(1, len(units)) == j]
            out.extend(_pack(block, per))
        shortest = min(units, key=lambda u: padded_tokens(u)) if units else []
        for mb in out:
            if not mb:
                mb.extend(_padding(r) for r in shortest)
        return out
    out: list[list[TrainRow]] = [[] for _ in range(n)]
    for i, unit in enumerate(units):
        out[i * n // max(1, len(units))].extend(unit)
    for mb in out:
        if not mb:
            mb.extend(_padding(r) for r in units[0])
    return out


def _pack(units: list[list[TrainRow]], n: int) -> list[list[TrainRow]]:
    """``n`` micro-batches of ``units`` sorted longest first, cut into contiguous runs whose
    largest padded size is the smallest possible for such runs (binary search on that size; a
    run's cost is its rows × its first, longest, unit's length). Trailing runs may be empty."""
    if not units:
        return [[] for _ in range(n)]
    lens = [max(len(r.prompt_ids) + len(r.response_ids) for r in u) for u in units]
    order = sorted(range(len(units)), key=lambda i: (-lens[i], i))

    def cut(cap: int) -> list[list[int]]:
        runs: list[list[int]] = []
        rows = 0
        for i in order:
            if runs and (rows + len(units[i])) * lens[runs[-1][0]] <= cap:
                runs[-1].append(i)
                rows += len(units[i])
            else:
                runs.append([i])
                rows = len(units[i])
        return runs

    lo = max(len(u) * n_ for u, n_ in zip(units, lens))
    hi = sum(len(u) for u in units) * max(lens)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(cut(mid)) <= n:
            hi = mid
        else:
            lo = mid + 1
    runs = cut(lo)
    out = [[row for i in run for row in units[i]] for run in runs]
    return out + [[] for _ in range(n - len(out))]


def collate(rows: list[TrainRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs plus the indices that pick each response token's log-prob.

    Returns input_ids [B, L], attention_mask [B, L], resp_pos [B, T] (index into the shifted
    log-prob frame [B, L-1]), mask [B, T] (1.0 on real response tokens of real rows), targets
    [B, T], advantages [B], gate [B], weight [B], and teacher tensors when present.
    """
    B = len(rows)
    L = max(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    T = max(1, max(len(r.response_ids) for r in rows))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    resp_pos = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T))
    teacher = torch.zeros((B, T)) if any(r.teacher_logprobs is not None for r in rows) else None
    behaviour = torch.zeros((B, T)) if all(r.rollout_logprobs is not None for r in rows) else None
    k = next((len(r.teacher_topk_ids[0]) for r in rows if _has(r.teacher_topk_ids)), 0)
    topk_ids = torch.zeros((B, T, k), dtype=torch.long) if k else None
    topk_lp = torch.zeros((B, T, k)) if k else None
    tail = torch.full((B, T), -30.0) if k and any(_has(r.teacher_tail_logprobs) for r in rows) else None
    v = next((len(r.teacher_full_logprobs[0]) for r in rows if _has(r.teacher_full_logprobs)), 0)
    # Padded positions of full rows hold a uniform distribution: finite, and masked out anyway.
    full = torch.full((B, T, v), -math.log(v)) if v else None
    for i, r in enumerate(rows):
        seq = list(r.prompt_ids) + list(r.response_ids)
        P, R = len(r.prompt_ids), len(r.response_ids)
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        if R:
            # logits at position j predict token j+1, so response token t sits at P-1+t.
            resp_pos[i, :R] = torch.arange(P - 1, P - 1 + R)
            targets[i, :R] = torch.tensor(r.response_ids)
            mask[i, :R] = 1.0 if r.weight > 0 else 0.0
        if behaviour is not None:
            behaviour[i, :R] = torch.tensor(r.rollout_logprobs[:R])
        if teacher is not None and r.teacher_logprobs is not None:
            teacher[i, :R] = _rows_of(r.teacher_logprobs, R)
        if k and _has(r.teacher_topk_ids):
            topk_ids[i, :R] = _rows_of(r.teacher_topk_ids, R)
            topk_lp[i, :R] = _rows_of(r.teacher_topk_logprobs, R)
            if tail is not None and _has(r.teacher_tail_logprobs):
                tail[i, :R] = _rows_of(r.teacher_tail_logprobs, R)
        if v and _has(r.teacher_full_logprobs):
            full[i, :R] = _rows_of(r.teacher_full_logprobs, R)
    out = {
        "input_ids": input_ids,
        "attention_mask": attn,
        "resp_pos": resp_pos,
        "targets": targets,
        "mask": mask,
        "advantages": torch.tensor([r.advantage for r in rows], dtype=torch.float32),
        "gate": torch.tensor([r.gate if r.weight > 0 else 0.0 for r in rows], dtype=torch.float32),
        "weight": torch.tensor([r.weight for r in rows], dtype=torch.float32),
    }
    if teacher is not None:
        out["teacher_logprobs"] = teacher
    if behaviour is not None:
        out["rollout_logprobs"] = behaviour
    if k:
        out["teacher_topk_ids"] = topk_ids
        out["teacher_topk_logprobs"] = topk_lp
    if tail is not None:
        out["teacher_tail_logprobs"] = tail
    if v:
        out["teacher_full_logprobs"] = full
    if any(r.ref_seq_logprob is not None for r in rows):
        out["ref_seq_logprob"] = torch.tensor([r.ref_seq_logprob or 0.0 for r in rows])
    return out


def _has(x) -> bool:
    return x is not None and len(x) > 0


def _rows_of(x, n: int) -> torch.Tensor:
    """The first ``n`` entries of a per-token payload (tensor or list) as a float32/long tensor."""
    t = torch.as_tensor(x[:n])
    return t.float() if t.is_floating_point() else t.long()


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Every tensor of a collated micro-batch on the learner's device. The one place the learner
    moves inputs: a field moved by hand at its use is one forgotten elsewhere, and on a CPU
    machine that mistake cannot show (tests run the train step on the ``meta`` device for that)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
