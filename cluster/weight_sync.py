"""Versioned weight sync: learner → rollout engines (docs/design.md, "Weight sync").

The driver's side: one contract, :class:`WeightSync`. ``push(version, targets=None)`` loads the
learner's current weights into the rollout workers ``targets`` (indices into the workers; None:
all) and returns a :class:`~protege.core.records.SyncResult`: its ``failed`` lists the targets
(indices into ``targets``) that died during the push, for the driver to re-sync after their
restart; its ``metrics`` are the ``sync/*`` metrics. Every rollout then records the version that
generated it. The learner's end is learners/weight_sender.py, the rollout worker's
actors/weight_receiver.py; both are reached through their actors' forwarding methods.

``ObjectStoreSync`` (CPU and any cluster): learner rank 0 copies all parameters into a few flat
byte buffers per dtype (numpy, so the object store holds raw bytes; under ZeRO-3 all ranks gather
buffer by buffer together), its return value puts them into Ray's object store once, the driver
passes their reference on unread, and each worker maps them without a copy and loads views into
them through vLLM's layerwise reload (tied embeddings re-tied, prefix cache reset;
actors/vllm_ext.py). No serialisation format on the way, one transfer per sync, never one call
per parameter.

``NcclWeightSync`` (GPU): vLLM's native weight transfer. Every learner rank takes part (ZeRO-3
gathers bucket by bucket, all ranks together); rank 0 sends; each rollout worker receives through
its vLLM engine's start_weight_update / update_weights / finish_weight_update, then re-ties tied
embeddings, resets the prefix cache and takes the version, as in the CPU path. Transport per
rollout worker, from where Ray placed it (:func:`plan_routes`):
- ``ipc``: its GPU is a learner rank's GPU (colocated) → CUDA IPC from that rank's memory;
- ``nccl``: otherwise → its own NCCL group with learner rank 0 (world size 2), opened at the
  first push and again after the worker restarts (its pid changed); packed buffers of
  ``bucket_mb``.

Status of the GPU path: written against the installed vLLM 0.32 source and unit-tested on CPU
where it can be (bucketing, metadata, routes, orchestration with stand-in actors); the data plane
needs a GPU (tests/unit/cluster/test_nccl_sync.py, ``-m gpu --gpu``) and has not run on one yet.

Known limit: NCCL has no peer-failure detection, so a rollout worker that dies *during* a
broadcast can leave learner rank 0 blocked; ``timeout_s`` turns that into an error the driver
sees instead of a hang. A worker that is already dead when a push starts is detected first and
reported in ``failed``, and so is one that dies before its NCCL group opens (rank 0 checks it
is alive first instead of waiting out the rendezvous for it).

:func:`pick_weight_sync` chooses between the two from ``learner.weight_sync``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

import ray
import torch

from protege.cluster.launch import gather
from protege.core.records import SyncResult, WeightsVersion
from protege.core.weights import DEFAULT_BUCKET_MB, dtype_name

DEAD = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
MODES = ("auto", "object_store", "nccl")


class WeightSync(Protocol):
    """What the driver holds (cluster/driver.py ``_sync``, ``_resync_worker``)."""

    def push(self, version: int, targets: list[int] | None = None) -> SyncResult:
        """Load ``version`` into the rollout workers ``targets`` (indices; None: all). Workers that
        died during the push are in the result's ``failed`` (indices into ``targets``)."""
        ...


def _targets(targets: list[int] | None, count: int) -> list[int]:
    if targets is None:
        return list(range(count))
    bad = [i for i in targets if not 0 <= i < count]
    if bad:
        raise ValueError(f"push(targets=...) got {bad}, not indices of this sync's {count} rollout worker(s)")
    return list(targets)


# --------------------------------------------------------------------------------- object store
class ObjectStoreSync:
    """The CPU path. ``dtype``: the rollout engines' dtype (what ``SyncResult.bytes`` counts in);
    ``wire_dtype``: the dtype the weights travel in (None: each parameter's own, the training
    dtype); ``bucket_mb``: the largest flat buffer.

    One push: every learner rank that must take part (all under ZeRO-3, else rank 0) packs
    (``Learner.pack_weights``, two return values); the driver waits for the small summary and
    passes the reference of the buffers, unread, to every target's ``load_weights``, so the
    buffers are written into the object store once, by rank 0's return, and each worker on the
    node maps them from there. ``sync/*`` metrics split the push:

    - ``sync/pack_s``: learner rank 0 gathering, casting and copying the parameters into the buffers;
    - ``sync/export_s``: the driver's wait for the pack (``pack_s`` plus Ray storing the return value);
    - ``sync/unpack_s``: the receiver turning the mapped buffers into named tensor views (slowest worker);
    - ``sync/load_s``: the receiver's whole load, ``unpack_s`` plus vLLM's layerwise reload (slowest worker);
    - ``sync/transfer_s``: the rest of ``sync/seconds``: the object store's hand-off and the Ray round trips;
    - ``sync/mbytes``: MB on the wire; ``sync/mb_per_s``: ``SyncResult.bytes`` / ``sync/seconds``.
    """

    def __init__(
        self,
        learners: list,
        workers: list,
        *,
        zero_stage: int,
        dtype: str,
        wire_dtype: str | None = None,
        bucket_mb: float = DEFAULT_BUCKET_MB,
    ):
        self.learners = learners
        self.workers = workers
        self.zero_stage = zero_stage
        self.dtype = dtype
        self.wire_dtype = None if wire_dtype in (None, "auto") else wire_dtype
        self.bucket_mb = bucket_mb

    def export(self) -> tuple[dict, Any]:
        """(rank 0's summary, the reference of its PackedWeights). Raises a learner's error."""
        # ZeRO-3 shards parameters: every rank must enter the gathers together.
        callers = self.learners if self.zero_stage == 3 else self.learners[:1]
        pairs = [ln.pack_weights.options(num_returns=2).remote(self.wire_dtype, self.bucket_mb) for ln in callers]
        summaries = gather([summary for summary, _ in pairs])
        return summaries[0], pairs[0][1]

    def push(self, version: int, targets: list[int] | None = None) -> SyncResult:
        """Load ``version`` into the workers ``targets`` (all by default)."""
        t0 = time.perf_counter()
        targets = _targets(targets, len(self.workers))
        summary, packed = self.export()
        t_export = time.perf_counter() - t0
        weights = WeightsVersion(version=version, num_bytes=int(summary["wire_bytes"]))
        refs = [self.workers[i].load_weights.remote(weights, packed) for i in targets]
        del packed  # the workers' tasks hold the buffers now; they leave the store after the last load
        results, failed = [], []
        for i, r in enumerate(refs):
            try:
                results.append(ray.get(r))
            except DEAD:
                failed.append(i)
        bad = [r for r in results if r["version"] != version]
        if bad:
            raise RuntimeError(f"weight sync to version {version} failed on {len(bad)} worker(s): {bad}")
        seconds = time.perf_counter() - t0
        load_s = max((r["seconds"] for r in results), default=0.0)
        held = (
            max((int(r.get("bytes", 0)) for r in results), default=0)
            or int(summary["numel"]) * getattr(torch, dtype_name(self.dtype)).itemsize
        )
        return SyncResult(
            version=version,
            bytes=held,
            seconds=seconds,
            failed=failed,
            metrics={
                "sync/seconds": seconds,
                "sync/export_s": t_export,
                "sync/pack_s": float(summary["pack_s"]),
                "sync/transfer_s": max(0.0, seconds - t_export - load_s),
                "sync/unpack_s": max((float(r.get("unpack_s", 0.0)) for r in results), default=0.0),
                "sync/load_s": load_s,
                "sync/mbytes": summary["wire_bytes"] / 1e6,
                "sync/mb_per_s": held / 1e6 / max(seconds, 1e-9),
            },
        )


# --------------------------------------------------------------------------------- GPU transfer
class NoGpuTransfer(RuntimeError):
    """The GPU path is not possible here (no CUDA, HF engine, odd placement)."""


class WeightSyncTimeout(RuntimeError):
    pass


def _norm(uuid: str | None) -> str | None:
    return None if uuid is None else str(uuid).lower().removeprefix("gpu-")


def plan_routes(learner_uuids: list[str | None], worker_uuids: list[list[str | None]]) -> list[dict[str, Any]]:
    """How each rollout worker receives, from the GPU of each learner rank and of each of the
    worker's vLLM processes. Pure.

    IPC when every GPU of the engine is some learner rank's GPU; NCCL with rank 0 when none of them
    is rank 0's (NCCL refuses two ranks of one group on one GPU); anything else cannot be served.
    """
    ranks = [_norm(u) for u in learner_uuids]
    if not ranks or ranks[0] is None:
        raise NoGpuTransfer("learner rank 0 has no CUDA device")
    routes = []
    for i, uuids in enumerate(worker_uuids):
        mine = [_norm(u) for u in uuids]
        if not mine or any(u is None for u in mine):
            raise NoGpuTransfer(f"rollout worker {i} has no CUDA device")
        if all(u in ranks for u in mine):
            routes.append({"kind": "ipc", "ranks": sorted({ranks.index(u) for u in mine})})
        elif ranks[0] in mine:
            raise NoGpuTransfer(
                f"rollout worker {i} shares learner rank 0's GPU with only part of its engine: "
                "neither CUDA IPC nor NCCL can reach all of it"
            )
        else:
            routes.append({"kind": "nccl", "world_size": 1 + len(mine)})
    return routes


class NcclWeightSync:
    """The GPU path's coordinator. It calls the learners' ``nccl_device_uuid`` / ``nccl_rendezvous``
    / ``nccl_init`` / ``nccl_send`` / ``nccl_close`` (learners/weight_sender.py) and the workers'
    ``pid`` / ``wt_probe`` / ``wt_shutdown`` (actors/weight_receiver.py); learner rank 0 drives
    the workers' ``wt_*`` loads itself."""

    def __init__(
        self,
        learners: list,
        workers: list,
        *,
        zero_stage: int,
        dtype: str,
        bucket_mb: float = DEFAULT_BUCKET_MB,
        timeout_s: float = 900.0,
    ):
        self.learners = learners
        self.workers = workers
        self.zero_stage = zero_stage  # every rank always takes part; kept for the interface
        self.dtype = dtype
        self.bucket_mb = bucket_mb
        self.timeout_s = timeout_s
        self.routes: list[dict | None] | None = None
        self._learner_uuids: list[str | None] | None = None
        self._pids: dict[int, int] = {}  # worker index → pid its transfer state was set up in
        self._route_pids: dict[int, int] = {}  # worker index → pid its route was probed in
        self._initialized = False

    # ----------------------------------------------------------------- setup
    def probe(self) -> list[dict | None]:
        """Routes from where everything runs (cached). Raises :class:`NoGpuTransfer` when the GPU
        path cannot serve this placement, RuntimeError when a worker is down."""
        dead = self._probe(None)
        if dead:
            raise RuntimeError(f"rollout worker(s) {dead} did not answer the GPU probe")
        return self.routes

    def _probe(self, indices: list[int] | None) -> list[int]:
        """Probe ``indices`` (default: every worker not probed yet) into ``routes``; returns the dead."""
        if self._learner_uuids is None:
            self._learner_uuids = self._wait(
                [ln.nccl_device_uuid.remote() for ln in self.learners], "learner GPU probe"
            )
        if self.routes is None:
            self.routes = [None] * len(self.workers)
        todo = [i for i, r in enumerate(self.routes) if r is None] if indices is None else list(indices)
        refs = {i: self.workers[i].wt_probe.remote() for i in todo}
        uuids, pids, dead = {}, {}, []
        for i, ref in refs.items():
            try:
                info = ray.get(ref, timeout=self.timeout_s)
            except DEAD:
                dead.append(i)
                continue
            uuids[i], pids[i] = info["uuids"], info["pid"]
        for i, route in zip(uuids, plan_routes(self._learner_uuids, list(uuids.values()))):
            self.routes[i] = route
            self._route_pids[i] = pids[i]
        return dead

    def _connect(self, targets: list[int]) -> tuple[float, list[int]]:
        """(Re)open transfer state for targets that are new or restarted. Returns (seconds, dead)."""
        refs = {i: self.workers[i].pid.remote() for i in targets}
        pids, dead = {}, []
        for i, ref in refs.items():
            try:
                pids[i] = ray.get(ref, timeout=self.timeout_s)
            except DEAD:
                dead.append(i)
        stale = [i for i in pids if self._pids.get(i) != pids[i]]
        if not stale and self._initialized:
            return 0.0, dead
        t0 = time.perf_counter()
        # A route holds for the process it was probed in: a restarted worker (whether or not an
        # earlier push lost it) may have come back on another GPU, so NCCL vs IPC is decided again.
        lost = self._probe([i for i in stale if self._route_pids.get(i) != pids[i]])
        dead += lost
        stale = [i for i in stale if i not in lost]
        routes = self.routes
        nccl = [i for i in stale if routes[i]["kind"] == "nccl"]
        connect: list[tuple[int, str, int]] = []
        if nccl:
            address, ports = ray.get(self.learners[0].nccl_rendezvous.remote(len(nccl)), timeout=self.timeout_s)
            connect = [(i, address, port) for i, port in zip(nccl, ports)]
        inits = self._wait(
            [
                ln.nccl_init.remote(
                    workers=self.workers if rank == 0 else None,
                    routes=routes,
                    connect=connect if rank == 0 else [],
                    dtype=self.dtype,
                    bucket_mb=self.bucket_mb,
                )
                for rank, ln in enumerate(self.learners)
            ],
            "NCCL group setup",
        )
        # Rank 0 lists the workers that died before their group opened; they get one after their restart.
        gone = [int(i) for i in (inits[0] or {}).get("failed", [])]
        dead += gone
        for i in stale:
            if i not in gone:
                self._pids[i] = pids[i]
        self._initialized = True
        return time.perf_counter() - t0, dead

    def _forget(self, i: int) -> None:
        """A lost worker is probed and reconnected on its next push (it comes back in a new process)."""
        self._pids.pop(i, None)
        self._route_pids.pop(i, None)

    def _wait(self, refs: list, what: str) -> list:
        """ray.get over a group, failing fast on the first error and after ``timeout_s``."""
        pending, deadline = list(refs), time.monotonic() + self.timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise WeightSyncTimeout(
                    f"{what} did not finish within {self.timeout_s:g}s (a rollout worker that died during an NCCL "
                    "broadcast leaves learner rank 0 waiting; the learner group has to be restarted)"
                )
            ray.get(done)
        return ray.get(list(refs))

    # ----------------------------------------------------------------- the contract
    def push(self, version: int, targets: list[int] | None = None) -> SyncResult:
        """Load ``version`` into the workers ``targets`` (all by default). Workers that died before
        or during the push are in the result's ``failed`` (indices into ``targets``)."""
        t0 = time.perf_counter()
        targets = _targets(targets, len(self.workers))
        setup_s, dead = self._connect(targets)
        live = [i for i in targets if i not in dead]
        results = self._wait([ln.nccl_send.remote(version, live) for ln in self.learners], "weight send")
        r0 = results[0]
        lost = sorted(set(dead) | set(r0["failed"]))
        for i in lost:
            self._forget(i)
        got = {int(i): r for i, r in r0["workers"].items()}
        bad = {i: r["version"] for i, r in got.items() if r["version"] != version}
        missing = [i for i in live if i not in got and i not in lost]
        if bad or missing:
            raise RuntimeError(
                f"weight sync to version {version} failed: workers at other versions {bad}, "
                f"workers that never confirmed {missing}"
            )
        routes = self.routes or []
        seconds = time.perf_counter() - t0
        return SyncResult(
            version=version,
            bytes=int(r0["bytes"]),
            seconds=seconds,
            failed=[targets.index(i) for i in lost],
            metrics={
                "sync/seconds": seconds,
                "sync/setup_s": setup_s,
                "sync/send_s": float(r0["send_s"]),
                "sync/load_s": max((float(r["seconds"]) for r in got.values()), default=0.0),
                "sync/mbytes": int(r0["bytes"]) / 1e6,
                "sync/buckets": float(r0["buckets"]),
                "sync/ipc_workers": float(sum(routes[i]["kind"] == "ipc" for i in live)),
                "sync/nccl_workers": float(sum(routes[i]["kind"] == "nccl" for i in live)),
            },
        )

    def close(self) -> None:
        """Tear the groups down (best effort; killing the actors does it too)."""
        refs = [ln.nccl_close.remote() for ln in self.learners] + [w.wt_shutdown.remote() for w in self.workers]
        for r in refs:
            try:
                ray.get(r, timeout=60)
            except Exception:
                pass


# --------------------------------------------------------------------------------- selection
def _why_not_gpu(spec, roles) -> str | None:
    """None when the GPU path can serve this job, else the reason (cheap checks first)."""
    if spec.rollout.engine != "vllm":
        return f"rollout.engine is '{spec.rollout.engine}' (vLLM's weight transfer needs the vllm engine)"
    if spec.resources.rollout.gpus <= 0 or spec.resources.learner.gpus <= 0:
        return "the rollout workers or the learner ranks have no GPU (resources.*.gpus)"
    return None


def pick_weight_sync(spec, roles, *, mode: str | None = None) -> WeightSync:
    """``NcclWeightSync`` when CUDA is available on the rollout workers and the spec allows it,
    else ``ObjectStoreSync``. ``mode`` (default ``spec.learner.weight_sync``): ``object_store`` never uses the GPU path, ``nccl`` requires it (raises
    :class:`NoGpuTransfer` with the reason), ``auto`` falls back to the object store."""
    mode = mode or spec.learner.weight_sync
    if mode not in MODES:
        raise ValueError(f"weight_sync must be one of {MODES} (got {mode!r})")
    dtype = spec.models.student.dtype
    fallback = ObjectStoreSync(
        roles.learners,
        roles.rollout,
        zero_stage=spec.learner.zero_stage,
        dtype=dtype,
        wire_dtype=spec.learner.weight_sync_dtype,
        bucket_mb=spec.learner.weight_sync_bucket_mb,
    )
    if mode == "object_store":
        return fallback
    reason = _why_not_gpu(spec, roles)
    sync = None
    if reason is None:
        sync = NcclWeightSync(
            roles.learners,
            roles.rollout,
            zero_stage=spec.learner.zero_stage,
            dtype=dtype,
            bucket_mb=spec.learner.weight_sync_bucket_mb,
        )
        try:
            sync.probe()  # asks each worker's vLLM engine for its GPU: "CUDA is available" for real
        except (NoGpuTransfer, RuntimeError, ray.exceptions.RayError) as err:
            reason, sync = str(err), None
    if sync is not None:
        return sync
    if mode == "nccl":
        raise NoGpuTransfer(f"learner.weight_sync is 'nccl' but the GPU path cannot be used: {reason}")
    if spec.resources.rollout.gpus > 0 and spec.resources.learner.gpus > 0:
        print(f"weight sync: object store, not NCCL/IPC ({reason})", file=sys.stderr)
    return fallback
