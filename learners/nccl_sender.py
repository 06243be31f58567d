"""Learner side of the GPU weight sync (cluster/nccl_sync.py): a mixin for :class:`Learner`.

Every learner rank takes part; rank 0 is the only sender. Parameters leave in buckets of at
most ``bucket_bytes`` (one parameter larger than that travels alone): under ZeRO-3 every rank
walks the same bucket plan and enters ``GatheredParameters`` together for each bucket, so the
gathers line up and at most one bucket is ever materialised in full.

The data plane is vLLM's own (actors/nccl_trainer.py wraps it, keeping vLLM imports inside
actors/):
- a rollout engine on a GPU no learner rank uses gets its own NCCL group with rank 0 (world 2),
  set up once, and receives packed buffers broadcast by rank 0;
- a rollout engine on the GPU of a learner rank (colocated) gets CUDA IPC handles of packed
  buffers instead (NCCL refuses two ranks on one GPU); every rank exports its own copy, so the
  engine colocated with rank r reads rank r's memory.

This path has not been run on hardware yet; see cluster/nccl_sync.py.
"""

from __future__ import annotations

import math
import socket
import time
from contextlib import nullcontext
from typing import Any, Iterator, Sequence

import torch

DEFAULT_BUCKET_MB = 512


# --------------------------------------------------------------------------------- pure helpers
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


def wire_meta(module: torch.nn.Module, dtype: str) -> list[tuple[str, list[int], str]]:
    """``(name, full shape, wire dtype)`` for each parameter, in ``named_parameters`` order.

    Tied weights appear once (``named_parameters`` deduplicates), as in the CPU path. Under
    ZeRO-3 a parameter's local shape is its partition; ``ds_shape`` is the full one.
    """
    wire = dtype_name(dtype)
    return [(n, [int(s) for s in getattr(p, "ds_shape", p.shape)], wire) for n, p in module.named_parameters()]


# ------------------------------------------------------------------------------------- the mixin
class NcclSenderMixin:
    """Methods for :class:`protege.learners.learner.Learner` (uses ``engine``, ``rank``, ``spec``).

    Called by cluster/nccl_sync.py on every rank, in this order: ``nccl_device_uuid`` (probe),
    ``nccl_init`` (once, and again for a restarted rollout worker), ``nccl_send`` (each sync).
    """

    # -- probes
    def nccl_device_uuid(self) -> str | None:
        """This rank's GPU (the key CUDA IPC handles use), or None without CUDA."""
        if not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)

    def nccl_rendezvous(self, count: int) -> tuple[str, list[int]]:
        """This node's address and ``count`` free ports (rank 0 hosts each group's TCP store)."""
        import ray

        socks = [socket.socket() for _ in range(count)]
        try:
            for s in socks:
                s.bind(("", 0))
            ports = [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()
        return ray.util.get_node_ip_address(), ports

    def nccl_meta(self, dtype: str) -> list[tuple[str, list[int], str]]:
        return wire_meta(self.engine.module, dtype)

    # -- setup
    def nccl_init(self, *, workers: list | None, routes: list[dict], connect: list[tuple[int, str, int]],
                  dtype: str, bucket_mb: float = DEFAULT_BUCKET_MB) -> dict[str, Any]:
        """Record the routes (all ranks) and, on rank 0, open an NCCL group with each worker in
        ``connect`` (``(worker index, address, port)``). A worker connected before (it restarted)
        gets a new group; the old communicator is aborted (vLLM's ``destroy`` aborts without
        waiting for the peer, which is gone). A worker that died before its group opened is
        listed in ``failed`` (rank 0's answer) and the others are still connected."""
        t0 = time.perf_counter()
        state = getattr(self, "_wt", None) or {"engines": {}}
        state.update(routes=list(routes), dtype=dtype_name(dtype), bucket_bytes=int(bucket_mb * (1 << 20)))
        if workers is not None:
            state["workers"] = list(workers)
        self._wt = state
        for idx in [i for i in state["engines"] if (routes[i] or {}).get("kind") != "nccl"]:
            _drop(state, idx)  # restarted onto a learner's GPU: its old group is dead, IPC serves it now
        failed: list[int] = []
        if self.rank == 0 and connect:
            from protege.actors.nccl_trainer import WorkerGone, connect_nccl

            for idx, address, port in connect:
                _drop(state, idx)
                try:
                    state["engines"][idx] = connect_nccl(
                        state["workers"][idx], address=address, port=port,
                        world_size=int(routes[idx].get("world_size", 2)), bucket_bytes=state["bucket_bytes"])
                except WorkerGone:
                    failed.append(idx)  # the driver re-syncs it after its restart
        connected = [c[0] for c in connect if c[0] not in failed] if self.rank == 0 else []
        return {"rank": self.rank, "connected": connected, "failed": failed, "seconds": time.perf_counter() - t0}

    # -- each sync
    def nccl_send(self, version: int, targets: list[int]) -> dict[str, Any] | None:
        """Send the current weights to the rollout workers ``targets`` (indices, same list on every
        rank). Rank 0 returns ``{"failed": [...], "workers": {i: {"version", "seconds"}}, ...}``;
        a worker that died during the send is listed in ``failed``; the others return None."""
        from protege.actors.nccl_trainer import BucketSource, send_ipc, send_nccl

        state = getattr(self, "_wt", None)
        if state is None:
            raise RuntimeError("nccl_send before nccl_init")
        t0 = time.perf_counter()
        dtype, bucket = state["dtype"], state["bucket_bytes"]
        meta = wire_meta(self.engine.module, dtype)
        plan = plan_buckets(meta, bucket)
        routes = state["routes"]
        ipc = [i for i in targets if routes[i]["kind"] == "ipc"]
        nccl = [i for i in targets if routes[i]["kind"] == "nccl"]
        sender = self.rank == 0
        workers = state.get("workers") or []
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the optimizer's last writes land before any other stream reads them
        failed: list[int] = []
        results: dict[int, dict] = {}
        if ipc:
            # Every rank materialises: the engine colocated with rank r maps rank r's buffer.
            src = BucketSource(meta, lambda: self._bucket_pairs(plan, dtype, materialize=True))
            largest = max((_bytes(m) for m in meta), default=1)
            client = send_ipc({i: workers[i] for i in ipc} if sender else {}, src, rank=self.rank, version=version,
                              buffer_bytes=max(bucket, largest))
            if sender:
                failed += client.failed
                results.update(client.results)
        # Off rank 0 the NCCL pass only joins ZeRO-3 gathers; without ZeRO-3 there is nothing to join.
        if nccl and (sender or self.spec.zero_stage == 3):
            engines = {i: state["engines"][i] for i in nccl if i in state["engines"]} if sender else {}
            if sender:
                failed += [i for i in nccl if i not in engines]  # never connected: the driver reconnects it
            src = BucketSource(meta, lambda: self._bucket_pairs(plan, dtype, materialize=sender))
            client = send_nccl(engines, {i: workers[i] for i in engines} if sender else {}, src,
                               is_sender=sender, version=version, bucket_bytes=bucket)
            if sender:
                failed += client.failed
                results.update(client.results)
        if not sender:
            return None
        for i in failed:
            _drop(state, i)  # its group is unusable; reconnected after the restart
        return {"version": version, "failed": sorted(set(failed)), "workers": results,
                "mbytes": sum(_bytes(m) for m in meta) / 1e6, "buckets": len(plan),
                "send_s": time.perf_counter() - t0}

    def nccl_close(self) -> None:
        state = getattr(self, "_wt", None) or {}
        for i in list(state.get("engines", {})):
            _drop(state, i)
        self._wt = None

    # -- internals
    def _gathered(self, params: list):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def _bucket_pairs(self, plan: list[list[str]], dtype: str, *, materialize: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in plan order, one ZeRO-3 gather per bucket on every rank.

        ``materialize``: yield a cast copy that outlives the gather (the sender, and every rank
        for IPC); otherwise the gathered parameter itself (a rank that only joins the gathers).
        vLLM packs these on its own CUDA streams, so the device is synchronised after each gather
        (the gathered values are visible to every stream) and before leaving it (the copies are
        done before DeepSpeed frees the full parameters).
        """
        params = dict(self.engine.module.named_parameters())
        zero3 = self.spec.zero_stage == 3
        cuda = torch.cuda.is_available()
        wire = getattr(torch, dtype_name(dtype))
        for names in plan:
            group = [params[n] for n in names]
            with self._gathered(group) if zero3 else nullcontext():
                if cuda:
                    torch.cuda.synchronize()
                for name, p in zip(names, group):
                    t = p.detach()
                    if materialize:
                        t = t.to(wire, copy=zero3)
                    yield name, t
                if cuda:
                    torch.cuda.synchronize()


def _drop(state: dict, idx: int) -> None:
    eng = state["engines"].pop(idx, None)
    if eng is not None:
        try:
            eng.shutdown()
        except Exception:  # best effort: the peer may be gone
            pass


def _bytes(meta: tuple[str, Sequence[int], str]) -> int:
    return param_bytes(meta[1], meta[2])
