"""Learner side of the weight sync: :class:`WeightSender`, which each :class:`Learner` rank holds
(``Learner.sender``; the Learner's ``export_weights`` / ``nccl_*`` methods forward to it, so the
driver's coordinator in cluster/weight_sync.py can call them as Ray actor methods).

Two ways out:

- Object store (every cluster): :meth:`WeightSender.pack` copies the full weights on rank 0
  into a few flat byte buffers per wire dtype (core/records.py ``PackedWeights``), one copy per
  parameter with the cast fused into it; under ZeRO-3 every rank walks the same buffer plan and
  gathers buffer by buffer together, so at most one buffer's parameters are gathered at a time.
  :meth:`WeightSender.export` (one safetensors blob) is kept for callers that want bytes.
- GPU (vLLM's native weight transfer): every rank takes part; rank 0 is the only sender.
  Parameters leave in buckets of at most ``bucket_bytes`` (one parameter larger than that
  travels alone): under ZeRO-3 every rank walks the same bucket plan and enters
  ``GatheredParameters`` together for each bucket, so the gathers line up and at most one bucket
  is ever materialised in full.
  - a rollout engine on a GPU no learner rank uses gets its own NCCL group with rank 0 (world 2),
    set up once, and receives packed buffers broadcast by rank 0;
  - a rollout engine on the GPU of a learner rank (colocated) gets CUDA IPC handles of packed
    buffers instead (NCCL refuses two ranks on one GPU); every rank exports its own copy, so the
    engine colocated with rank r reads rank r's memory.

The data plane is vLLM 0.32's own (vllm.distributed.weight_transfer). Its trainer engines drive
the whole round trip (start_weight_update → update_weights, concurrently with the data plane →
finish_weight_update) through a ``VLLMWeightSyncClient``; here the client is
:class:`RolloutClient`, which talks to RolloutWorker actors (actors/weight_receiver.py does the
receiving) and, unlike vLLM's ``RayVLLMWeightSyncClient``, keeps going when one of them has died,
listing it in ``failed`` so the driver can re-sync it after its restart.

- NCCL: one group per rollout engine (:func:`connect_nccl`: ``NCCLTrainerWeightTransferEngine.
  trainer_init`` with world size 2), so a restarted engine only needs its own group rebuilt. Each
  sync gathers the weights once and broadcasts every packed buffer over each engine's group
  (:class:`FanOutGroup`) through vLLM's ``send_weights``.
- IPC: ``IPCTrainerWeightTransferEngine`` (packed), built per sync on every learner rank.

vLLM, Ray and DeepSpeed are imported inside the functions that use them: importing this module
(and so learners/learner.py) loads none of them. The GPU path has not run on hardware yet; see
cluster/weight_sync.py.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch

from protege.core.env import free_ports
from protege.core.records import PackedWeights
from protege.core.weights import (
    DEFAULT_BUCKET_MB,
    dtype_name,
    meta_bytes,
    param_bytes,
    plan_buckets,
    plan_packed,
    tensor_views,
    wire_meta,
)

PACKED_NUM_BUFFERS = 2  # vLLM's default double buffering


def _dead() -> tuple[type[BaseException], ...]:
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


# ------------------------------------------------------------------------------------- the sender
class WeightSender:
    """One learner rank's end of the weight sync.

    ``module`` returns the model whose parameters leave (the DeepSpeed engine's ``module``; read at
    each call, since the engine is built after the sender). Called by cluster/weight_sync.py
    through the Learner on every rank, in this order for the GPU path: :meth:`device_uuid`
    (probe), :meth:`init` (once, and again for a restarted rollout worker), :meth:`send` (each
    sync); :meth:`export` for the object store.
    """

    def __init__(self, module: Callable[[], torch.nn.Module], *, rank: int, zero_stage: int):
        self.module = module
        self.rank = rank
        self.zero_stage = zero_stage
        # GPU transfer state, set by init(): rank 0's NCCL engine per worker index, the routes
        # (one per worker), the rollout worker actors (rank 0), the wire dtype and bucket size.
        self.engines: dict[int, Any] = {}
        self.routes: list[dict | None] | None = None
        self.workers: list = []
        self.dtype = "float32"
        self.bucket_bytes = int(DEFAULT_BUCKET_MB * (1 << 20))
        self._packed: tuple[tuple[int, ...], list[torch.Tensor]] | None = None  # rank 0's flat buffers, reused

    # -- object store, packed
    def pack(
        self, wire_dtype: str | None = None, bucket_mb: float = DEFAULT_BUCKET_MB
    ) -> tuple[dict[str, Any], PackedWeights | None]:
        """The full weights as :class:`PackedWeights` on rank 0 (None elsewhere), each parameter in
        ``wire_dtype`` (None: its own, the training dtype), and a small summary for the driver:
        ``{"pack_s", "wire_bytes", "numel"}``. Under ZeRO-3 every rank must call this together."""
        t0 = time.perf_counter()
        zero3, sender = self.zero_stage == 3, self.rank == 0
        if not (zero3 or sender):
            return {}, None
        params = dict(self.module().named_parameters())  # deduplicates tied weights (lm_head ↔ embed)
        meta = [
            (n, [int(s) for s in getattr(p, "ds_shape", p.shape)], dtype_name(wire_dtype or p.dtype))
            for n, p in params.items()
        ]
        layout, sizes = plan_packed(meta, int(bucket_mb * (1 << 20)))
        buffers = self._buffers(sizes) if sender else []
        views = dict(tensor_views(layout, buffers)) if sender else {}
        groups: dict[int, list[str]] = {}
        for name, _, _, b, _ in layout:
            groups.setdefault(b, []).append(name)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the optimizer's last writes land before they are read
        for names in groups.values():  # the same plan on every rank: the gathers line up
            group = [params[n] for n in names]
            with self._gathered(group) if zero3 else nullcontext():
                if sender:
                    with torch.no_grad():
                        for name, p in zip(names, group):
                            views[name].copy_(p.detach())  # the cast (and a GPU's device copy) in the same pass
        if not sender:
            return {}, None
        pack_s = time.perf_counter() - t0
        packed = PackedWeights(layout=layout, buffers=[b.numpy() for b in buffers], pack_s=pack_s)
        numel = sum(math.prod(shape) for _, shape, _, _, _ in layout)
        return {"pack_s": pack_s, "wire_bytes": packed.nbytes(), "numel": numel}, packed

    def _buffers(self, sizes: list[int]) -> list[torch.Tensor]:
        """Flat uint8 buffers of ``sizes``, kept from the last sync when the plan is the same (fresh
        pages cost a page fault each). Safe to reuse: Ray has copied a method's return value into
        the object store before the actor runs its next method."""
        key = tuple(sizes)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, [torch.empty(n, dtype=torch.uint8) for n in sizes])
        return self._packed[1]

    # -- object store
    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Full parameters on rank 0 (all ranks must call this together under ZeRO-3)."""
        model = self.module()
        named = list(model.named_parameters())  # deduplicates tied weights (lm_head ↔ embed)
        if self.zero_stage == 3:
            import deepspeed

            state = {}
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                if self.rank == 0:
                    state = {n: p.detach().to("cpu", copy=True) for n, p in named}
            return state if self.rank == 0 else None
        if self.rank != 0:
            return None
        return {n: p.detach().to("cpu", copy=True) for n, p in named}

    def export(self, dtype: str = "float32") -> bytes | None:
        """Safetensors bytes of the full student (rank 0), cast to the rollout dtype."""
        from safetensors.torch import save

        state = self.full_state()
        if state is None:
            return None
        dt = getattr(torch, dtype_name(dtype))
        return save({k: v.to(dt).contiguous() for k, v in state.items()})

    # -- GPU probes
    def device_uuid(self) -> str | None:
        """This rank's GPU (the key CUDA IPC handles use), or None without CUDA."""
        if not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)

    def rendezvous(self, count: int) -> tuple[str, list[int]]:
        """This node's address and ``count`` free ports (rank 0 hosts each group's TCP store)."""
        return free_ports(count)

    def meta(self, dtype: str) -> list[tuple[str, list[int], str]]:
        return wire_meta(self.module(), dtype)

    # -- GPU setup
    def init(
        self,
        *,
        workers: list | None,
        routes: list[dict],
        connect: list[tuple[int, str, int]],
        dtype: str,
        bucket_mb: float = DEFAULT_BUCKET_MB,
    ) -> dict[str, Any]:
        """Record the routes (all ranks) and, on rank 0, open an NCCL group with each worker in
        ``connect`` (``(worker index, address, port)``). A worker connected before (it restarted)
        gets a new group; the old communicator is aborted (vLLM's ``destroy`` aborts without
        waiting for the peer, which is gone). A worker that died before its group opened is
        listed in ``failed`` (rank 0's answer) and the others are still connected."""
        t0 = time.perf_counter()
        self.routes = list(routes)
        self.dtype = dtype_name(dtype)
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        if workers is not None:
            self.workers = list(workers)
        for idx in [i for i in self.engines if (routes[i] or {}).get("kind") != "nccl"]:
            self._drop(idx)  # restarted onto a learner's GPU: its old group is dead, IPC serves it now
        failed: list[int] = []
        if self.rank == 0:
            for idx, address, port in connect:
                self._drop(idx)
                try:
                    self.engines[idx] = connect_nccl(
                        self.workers[idx],
                        address=address,
                        port=port,
                        world_size=int(routes[idx].get("world_size", 2)),
                        bucket_bytes=self.bucket_bytes,
                    )
                except WorkerGone:
                    failed.append(idx)  # the driver re-syncs it after its restart
        connected = [c[0] for c in connect if c[0] not in failed] if self.rank == 0 else []
        return {"rank": self.rank, "connected": connected, "failed": failed, "seconds": time.perf_counter() - t0}

    # -- each GPU sync
    def send(self, version: int, targets: list[int]) -> dict[str, Any] | None:
        """Send the current weights to the rollout workers ``targets`` (indices, same list on every
        rank). Rank 0 returns ``{"failed": [...], "workers": {i: {"version", "seconds"}}, "bytes",
        "buckets", "send_s"}`` (``bytes``: the weights in the wire dtype, what each worker ends up
        holding); a worker that died during the send is listed in ``failed``; the others return None."""
        if self.routes is None:
            raise RuntimeError("WeightSender.send before init")
        t0 = time.perf_counter()
        dtype, bucket = self.dtype, self.bucket_bytes
        meta = wire_meta(self.module(), dtype)
        plan = plan_buckets(meta, bucket)
        routes = self.routes
        ipc = [i for i in targets if routes[i]["kind"] == "ipc"]
        nccl = [i for i in targets if routes[i]["kind"] == "nccl"]
        sender = self.rank == 0
        workers = self.workers
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the optimizer's last writes land before any other stream reads them
        failed: list[int] = []
        results: dict[int, dict] = {}
        if ipc:
            # Every rank materialises: the engine colocated with rank r maps rank r's buffer.
            src = bucket_source(meta, lambda: self._bucket_pairs(plan, dtype, materialize=True))
            largest = max((param_bytes(s, d) for _, s, d in meta), default=1)
            client = send_ipc(
                {i: workers[i] for i in ipc} if sender else {},
                src,
                rank=self.rank,
                version=version,
                buffer_bytes=max(bucket, largest),
            )
            if sender:
                failed += client.failed
                results.update(client.results)
        # Off rank 0 the NCCL pass only joins ZeRO-3 gathers; without ZeRO-3 there is nothing to join.
        if nccl and (sender or self.zero_stage == 3):
            engines = {i: self.engines[i] for i in nccl if i in self.engines} if sender else {}
            if sender:
                failed += [i for i in nccl if i not in engines]  # never connected: the driver reconnects it
            src = bucket_source(meta, lambda: self._bucket_pairs(plan, dtype, materialize=sender))
            client = send_nccl(
                engines,
                {i: workers[i] for i in engines} if sender else {},
                src,
                is_sender=sender,
                version=version,
                bucket_bytes=bucket,
            )
            if sender:
                failed += client.failed
                results.update(client.results)
        if not sender:
            return None
        for i in failed:
            self._drop(i)  # its group is unusable; reconnected after the restart
        return {
            "version": version,
            "failed": sorted(set(failed)),
            "workers": results,
            "bytes": meta_bytes(meta),
            "buckets": len(plan),
            "send_s": time.perf_counter() - t0,
        }

    def close(self) -> None:
        for i in list(self.engines):
            self._drop(i)
        self.routes = None

    # -- internals
    def _drop(self, idx: int) -> None:
        eng = self.engines.pop(idx, None)
        if eng is not None:
            _shutdown(eng)

    def _gathered(self, params: list):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def _bucket_pairs(
        self, plan: list[list[str]], dtype: str, *, materialize: bool
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in plan order, one ZeRO-3 gather per bucket on every rank.

        ``materialize``: yield a cast copy that outlives the gather (the sender, and every rank
        for IPC); otherwise the gathered parameter itself (a rank that only joins the gathers).
        vLLM packs these on its own CUDA streams, so the device is synchronised after each gather
        (the gathered values are visible to every stream) and before leaving it (the copies are
        done before DeepSpeed frees the full parameters).
        """
        params = dict(self.module().named_parameters())
        zero3 = self.zero_stage == 3
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


# ------------------------------------------------------------------ adapters to vLLM's trainer side
class WorkerGone(RuntimeError):
    """The rollout worker died before or while joining its NCCL group: the caller reports it in
    ``failed`` instead of failing the push for everyone."""


@functools.cache
def _bucket_source_cls():
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class BucketSource(WeightSource):
        """A ``WeightSource`` over ``(name, full shape, wire dtype)`` metadata and a factory of
        ``(name, tensor)`` iterators (a fresh pass per call, as vLLM requires)."""

        def __init__(
            self,
            meta: Sequence[tuple[str, Sequence[int], str]],
            pairs: Callable[[], Iterator[tuple[str, torch.Tensor]]],
        ):
            self._meta = [ParamMeta(n, getattr(torch, d), tuple(int(s) for s in shape)) for n, shape, d in meta]
            self._pairs = pairs

        def metadata(self) -> list[ParamMeta]:
            return list(self._meta)

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            return iter(self._pairs())

    return BucketSource


def bucket_source(
    meta: Sequence[tuple[str, Sequence[int], str]], pairs: Callable[[], Iterator[tuple[str, torch.Tensor]]]
):
    """vLLM's ``WeightSource`` over ``meta`` and ``pairs`` (the class is built at the first call,
    so that importing this module does not import vLLM)."""
    return _bucket_source_cls()(meta, pairs)


class RolloutClient:
    """``VLLMWeightSyncClient`` over RolloutWorker actors (their ``wt_init``/``wt_start``/
    ``wt_update``/``wt_finish`` methods, actors/weight_receiver.py). Each call fans out to the live
    workers and waits for all; a worker that died moves to ``failed`` instead of failing the call.
    ``results`` holds each worker's ``wt_finish`` answer (its new version and load seconds)."""

    def __init__(self, workers: dict[int, Any], *, backend: str, version: int | None = None):
        self.workers = dict(workers)
        self.backend = backend
        self.version = version
        self.failed: list[int] = []
        self.results: dict[int, dict] = {}

    @property
    def live(self) -> list[int]:
        return [i for i in self.workers if i not in self.failed]

    def _call(self, method: str, *args) -> dict[int, Any]:
        import ray

        refs = {i: getattr(self.workers[i], method).remote(*args) for i in self.live}
        out = {}
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref)
            except _dead():
                self.failed.append(i)
        return out

    def ping(self) -> list[int]:
        """The workers that are dead now (also moved to ``failed``): Ray fails a call to a dead
        actor at once, while a live one answers after what it is running."""
        self._call("__ray_ready__")
        return list(self.failed)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("wt_init", self.backend, init_info)

    def start_weight_update(self) -> None:
        self._call("wt_start")

    def update_weights(self, update_info) -> None:
        self._call("wt_update", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.results.update(self._call("wt_finish", self.version))


class _NoClient:
    """For non-sender ranks: vLLM's engines never call it there, but the constructor wants one."""

    def init_weight_transfer_engine(self, init_info) -> None: ...
    def start_weight_update(self) -> None: ...
    def update_weights(self, update_info) -> None: ...
    def finish_weight_update(self, weight_version=None) -> None: ...


class FanOutGroup:
    """One packed buffer, broadcast from rank 0 over each live engine's own NCCL group in turn.

    vLLM's packed producer only calls ``group.broadcast(tensor, src=0)``; the broadcasts queue on
    the producer's stream, and each engine receives on its own group, so the order cannot cross.
    """

    def __init__(self, comms: dict[int, Any], client: RolloutClient):
        self.comms = comms
        self.client = client

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream=None) -> None:
        for i in self.client.live:
            self.comms[i].broadcast(tensor, src=src, stream=stream)


def connect_nccl(worker, *, address: str, port: int, world_size: int, bucket_bytes: int):
    """Open an NCCL group (rank 0 here, the engine's workers after it) with one rollout worker.

    vLLM's ``trainer_init`` calls the worker's ``init_weight_transfer_engine`` on a side thread
    while it opens rank 0, since both block in the same rendezvous. The packed wire parameters
    travel to the worker here, so both sides cut the stream into the same buffers.

    Raises :class:`WorkerGone` when the worker is dead. Rank 0 waits in the rendezvous for its
    peer until vLLM's TCP-store timeout (300 s, not settable through ``trainer_init``), so the
    worker is asked first and a dead one never gets a rendezvous; one that dies in the short
    window after that is still reported, once the store gives up.
    """
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    client = RolloutClient({0: worker}, backend="nccl")
    if client.ping():
        raise WorkerGone("rollout worker is dead; its weight-transfer NCCL group was not opened")
    info = NCCLTrainerInitInfo(
        rank=0,
        master_address=address,
        master_port=port,
        world_size=world_size,
        packed=True,
        packed_buffer_size_bytes=bucket_bytes,
        packed_num_buffers=PACKED_NUM_BUFFERS,
    )
    try:
        engine = WeightTransferTrainerFactory.trainer_init(
            info, client=client, source=bucket_source([], lambda: iter(()))
        )
    except Exception as err:
        if client.failed:  # rank 0 gave up waiting because its peer had died
            raise WorkerGone("rollout worker died while joining the weight-transfer NCCL group") from err
        raise
    if client.failed:
        _shutdown(engine)  # rank 0's side opened, but the peer is gone: the group is unusable
        raise WorkerGone("rollout worker died while joining the weight-transfer NCCL group")
    return engine


def _shutdown(engine) -> None:
    try:
        engine.shutdown()
    except Exception:  # best effort: the peer is gone
        pass


def send_nccl(
    engines: dict[int, Any], workers: dict[int, Any], source, *, is_sender: bool, version: int, bucket_bytes: int
) -> RolloutClient | None:
    """One ``send_weights`` round over every engine in ``engines`` (sender) or the gather-only walk
    of ``source`` (other ranks). ``bucket_bytes`` must be the value the groups were opened with."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    if not is_sender:
        NCCLTrainerWeightTransferEngine(client=_NoClient(), source=source, is_sender=False).send_weights()
        return None
    client = RolloutClient(workers, backend="nccl", version=version)
    agg = NCCLTrainerWeightTransferEngine(
        client=client,
        source=source,
        is_sender=True,
        packed=True,
        packed_buffer_size_bytes=bucket_bytes,
        packed_num_buffers=PACKED_NUM_BUFFERS,
    )
    agg.model_update_group = FanOutGroup({i: e.model_update_group for i, e in engines.items()}, client)
    agg.send_weights()
    return client


def send_ipc(
    workers: dict[int, Any], source, *, rank: int, version: int, buffer_bytes: int
) -> RolloutClient | _NoClient:
    """One packed CUDA-IPC round. Called on every learner rank (vLLM all-gathers the handles over
    the default process group, so the engine colocated with rank r finds rank r's buffer);
    rank 0 drives the workers. ``buffer_bytes`` must hold the largest parameter."""
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

    client: RolloutClient | _NoClient = (
        RolloutClient(workers, backend="ipc", version=version) if rank == 0 else _NoClient()
    )
    info = IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=buffer_bytes)
    # trainer_init ships {"packed": True} to the workers (wt_init), which also creates the
    # engine in a worker that restarted since the last sync.
    engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
    engine.send_weights()
    return client
