"""Trainer-side adapters to vLLM 0.32's weight-transfer API (vllm.distributed.weight_transfer).

Used by the learner (learners/nccl_sender.py) so that vLLM imports stay inside actors/. vLLM's
trainer engines drive the whole round trip (start_weight_update → update_weights, concurrently
with the data plane → finish_weight_update) through a ``VLLMWeightSyncClient``; here the client is
:class:`RolloutClient`, which talks to RolloutWorker actors (actors/nccl_receiver.py) and, unlike
vLLM's ``RayVLLMWeightSyncClient``, keeps going when one of them has died, listing it in
``failed`` so the driver can re-sync it after its restart.

- NCCL: one group per rollout engine (``connect_nccl``: ``NCCLTrainerWeightTransferEngine.
  trainer_init`` with world size 2), so a restarted engine only needs its own group rebuilt. Each
  sync gathers the weights once and broadcasts every packed buffer over each engine's group
  (:class:`FanOutGroup`) through vLLM's ``send_weights``.
- IPC: ``IPCTrainerWeightTransferEngine`` (packed), built per sync on every learner rank.

Not run on hardware yet (written against the vLLM 0.32 source; see cluster/nccl_sync.py).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import ray
import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

DEAD = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
PACKED_NUM_BUFFERS = 2  # vLLM's default double buffering


class WorkerGone(RuntimeError):
    """The rollout worker died before or while joining its NCCL group: the caller reports it in
    ``failed`` instead of failing the push for everyone."""


class BucketSource(WeightSource):
    """A ``WeightSource`` over ``(name, full shape, wire dtype)`` metadata and a factory of
    ``(name, tensor)`` iterators (a fresh pass per call, as vLLM requires)."""

    def __init__(self, meta: Sequence[tuple[str, Sequence[int], str]],
                 pairs: Callable[[], Iterator[tuple[str, torch.Tensor]]]):
        self._meta = [ParamMeta(n, getattr(torch, d), tuple(int(s) for s in shape)) for n, shape, d in meta]
        self._pairs = pairs

    def metadata(self) -> list[ParamMeta]:
        return list(self._meta)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._pairs())


class RolloutClient:
    """``VLLMWeightSyncClient`` over RolloutWorker actors that have the WeightTransferReceiver
    methods (``wt_init``/``wt_start``/``wt_update``/``wt_finish``). Each call fans out to the live
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
        refs = {i: getattr(self.workers[i], method).remote(*args) for i in self.live}
        out = {}
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref)
            except DEAD:
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
    info = NCCLTrainerInitInfo(rank=0, master_address=address, master_port=port, world_size=world_size,
                               packed=True, packed_buffer_size_bytes=bucket_bytes,
                               packed_num_buffers=PACKED_NUM_BUFFERS)
    try:
        engine = WeightTransferTrainerFactory.trainer_init(info, client=client,
                                                           source=BucketSource([], lambda: iter(())))
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


def send_nccl(engines: dict[int, Any], workers: dict[int, Any], source: BucketSource, *, is_sender: bool,
              version: int, bucket_bytes: int) -> RolloutClient | None:
    """One ``send_weights`` round over every engine in ``engines`` (sender) or the gather-only walk
    of ``source`` (other ranks). ``bucket_bytes`` must be the value the groups were opened with."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    if not is_sender:
        NCCLTrainerWeightTransferEngine(client=_NoClient(), source=source, is_sender=False).send_weights()
        return None
    client = RolloutClient(workers, backend="nccl", version=version)
    agg = NCCLTrainerWeightTransferEngine(client=client, source=source, is_sender=True, packed=True,
                                          packed_buffer_size_bytes=bucket_bytes, packed_num_buffers=PACKED_NUM_BUFFERS)
    agg.model_update_group = FanOutGroup({i: e.model_update_group for i, e in engines.items()}, client)
    agg.send_weights()
    return client


def send_ipc(workers: dict[int, Any], source: BucketSource, *, rank: int, version: int,
             buffer_bytes: int) -> RolloutClient | _NoClient:
    """One packed CUDA-IPC round. Called on every learner rank (vLLM all-gathers the handles over
    the default process group, so the engine colocated with rank r finds rank r's buffer);
    rank 0 drives the workers. ``buffer_bytes`` must hold the largest parameter."""
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

    client: RolloutClient | _NoClient = RolloutClient(workers, backend="ipc", version=version) if rank == 0 else _NoClient()
    info = IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=buffer_bytes)
    # trainer_init ships {"packed": True} to the workers (wt_init), which also creates the
    # engine in a worker that restarted since the last sync.
    engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
    engine.send_weights()
    return client
