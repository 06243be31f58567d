"""RolloutWorker: prompts in, sampled responses out, stamped with the policy version.

A plain class (cluster/launch.py makes it a Ray actor). It never generates from weights it
was not told about: ``version`` is set only by a completed weight load (its receiver,
actors/weight_receiver.py: ``load_weights`` or the GPU path's ``wt_finish``), and a freshly
started worker is at version 0, the initial student, until the driver syncs it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from protege.actors.engine import make_engine
from protege.actors.weight_receiver import WeightReceiver
from protege.core.records import PackedWeights, Rollout, WeightsVersion
from protege.core.console import capture_actor_output
from protege.core.env import apply_cpu_threads, configure_node_defaults


class StaleWeights(RuntimeError):
    """The worker's weights are not the version the driver expects (e.g. it was restarted)."""


class RolloutWorker:
    def __init__(
        self,
        model: str,
        *,
        engine: str = "vllm",
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 512,
        kv_cache_bytes: int = 256 << 20,
        gpu_memory_utilization: float = 0.3,
        compiled: bool = False,
        threads: int | str = 1,
        workers: int = 1,
        overlap: bool = False,
    ):
        capture_actor_output()  # third-party output to RUN_DIR/logs (core/console.py)
        configure_node_defaults()  # this node's hardware decides, before vLLM reads its environment
        self.engine_kind = engine
        # Before the engine exists: vLLM's CPU worker replaces torch.set_num_threads with a no-op when
        # it starts, so the engine computes with the count set here for the life of the process.
        apply_cpu_threads(threads, sharers=workers, overlap=overlap)
        self.engine = make_engine(
            engine,
            model,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            kv_cache_bytes=kv_cache_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            **({"enforce_eager": not compiled} if engine == "vllm" else {}),
        )
        self.receiver = WeightReceiver(self.engine, engine)  # object store and GPU (NCCL/IPC) loads
        self.eos_id = self.engine.tokenizer.eos_token_id

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | None = None,
        first_index: int = 0,
        expected_version: int | None = None,
    ) -> dict[str, Any]:
        """Returns {"rollouts": [Rollout] group-major, "tokens": int, "seconds": float, "version": int}.

        ``expected_version`` guards against generating from the wrong weights: a worker that Ray
        restarted comes back with the initial student (version 0) until the driver re-syncs it.
        """
        if expected_version is not None and expected_version != self.version:
            raise StaleWeights(f"worker holds policy version {self.version}, driver expects {expected_version}")
        t0 = time.perf_counter()
        groups = self.engine.generate(
            prompts,
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=[self.eos_id],
        )
        rollouts = [
            Rollout(example_index=first_index + i, prompt_ids=list(p), sample=s, policy_version=self.version)
            for i, (p, group) in enumerate(zip(prompts, groups))
            for s in group
        ]
        return {
            "rollouts": rollouts,
            "tokens": sum(len(r.sample.response_ids) for r in rollouts),
            "seconds": time.perf_counter() - t0,
            "version": self.version,
        }

    @property
    def version(self) -> int:
        """The policy version of the weights the engine holds (the receiver's)."""
        return self.receiver.version

    # Weight loads, forwarded to the receiver (Ray calls these actor methods).
    def load_weights(self, weights: WeightsVersion, packed: PackedWeights | None = None) -> dict[str, float]:
        return self.receiver.load(weights, packed)

    def wt_probe(self) -> dict[str, Any]:
        return self.receiver.probe()

    def wt_init(self, backend: str, init_info: dict[str, Any]) -> dict[str, Any]:
        return self.receiver.init(backend, init_info)

    def wt_start(self) -> None:
        self.receiver.start()

    def wt_update(self, update_info) -> None:
        self.receiver.update(update_info)

    def wt_finish(self, version: int) -> dict[str, float]:
        return self.receiver.finish(version)

    def wt_shutdown(self) -> None:
        self.receiver.shutdown()

    def score(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        return self.engine.score(prompt_ids, response_ids)

    def get_version(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.engine.close()
