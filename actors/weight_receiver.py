"""Rollout side of the weight sync: :class:`WeightReceiver`, which each :class:`RolloutWorker`
holds (``RolloutWorker.receiver``; the worker's ``load_weights`` / ``wt_*`` methods forward to it,
so learner rank 0 and the driver can call them as Ray actor methods). It owns the worker's policy
``version``: only a completed load sets it.

Two ways in:

- Object store: :meth:`WeightReceiver.load` takes a ``WeightsVersion`` and, beside it, the
  learner's ``PackedWeights`` (flat buffers that Ray maps from the object store without a copy);
  the tensors it hands the engine are views into those buffers, which the engine's layerwise
  reload (actors/vllm_ext.py) copies into its parameters: the one copy on this side. A
  ``WeightsVersion`` with safetensors bytes and no buffers still loads the old way.
- GPU: vLLM's native weight transfer into the running engine, driven by learner rank 0's
  ``RolloutClient`` (learners/weight_sender.py) through the worker's methods:

    wt_init(backend, init_info)   once per NCCL group (blocks in the rendezvous); every sync for IPC
    wt_start()                    LLM.start_weight_update: layerwise reload begins
    wt_update(update_info)        LLM.update_weights: one call per sync for NCCL (all packed
                                  buffers), one per packed buffer for IPC
    wt_finish(version)            LLM.finish_weight_update, then as in the CPU path: re-tie the
                                  lm_head to the embedding, reset the prefix cache, stamp version

vLLM creates its weight-transfer engine at load time only when ``weight_transfer_config`` is
given; VLLMEngine does not pass one (the backend depends on where Ray placed the engine, known
only later), so ``wt_init`` creates it in the vLLM worker with the same factory call vLLM's
``Worker.load_model`` makes. Everything else goes through ``LLM``'s own RL methods.

Worker-side code runs through ``collective_rpc``: by method name when the worker extension has
the :class:`TransferWorkerExtension` methods, else as a pickled function, which (like the CUDA IPC
handles themselves) needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` when the engine core runs in its
own process (vLLM's default on GPU; vLLM's rlhf_ipc.py example sets it the same way).

The GPU path has not run on hardware yet; see cluster/weight_sync.py.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import torch

from protege.core.records import PackedWeights, WeightsVersion
from protege.core.weights import tensor_views


# ------------------------------------------------------------------ inside the vLLM worker process
def _real(worker):
    """A function sent through ``collective_rpc`` gets vLLM's ``WorkerWrapperBase``, which forwards
    reads to the worker but would keep attributes set on it; methods of the extension get the
    worker itself."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    return worker.worker if isinstance(worker, WorkerWrapperBase) else worker


def _device_uuid(worker) -> str | None:
    worker = _real(worker)
    if not torch.cuda.is_available():
        return None
    index = worker.device.index if worker.device.index is not None else torch.cuda.current_device()
    return str(torch.cuda.get_device_properties(index).uuid)


def _create_transfer_engine(worker, backend: str) -> str:
    """Give the worker a weight-transfer engine for ``backend`` (kept when it already has one)."""
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    worker = _real(worker)
    current = getattr(worker, "weight_transfer_engine", None)  # vLLM's worker attribute, None until created
    if current is not None and current.config.backend == backend:
        return backend
    if getattr(worker, "_weight_update_active", False):
        raise RuntimeError("cannot switch the weight-transfer backend during a weight update")
    if current is not None:
        current.shutdown()
    worker.weight_transfer_engine = WeightTransferEngineFactory.create_engine(
        WeightTransferConfig(backend=backend), worker.vllm_config, worker.device, worker.model_runner.get_model()
    )
    return backend


def _retie(worker) -> bool:
    from protege.actors.vllm_ext import _retie_lm_head

    worker = _real(worker)
    _retie_lm_head(worker.model_runner.get_model())
    return True


class TransferWorkerExtension:
    """Optional: mixed into vllm_ext.WeightReloadExtension, these run by name (no pickled code)."""

    def protege_device_uuid(self) -> str | None:
        return _device_uuid(self)

    def protege_wt_create(self, backend: str) -> str:
        return _create_transfer_engine(self, backend)

    def protege_wt_retie(self) -> bool:
        return _retie(self)


_BY_NAME = {
    "protege_device_uuid": _device_uuid,
    "protege_wt_create": _create_transfer_engine,
    "protege_wt_retie": _retie,
}


def worker_rpc(llm, name: str, *args) -> list:
    """``llm.collective_rpc`` of one of the functions above, by name when the extension has it."""
    from protege.actors.vllm_ext import WeightReloadExtension

    method = name if hasattr(WeightReloadExtension, name) else _BY_NAME[name]
    return llm.collective_rpc(method, args=args)


def _engine_in_subprocess() -> bool:
    from vllm import envs

    return bool(envs.VLLM_ENABLE_V1_MULTIPROCESSING)


def _check_serialization(backend: str) -> None:
    """Fail with the fix, instead of vLLM's generic 'not serializable' deep in the first sync."""
    if not _engine_in_subprocess() or os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") == "1":
        return
    from protege.actors.vllm_ext import WeightReloadExtension

    if backend == "ipc" or not hasattr(WeightReloadExtension, "protege_wt_create"):
        raise RuntimeError(
            "GPU weight transfer into a vLLM engine core running in its own process needs "
            "VLLM_ALLOW_INSECURE_SERIALIZATION=1 in the rollout worker's environment before the engine starts "
            "(CUDA IPC handles and worker-side functions are pickled; vLLM's own rlhf_ipc.py sets it too), "
            "or VLLM_ENABLE_V1_MULTIPROCESSING=0"
        )


# ------------------------------------------------------------------ the receiver
class WeightReceiver:
    """One rollout worker's end of the weight sync, over its engine (``VLLMEngine`` or
    ``HFEngine``; the GPU path needs vLLM). ``version`` starts at 0, the initial student."""

    def __init__(self, engine, engine_kind: str):
        self.engine = engine
        self.engine_kind = engine_kind
        self.version = 0
        self._started: float | None = None  # perf_counter of the GPU update in progress, if any

    # -- object store
    def load(self, weights: WeightsVersion, packed: PackedWeights | None = None) -> dict[str, float]:
        """Load ``weights`` (its bytes, or ``packed``) in place. Returns ``{"version", "seconds"
        (the whole load), "unpack_s" (views from the buffers, or the blob's deserialisation inside
        "seconds"), "bytes" (what the engine now holds for them, in its own dtype)}``."""
        t0 = time.perf_counter()
        if packed is not None:
            with warnings.catch_warnings():  # the object store's buffers are read-only: nothing writes to them
                warnings.filterwarnings("ignore", message=".*not writable.*")
                buffers = [torch.from_numpy(b) for b in packed.buffers]
            named = tensor_views(packed.layout, buffers)
            unpack_s = time.perf_counter() - t0
            self.engine.load_tensors(named)
            numel = sum(t.numel() for _, t in named)
        elif weights.payload is not None:
            from safetensors.torch import load

            named = list(load(weights.payload).items())
            unpack_s = time.perf_counter() - t0
            self.engine.load_tensors(named)
            numel = sum(t.numel() for _, t in named)
        else:
            raise ValueError("RolloutWorker.load_weights needs a payload (bytes) or packed buffers")
        del named
        self.version = weights.version
        held = numel * getattr(torch, self.engine.dtype).itemsize
        return {"version": self.version, "seconds": time.perf_counter() - t0, "unpack_s": unpack_s, "bytes": held}

    # -- GPU
    def _vllm(self):
        """The engine's vLLM ``LLM`` (its RL methods do the transfer), or None for the HF engine."""
        return self.engine.llm if self.engine_kind == "vllm" else None

    def _llm(self):
        llm = self._vllm()
        if llm is None:
            raise RuntimeError(f"GPU weight transfer needs the vLLM engine (this worker runs '{self.engine_kind}')")
        return llm

    def probe(self) -> dict[str, Any]:
        """pid, and the GPU of each vLLM worker (None without CUDA): the driver picks NCCL or IPC."""
        llm = self._vllm()
        if llm is None or not torch.cuda.is_available():
            uuids: list[str | None] = [None]
        else:
            _check_serialization("nccl")
            uuids = list(worker_rpc(llm, "protege_device_uuid"))
        return {"pid": os.getpid(), "uuids": uuids, "engine": self.engine_kind}

    def init(self, backend: str, init_info: dict[str, Any]) -> dict[str, Any]:
        """Create the engine's weight-transfer engine (if needed) and run its handshake. For NCCL
        this blocks until learner rank 0 joins the same rendezvous."""
        _check_serialization(backend)
        llm = self._llm()
        if self._started is not None:
            self._abandon(llm)
        t0 = time.perf_counter()
        try:  # a previous connection (e.g. to a learner group since restarted) is released first
            llm.shutdown_weight_transfer_engine()
        except Exception:  # best effort: none configured yet is the common case
            pass
        worker_rpc(llm, "protege_wt_create", backend)
        llm.init_weight_transfer_engine({"init_info": dict(init_info)})
        return {"backend": backend, "seconds": time.perf_counter() - t0}

    def start(self) -> None:
        llm = self._llm()
        if self._started is not None:
            self._abandon(llm)
        llm.start_weight_update()
        self._started = time.perf_counter()

    def update(self, update_info) -> None:
        self._llm().update_weights({"update_info": update_info})

    def finish(self, version: int) -> dict[str, float]:
        llm = self._llm()
        llm.finish_weight_update(weight_version=str(version))
        # As in the CPU path (actors/vllm_ext.py): a tied lm_head must point at the new embedding,
        # and the prefix cache must not serve KV computed with the old weights.
        worker_rpc(llm, "protege_wt_retie")
        llm.reset_prefix_cache()
        started, self._started = self._started, None
        self.version = version
        return {"version": self.version, "seconds": time.perf_counter() - (started or time.perf_counter())}

    def shutdown(self) -> None:
        llm = self._vllm()
        if llm is not None:
            try:
                llm.shutdown_weight_transfer_engine()
            except Exception:  # best effort: not configured, or an update in progress
                pass

    def _abandon(self, llm) -> None:
        """A previous update never finished (its sender failed). Close it so vLLM accepts a new
        one; the weights are then partly new, and ``version`` is left as it was."""
        try:
            llm.finish_weight_update()
        except Exception:  # vLLM already closed it when the failed update raised
            pass
        finally:
            self._started = None
