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
        prompt_ids=row.prompt_ids, response_ids=row.response_ids, advantage=0.0,
        teacher_logprobs=row.teacher_logprobs, teacher_topk_ids=row.teacher_topk_ids,
        teacher_topk_logprobs=row.teacher_topk_logprobs, teacher_tail_logprobs=row.teacher_tail_logprobs,
        teacher_full_logprobs=row.teacher_full_logprobs, gate=0.0,
        ref_seq_logprob=row.ref_seq_logprob, rollout_logprobs=row.rollout_logprobs, weight=0.0,
    )


def micro_batches(rows: list[TrainRow], n: int, *, group: int = 1) -> list[list[TrainRow]]:
    """Exactly ``n`` micro-batches (some may repeat a zero-weight padding row when rows are few)."""
    units = [rows[i : i + group] for i in range(0, len(rows), group)]
    out: list[list[TrainRow]] = [[] for _ in range(n)]
    for i, unit in enumerate(units):
        out[i * n // max(1, len(units))].extend(unit)
    for mb in out:
        if not mb:
            mb.extend(_padding(r) for r in units[0])
    return out


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
        "input_ids": input_ids, "attention_mask": attn, "resp_pos": resp_pos, "targets": targets, "mask": mask,
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
