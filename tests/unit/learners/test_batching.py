"""Pure batching helpers: shards, micro-batches, collate (worked by hand)."""

from __future__ import annotations

import torch

from protege.core.records import TrainRow
from protege.learners.batching import collate, micro_batch_count, micro_batches, padded_tokens, shard_rows
from protege.learners.ds_config import build_ds_config


def _rows(n):
    return [TrainRow(prompt_ids=[1, 2], response_ids=[3] * (i + 1), advantage=float(i)) for i in range(n)]


def test_shards_are_equal_sized_with_zero_weight_padding():
    """5 rows over 2 ranks: ceil(5/2) = 3 each; rank 1 gets rows 3, 4 and one padding row."""
    shards = shard_rows(_rows(5), 2)
    assert [len(s) for s in shards] == [3, 3]
    assert [r.advantage for r in shards[0]] == [0.0, 1.0, 2.0]
    assert [r.weight for r in shards[1]] == [1.0, 1.0, 0.0]
    assert shards[1][2].advantage == 0.0 and shards[1][2].gate == 0.0


def test_pairs_stay_together():
    rows = _rows(6)  # 3 DPO pairs
    shards = shard_rows(rows, 2, group=2)
    assert [len(s) for s in shards] == [4, 4]
    assert shards[1][0] is rows[4] and shards[1][1] is rows[5]
    mbs = micro_batches(shards[0], 2, group=2)
    assert [len(m) for m in mbs] == [2, 2]


def test_micro_batches_always_exactly_n():
    mbs = micro_batches(_rows(1), 3)
    assert len(mbs) == 3
    assert [sum(r.weight for r in m) for m in mbs] == [1.0, 0.0, 0.0]


def test_collate_positions_by_hand():
    """prompt [1,2] + response [3,4]: logits at positions 1 and 2 predict tokens 3 and 4, so
    resp_pos = [1, 2]; the shorter row is right-padded with pad_id 0 and its mask ends early."""
    rows = [
        TrainRow(prompt_ids=[1, 2], response_ids=[3, 4], advantage=0.5),
        TrainRow(prompt_ids=[7, 8, 9], response_ids=[5], advantage=-0.5, weight=1.0),
    ]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 5]]
    assert b["resp_pos"].tolist() == [[1, 2], [2, 0]]
    assert b["targets"].tolist() == [[3, 4], [5, 0]]
    assert b["mask"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert torch.equal(b["advantages"], torch.tensor([0.5, -0.5]))


def test_padding_rows_are_masked_out():
    row = TrainRow(prompt_ids=[1], response_ids=[2, 3], weight=0.0, gate=1.0)
    b = collate([row], pad_id=0)
    assert b["mask"].sum() == 0 and b["gate"].tolist() == [0.0]


def test_ds_config_batch_arithmetic():
    c = build_ds_config(zero_stage=3, micro_batch=4, grad_accum=3, world_size=2, grad_clip=1.0, bf16=False)
    assert c["train_batch_size"] == 24 and c["zero_optimization"]["stage"] == 3
    assert c["zero_allow_untested_optimizer"] is True


def _sized(lengths, group=1):
    return [TrainRow(prompt_ids=[1], response_ids=[3] * (n - 1), advantage=float(i)) for i, n in enumerate(lengths)]


def test_token_budget_packs_sorted_rows_with_the_smallest_largest_micro_batch():
    """Lengths 8, 2, 7, 3, 1, 6 (prompt + response) in 3 micro-batches, sorted 8 7 6 3 2 1. A run
    costs its rows × its first (longest) length: [8] [7, 6] [3, 2, 1] costs 8, 14, 9, and every
    other cut has a larger run ([8, 7] = 16; [8] [7] [6, 3, 2, 1] = 24; [8] [7, 6, 3] = 21)."""
    rows = _sized([8, 2, 7, 3, 1, 6])
    mbs = micro_batches(rows, 3, tokens=16)
    assert [[len(r.prompt_ids) + len(r.response_ids) for r in m] for m in mbs] == [[8], [7, 6], [3, 2, 1]]
    assert max(padded_tokens(m) for m in mbs) == 14
    assert sorted(r.advantage for m in mbs for r in m) == [0, 1, 2, 3, 4, 5]  # every row once


def test_token_budget_keeps_pairs_mini_batches_and_the_count():
    rows = _sized([4, 4, 9, 9, 2, 2, 5, 5])  # 4 DPO pairs
    mbs = micro_batches(rows, 4, group=2, tokens=18, blocks=2)
    assert len(mbs) == 4
    for m in mbs:  # a pair stays whole: rows 2k and 2k+1 together
        assert [r.advantage for r in m][::2] == [r.advantage - 1 for r in m][1::2]
    # mini-batch 1 = pairs 0, 1 (the blocks of the unbudgeted split), mini-batch 2 = pairs 2, 3
    assert sorted(r.advantage for m in mbs[:2] for r in m) == [0, 1, 2, 3, 4, 5, 6, 7][:4]
    assert [r.advantage for r in mbs[0]] == [2, 3] and [r.advantage for r in mbs[1]] == [0, 1]


def test_token_budget_pads_with_the_shortest_row_when_rows_are_few():
    mbs = micro_batches(_sized([9, 3]), 3, tokens=100)
    assert [len(m) for m in mbs] == [1, 1, 1] and [r.weight for m in mbs for r in m] == [1.0, 1.0, 0.0]
    pad = [r for m in mbs for r in m if r.weight == 0]
    assert pad and all(len(r.prompt_ids) + len(r.response_ids) == 3 for r in pad)


def test_micro_batch_count_from_a_token_budget():
    assert micro_batch_count(10, micro_batch=4) == 3  # without a budget: ceil(10 / 4)
    # 8192-token budget, sequences up to 2112: 3 rows a micro-batch, 10 rows → 4 micro-batches
    assert micro_batch_count(10, micro_batch=4, tokens=8192, max_len=2112) == 4
    assert micro_batch_count(10, micro_batch=4, tokens=8192, max_len=2112, mini_batches=2) == 2
    assert micro_batch_count(10, micro_batch=4, tokens=1000, max_len=2112) == 10  # one row each, over budget
    assert micro_batch_count(8, micro_batch=4, tokens=8192, max_len=2112, group=2) == 4  # one pair each
