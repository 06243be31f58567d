"""Process-wide defaults that make the real stack behave on a small CPU machine.

Each is a default only (``setdefault``): a user's own environment always wins.

Two kinds. Quiet defaults (logging, telemetry, tokenizer threads) are right everywhere. Node
defaults depend on the hardware of the machine a process runs on (no CUDA: engine in-process, CPU
DeepSpeed, one OpenMP thread), so they are decided where each actor runs
(:func:`configure_node_defaults` at the top of every actor's ``__init__``), never shipped from the
driver: a CPU laptop driving a GPU cluster must not hand its CPU defaults to the GPU nodes.
"""

from __future__ import annotations

import os
import shutil

# Node defaults for a machine without CUDA. On a GPU node none applies (vLLM, DeepSpeed and Ray
# pick the right values there by themselves).
CPU_NODE_DEFAULTS = {
    # Engine in-process: 3 s start instead of 15-28 s, and Ray's CPU accounting stays true.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # Without a bound vLLM reserves most of RAM for KV cache.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
}

# What worker_env() passes to actors when the user set it: the node defaults above (a user's choice
# applies everywhere), the quiet defaults, and paths/modes that mean the same on every node.
WORKER_KEYS = [
    "TOKENIZERS_PARALLELISM",
    "VLLM_NO_USAGE_STATS",
    *CPU_NODE_DEFAULTS,
    "HF_HUB_OFFLINE",
    "TORCH_EXTENSIONS_DIR",
    "HF_HOME",
    "VLLM_LOGGING_LEVEL",
    "TRANSFORMERS_VERBOSITY",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "VLLM_ALLOW_INSECURE_SERIALIZATION",
]

# Keys this process set as node defaults itself (not the user): worker_env() keeps them off a cluster.
_node_defaulted: set[str] = set()


def has_cuda() -> bool:
    # nvidia-smi is cheaper than importing torch just to ask.
    return shutil.which("nvidia-smi") is not None and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""


def node_defaults(cuda: bool) -> dict[str, str]:
    """Pure: the hardware-dependent defaults for a node with or without CUDA."""
    return {} if cuda else dict(CPU_NODE_DEFAULTS)


def cpu_threads(choice: int | str, *, node_cpus: int, sharers: int, overlap: bool, cuda: bool) -> int | None:
    """Pure: the torch threads a CPU rollout engine or learner rank computes with
    (``rollout.cpu_threads``, ``learner.cpu_threads``).

    Every CPU actor starts at one OpenMP thread (``CPU_NODE_DEFAULTS``) so that roles running at the
    same time do not oversubscribe the cores. With ``max_staleness: 0`` they do not: generation runs
    while the learner ranks wait, and training while the engines wait, so one thread left cores idle
    (SmolLM2-10l on 2 cores: a batch's generation 3.6 s on one thread, 2.4 s on two; a forward +
    backward 9.4 s and 5.8 s; bench/reports/peer_trl.json, floor). "auto" gives each of the
    ``sharers`` (rollout workers, or learner ranks) its share of the node's cores, or one thread when
    generation overlaps training (``overlap``: staleness ≥ 1). None on CUDA, where it does not apply.
    """
    if cuda:
        return None
    if choice != "auto":
        return int(choice)
    return 1 if overlap else max(1, node_cpus // max(1, sharers))


def apply_cpu_threads(choice: int | str, *, sharers: int, overlap: bool) -> int | None:
    """Resolve :func:`cpu_threads` on this node and set torch's count; returns it (None on CUDA).
    A rollout worker calls it before its engine starts (vLLM's CPU worker turns
    ``torch.set_num_threads`` into a no-op once it runs)."""
    threads = cpu_threads(choice, node_cpus=os.cpu_count() or 1, sharers=sharers, overlap=overlap, cuda=has_cuda())
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return threads


def configure_node_defaults() -> dict[str, str]:
    """setdefault this machine's node defaults; returns the ones it set. Call it first thing in an
    actor's ``__init__``: vLLM and DeepSpeed read these when the engine / accelerator is created."""
    applied = {}
    for key, value in node_defaults(has_cuda()).items():
        if key not in os.environ:
            os.environ[key] = value
            _node_defaulted.add(key)
            applied[key] = value
    return applied


def configure_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Actors' logs stream to the console: keep them to warnings so the progress bar stays readable.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The driver's own in-process work (tiny models, demo, an embedded Ray's actors) runs here.
    configure_node_defaults()


def worker_env(local: bool | None = None) -> dict[str, str]:
    """Environment passed to every Ray actor of a job (runtime_env.env_vars).

    ``local``: the actors run on this machine (an embedded Ray), so this machine's node defaults are
    theirs too; by default, when no ``$RAY_ADDRESS`` names a cluster. Otherwise node defaults this
    process chose for itself stay here; only values the user set travel (each actor decides the
    rest on its own node).
    """
    if local is None:
        local = not os.environ.get("RAY_ADDRESS")
    return {k: os.environ[k] for k in WORKER_KEYS if k in os.environ and (local or k not in _node_defaulted)}


def free_ports(count: int = 1) -> tuple[str, list[int]]:
    """This node's address (as Ray sees it) and ``count`` free ports: the rendezvous of a process
    group hosted here (the learner group's, and each GPU weight-sync group's on learner rank 0)."""
    import socket

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
