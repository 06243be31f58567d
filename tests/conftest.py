"""Shared fixtures. Integration tests use tiny real models built offline (seconds) and the real
stack: vLLM (CPU build), DeepSpeed over gloo, Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# CPU defaults before anything imports torch / vLLM (docs/platform.md).
for k, v in {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
}.items():
    os.environ.setdefault(k, v)


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="run tests marked gpu")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="needs --gpu and a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from protege.core.models import build_tiny

    out = tmp_path_factory.mktemp("tiny")
    paths = build_tiny(out, seed=0)
    return {"teacher": str(paths["teacher"]), "student": str(paths["student"]), "reward": str(paths["reward"])}


@pytest.fixture(scope="module")
def ray_local():
    """One Ray instance per test module (docs/design.md, "Tests")."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                k: os.environ[k]
                for k in (
                    "OMP_NUM_THREADS",
                    "VLLM_ENABLE_V1_MULTIPROCESSING",
                    "VLLM_CPU_KVCACHE_SPACE",
                    "HF_HUB_OFFLINE",
                    "DS_ACCELERATOR",
                    "TORCH_EXTENSIONS_DIR",
                    "TOKENIZERS_PARALLELISM",
                )
            }
        },
    )
    yield ray
    ray.shutdown()
