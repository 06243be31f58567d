"""Which GPU features have run on hardware, and the warning a spec that picks the others gets.

Protégé is developed and tested on CPU machines. The GPU code paths are written against the
pinned vLLM, DeepSpeed and Ray sources and exercised on CPU where they can be (fake GPU
resources for placement, the ``meta`` device for the learner step, stubbed CUDA endpoints for
the weight-transfer orchestration), but a feature is only marked ``ran`` once
``bench/gpu_check_torch.py`` or ``bench/gpu_check.sh`` has passed on a real GPU and its report
is committed under ``bench/reports/``. docs/gpu.md keeps the same table for people.
"""

from __future__ import annotations

from dataclasses import dataclass

RAN, CHECKED = "ran on a GPU", "checked against the sources and on CPU only"


@dataclass(frozen=True)
class Feature:
    name: str
    status: str
    how_checked: str


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(
            "learner on CUDA (DeepSpeed over NCCL, ZeRO 0-3, bf16)",
            CHECKED,
            "the train step on the meta device (every tensor on the learner's device); bench/gpu_check_torch.py "
            "runs it on a GPU in-process but has not yet been given one",
        ),
        Feature(
            "vLLM GPU build (rollouts and the teacher)",
            CHECKED,
            "the same vLLM API as the CPU build, which runs in every test",
        ),
        Feature(
            "NCCL weight sync (learner rank 0 -> rollout engines on other GPUs)",
            CHECKED,
            "vLLM's NCCL engine driven with its CUDA endpoints stubbed (orchestration, buckets, dead workers)",
        ),
        Feature(
            "CUDA IPC weight sync (colocated engine and learner rank)",
            CHECKED,
            "the same stubbed tests; route planning by GPU UUID",
        ),
        Feature(
            "colocated placement (rollout worker and learner rank sharing a GPU)",
            CHECKED,
            "a local Ray advertising several (fake) GPUs",
        ),
    )
}


def chosen_gpu_features(spec) -> list[Feature]:
    """The features of FEATURES this spec would use."""
    r = spec.resources
    on_gpu = {role: getattr(r, role).gpus > 0 for role in ("rollout", "learner", "teacher")}
    chosen = []
    if on_gpu["learner"]:
        chosen.append(FEATURES["learner on CUDA (DeepSpeed over NCCL, ZeRO 0-3, bf16)"])
    if on_gpu["rollout"] or (spec.models.teacher is not None and on_gpu["teacher"]):
        chosen.append(FEATURES["vLLM GPU build (rollouts and the teacher)"])
    if spec.learner.weight_sync in ("nccl", "auto") and on_gpu["rollout"]:
        chosen.append(FEATURES["NCCL weight sync (learner rank 0 -> rollout engines on other GPUs)"])
        chosen.append(FEATURES["CUDA IPC weight sync (colocated engine and learner rank)"])
    if on_gpu["rollout"] and on_gpu["learner"] and (r.rollout.gpus < 1 or r.learner.gpus < 1):
        chosen.append(FEATURES["colocated placement (rollout worker and learner rank sharing a GPU)"])
    return chosen


def gpu_warnings(spec) -> list[str]:
    """One line for each chosen GPU feature that has not run on hardware yet."""
    return [
        f"{f.name}: {f.status} ({f.how_checked}); see docs/gpu.md" for f in chosen_gpu_features(spec) if f.status != RAN
    ]
