"""Weight-sync vocabulary both ends share: wire dtype names, parameter sizes, bucket plans, wire
metadata and byte counts. Pure (torch only), so the learner's sender (learners/weight_sender.py),
the rollout worker's receiver (actors/weight_receiver.py) and the driver's coordinator
(cluster/weight_sync.py) agree on them without importing each other.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Sequence

import torch

DEFAULT_BUCKET_MB = 512

# (name, full shape, wire dtype name) of one parameter, as the sender declares it to vLLM.
WireMeta = tuple[str, list[int], str]


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` → ``"bfloat16"`` (the wire form vLLM expects)."""
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return name


def param_bytes(shape: Sequence[int], dtype: torch.dtype | str) -> int:
    return math.prod(int(s) for s in shape) * getattr(torch, dtype_name(dtype)).itemsize


def plan_buckets(params: Sequence[tuple[str, Sequence[int], torch.dtype | str]], bucket_bytes: int) -> list[list[str]]:
    """Split ``(name, shape, dtype)`` into consecutive buckets of at most ``bucket_bytes``.

    Order is kept and every name lands in exactly one bucket. A parameter larger than the
    bucket gets a bucket of its own (it cannot be split: a gather is per parameter).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive (got {bucket_bytes})")
    seen: set[str] = set()
    buckets: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for name, shape, dtype in params:
        if name in seen:
            raise ValueError(f"parameter {name!r} listed twice")
        seen.add(name)
        size = param_bytes(shape, dtype)
        if cur and used + size > bucket_bytes:
            buckets.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += size
    if cur:
        buckets.append(cur)
    return buckets


def wire_meta(module: torch.nn.Module, dtype: torch.dtype | str) -> list[WireMeta]:
    """``(name, full shape, wire dtype)`` for each parameter, in ``named_parameters`` order.

    Tied weights appear once (``named_parameters`` deduplicates), as in the CPU path. Under
    ZeRO-3 a parameter's local shape is its partition; ``ds_shape`` is the full one.
    """
    wire = dtype_name(dtype)
    return [(n, [int(s) for s in getattr(p, "ds_shape", p.shape)], wire) for n, p in module.named_parameters()]


def meta_bytes(meta: Sequence[tuple[str, Sequence[int], str]]) -> int:
    """Bytes of the parameters ``meta`` describes, in their wire dtype (what a receiver holds)."""
    return sum(param_bytes(shape, dtype) for _, shape, dtype in meta)


def safetensors_data_bytes(payload: bytes) -> int:
    """Bytes of the tensors in a safetensors blob (its size without the JSON header): what a
    receiver holds after loading it, in the dtype the blob was written in."""
    if len(payload) < 8:
        raise ValueError("not a safetensors payload (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + header_len])
    return sum(end - start for key, t in header.items() if key != "__metadata__" for start, end in [t["data_offsets"]])


# ------------------------------------------------------------------ packed weights (object store)
ALIGN = 64  # byte offset of every tensor in its flat buffer: any dtype view is aligned, and so is memcpy

# (name, full shape, wire dtype name, buffer index, byte offset) of one parameter in a PackedWeights.
PackedEntry = tuple[str, list[int], str, int, int]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_packed(
    meta: Sequence[tuple[str, Sequence[int], str]], bucket_bytes: int
) -> tuple[list[PackedEntry], list[int]]:
    """Where each parameter of ``meta`` lies in the flat buffers of a :class:`PackedWeights`:
    parameters grouped by wire dtype (one run of buffers per dtype, so a buffer has one dtype),
    each group cut into buffers of at most ``bucket_bytes`` of tensor data by :func:`plan_buckets`
    (a larger parameter gets a buffer of its own), offsets aligned to ``ALIGN`` (so a buffer may
    exceed the bucket by its padding). Returns (layout, buffer sizes). Pure."""
    by_dtype: dict[str, list[tuple[str, list[int], str]]] = {}
    for name, shape, dtype in meta:
        by_dtype.setdefault(dtype_name(dtype), []).append((name, [int(s) for s in shape], dtype_name(dtype)))
    layout: list[PackedEntry] = []
    sizes: list[int] = []
    for params in by_dtype.values():
        info = {n: (s, d) for n, s, d in params}
        for names in plan_buckets(params, bucket_bytes):
            used = end = 0
            for n in names:
                shape, d = info[n]
                layout.append((n, shape, d, len(sizes), used))
                end = used + param_bytes(shape, d)
                used = _aligned(end)
            sizes.append(end)
    return layout, sizes


def tensor_views(layout: Sequence[PackedEntry], buffers: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each entry of ``layout``: views into the flat uint8 ``buffers``
    (no copy), in their wire dtype and full shape."""
    out = []
    for name, shape, dtype, b, off in layout:
        n = param_bytes(shape, dtype)
        out.append((name, buffers[b][off : off + n].view(getattr(torch, dtype)).view(shape)))
    return out
