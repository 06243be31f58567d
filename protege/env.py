"""Process-wide defaults that make the real stack behave on a small CPU machine.

Each is a default only (``setdefault``): a user's own environment always wins. The reasons are
measured in ../shared/docs/platform.md.
"""

from __future__ import annotations

import os
import shutil


def has_cuda() -> bool:
    # nvidia-smi is cheaper than importing torch just to ask.
    return shutil.which("nvidia-smi") is not None and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""


def configure_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Actors' logs stream to the console: keep them to warnings so the progress bar stays readable.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Ray would otherwise spread a worker's default env; we pass ours explicitly per actor.
    if has_cuda():
        # vLLM's IPC weight transfer passes CUDA IPC handles to its engine process pickled (as
        # vLLM's own RLHF examples do); needed only by learner.weight_sync nccl/auto.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if not has_cuda():
        # Engine in-process: 3 s start instead of 15-28 s, and Ray's CPU accounting stays true.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # Without a bound vLLM reserves most of RAM for KV cache.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def worker_env() -> dict[str, str]:
    """Environment passed to every Ray actor of a job (runtime_env.env_vars)."""
    keys = [
        "TOKENIZERS_PARALLELISM", "VLLM_NO_USAGE_STATS", "VLLM_ENABLE_V1_MULTIPROCESSING",
        "VLLM_CPU_KVCACHE_SPACE", "DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE",
        "TORCH_EXTENSIONS_DIR", "HF_HOME", "VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY",
        "HF_HUB_DISABLE_PROGRESS_BARS", "VLLM_ALLOW_INSECURE_SERIALIZATION",
    ]
    return {k: os.environ[k] for k in keys if k in os.environ}
