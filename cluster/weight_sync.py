"""Versioned weight sync: learner → rollout engines (docs/design.md, "Weight sync").

One small interface: ``push(version)`` exports the learner's full weights and loads them into
every rollout worker; every rollout then records the version that generated it.

``ObjectStoreSync`` (CPU and any cluster): learner rank 0 packs all parameters into one
safetensors blob (under ZeRO-3 all ranks gather together first), the blob goes into Ray's
object store once, and each worker loads it through vLLM's layerwise reload (tied embeddings
re-tied, prefix cache reset; actors/vllm_ext.py). One transfer per sync, never one call per
parameter.
"""

from __future__ import annotations

import time
from typing import Protocol

import ray

from protege.cluster.launch import gather
from protege.core.records import WeightsVersion


class WeightSender(Protocol):
    def push(self, version: int) -> dict[str, float]: ...


class ObjectStoreSync:
    def __init__(self, learners: list, workers: list, *, zero_stage: int, dtype: str):
        self.learners = learners
        self.workers = workers
        self.zero_stage = zero_stage
        self.dtype = dtype
        self.failed: list[int] = []

    def export(self) -> bytes:
        # ZeRO-3 shards parameters: every rank must enter the gather together.
        callers = self.learners if self.zero_stage == 3 else self.learners[:1]
        payloads = gather([ln.export_weights.remote(self.dtype) for ln in callers])
        return payloads[0]

    def push(self, version: int, workers: list | None = None) -> dict[str, float]:
        """Load ``version`` into the workers. Workers that died during the load are listed in
        ``failed`` (indices into ``workers``) for the caller to re-sync after their restart."""
        t0 = time.perf_counter()
        payload = self.export()
        t_export = time.perf_counter() - t0
        ref = ray.put(WeightsVersion(version=version, payload=payload, num_bytes=len(payload)))
        targets = workers or self.workers
        refs = [w.load_weights.remote(ref) for w in targets]
        results, self.failed = [], []
        for i, r in enumerate(refs):
            try:
                results.append(ray.get(r))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self.failed.append(i)
        bad = [r for r in results if r["version"] != version]
        if bad:
            raise RuntimeError(f"weight sync to version {version} failed on {len(bad)} worker(s): {bad}")
        return {
            "sync/seconds": time.perf_counter() - t0,
            "sync/export_s": t_export,
            "sync/load_s": max((r["seconds"] for r in results), default=0.0),
            "sync/mbytes": len(payload) / 1e6,
        }
