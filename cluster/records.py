"""Records that cross process boundaries. Defined once, typed, versioned.

Every record that carries model output also carries ``policy_version``: the number of
optimizer steps behind the weights that produced it. The driver uses it to bound staleness
and reports the lag as a metric. Plain dataclasses of Python lists keep Ray's serialisation
cheap and free of torch on the driver side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One generated response, as the rollout engine returns it."""

    response_ids: list[int]  # [T_resp]
    logprobs: list[float]  # [T_resp] engine log π(y_t | s_t) of the sampled tokens (diagnostics)
    text: str
    finish_reason: str  # "stop" | "length"


@dataclass
class Rollout:
    """A prompt's response plus where it came from."""

    example_index: int  # position of the prompt in this step's batch
    prompt_ids: list[int]  # [T_prompt], chat template applied
    sample: Sample
    policy_version: int
    hinted: bool = False  # KEPO: generated with a teacher hint (then re-attached to the hint-free prompt)


@dataclass
class TeacherScores:
    """Teacher signals for one rollout, aligned with ``sample.response_ids``."""

    logprobs: list[float]  # [T_resp] log π_T of the sampled tokens
    topk_ids: list[list[int]] | None = None  # [T_resp, K]
    topk_logprobs: list[list[float]] | None = None  # [T_resp, K]


@dataclass
class TrainRow:
    """One sequence for the learner. Token ids of prompt + response; loss on the response only."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float = 0.0
    teacher_logprobs: list[float] | None = None  # [T_resp]
    teacher_topk_ids: list[list[int]] | None = None  # [T_resp, K]
    teacher_topk_logprobs: list[list[float]] | None = None  # [T_resp, K]
    gate: float = 0.0  # KEPO: 1.0 when this response passed the quality gate
    ref_seq_logprob: float | None = None  # DPO with the teacher as reference
    rollout_logprobs: list[float] | None = None  # [T_resp] the engine's, for the train/infer mismatch metric
    weight: float = 1.0  # 0.0 for padding rows (keeps DeepSpeed collectives in step across ranks)


@dataclass
class TrainBatch:
    """What one learner rank trains on for one step.

    ``global_*`` counts are over all ranks, so every rank can normalise its share of the loss
    to exactly what a single process would compute on the whole batch.
    """

    rows: list[TrainRow]
    policy_version: int
    global_tokens: int
    global_rows: int
    pairs: bool = False  # DPO: rows come as (chosen, rejected) consecutive pairs


@dataclass
class WeightsVersion:
    """A published set of student weights: safetensors bytes, or a folder on shared storage."""

    version: int
    payload: bytes | None = None
    path: str | None = None
    num_bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
