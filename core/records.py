"""Records that cross process boundaries. Defined once, typed, versioned.

Every record that carries model output also carries ``policy_version``: the number of
optimizer steps behind the weights that produced it. The driver uses it to bound staleness
and reports the lag as a metric. Plain dataclasses of Python lists keep Ray's serialisation
cheap; the teacher's per-token payload is the exception (tensors, see TeacherScores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One generated response, as the rollout engine returns it."""

    response_ids: list[int]  # [T_resp]
    logprobs: list[float] | None  # [T_resp] engine log π(y_t | s_t) of the sampled tokens; None: not sampled
    text: str
    finish_reason: str  # "stop" | "length"


@dataclass
class Rollout:
    """A prompt's response plus where it came from."""

    example_index: int  # position of the prompt in this step's batch
    prompt_ids: list[int]  # [T_prompt], chat template applied
    sample: Sample
    policy_version: int  # -1: not sampled from the student (the data's or the teacher's response)


@dataclass
class TeacherScores:
    """Teacher signals for one rollout, aligned with ``sample.response_ids``.

    Tensors (torch), not lists: a top-k or full-row payload is K or V numbers per token, and Ray
    moves a tensor as one buffer where a list of floats is pickled element by element.
    """

    logprobs: Any  # [T_resp] float32 log π_T of the sampled tokens
    topk_ids: Any = None  # [T_resp, K] int32
    topk_logprobs: Any = None  # [T_resp, K] payload dtype (float32 / bfloat16 / float16)
    tail_logprobs: Any = None  # [T_resp] float32 log(1 − Σ_k π_T): the mass outside the top-k
    full_logprobs: Any = None  # [T_resp, V] payload dtype: whole rows, when asked for

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.logprobs, self.topk_ids, self.topk_logprobs, self.tail_logprobs, self.full_logprobs)
            if t is not None
        )


@dataclass
class TrainRow:
    """One sequence for the learner. Token ids of prompt + response; loss on the response only."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float = 0.0
    teacher_logprobs: Any = None  # [T_resp] (tensor or list)
    teacher_topk_ids: Any = None  # [T_resp, K]
    teacher_topk_logprobs: Any = None  # [T_resp, K]
    teacher_tail_logprobs: Any = None  # [T_resp]
    teacher_full_logprobs: Any = None  # [T_resp, V]
    gate: float = 0.0  # KEPO: 1.0 when this response passed the quality gate
    ref_seq_logprob: float | None = None  # DPO with the teacher as reference
    rollout_logprobs: list[float] | None = None  # [T_resp] the engine's, for the train/infer mismatch metric
    weight: float = 1.0  # 0.0 for padding rows (keeps DeepSpeed collectives in step across ranks)


@dataclass
class TrainBatch:
    """What one learner rank trains on for one step. The ranks all-reduce the loss terms'
    counts themselves (learners/learner.py), so a shard needs no global totals."""

    rows: list[TrainRow]
    policy_version: int
    pairs: bool = False  # DPO: rows come as (chosen, rejected) consecutive pairs


@dataclass
class PackedWeights:
    """A full set of student weights as a few flat byte buffers: the object-store sync's payload
    (learners/weight_sender.py packs it, actors/weight_receiver.py loads it).

    ``buffers`` are 1-D numpy uint8 arrays, one dtype per buffer (core/weights.py ``plan_packed``).
    numpy, not torch: Ray hands numpy arrays to pickle out of band, so the object store holds the
    raw bytes and a reader on the same node maps them without a copy, whereas a torch tensor is
    pickled through its storage and copied on every read (Ray 2.60, unless
    RAY_ENABLE_ZERO_COPY_TORCH_TENSORS is set). ``layout`` says where each parameter lies
    (core/weights.py ``PackedEntry``); ``tensor_views`` turns both into named tensors without a copy.
    """

    layout: list  # [(name, full shape, wire dtype, buffer index, byte offset)]
    buffers: list  # [numpy.ndarray uint8, 1-D]
    pack_s: float = 0.0  # the learner's own time to gather, cast and copy the parameters into the buffers

    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.buffers)


@dataclass
class WeightsVersion:
    """A published set of student weights: safetensors bytes, or a folder on shared storage, or
    neither when its tensors travel beside it as :class:`PackedWeights` (the object-store sync)."""

    version: int
    payload: bytes | None = None
    path: str | None = None
    num_bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoreRecord:
    """One scorer's verdict on one rollout: the contract every scorer keeps.

    Every scorer actor (the rule runner, the reward model, the teacher) has
    ``score(rollouts: list[Rollout], examples: list[Example]) -> list[ScoreRecord]``: rollouts[i]
    was generated for examples[i], and the answer holds one record per rollout, in order.
    ``components`` holds raw, unweighted values by reward name; the driver's one weighted
    combine (cluster/scoring.py) turns the records of all scorers into each rollout's reward.
    A teacher returns no components and its per-token payload in ``teacher``.
    """

    components: dict[str, float] = field(default_factory=dict)  # reward name -> raw value (0 on error)
    errors: dict[str, int] = field(default_factory=dict)  # "<reward>/timeout", "/exception", "/skipped"
    teacher: TeacherScores | None = None
    # The scorer's compute time for this rollout (its share of the batch it was scored in), so a
    # call's cost is the sum over its records (the teacher's reaches the metric teacher/seconds).
    seconds: float = 0.0


@dataclass
class SyncResult:
    """What one weight push did (cluster/weight_sync.py). ``failed`` lists the targets (indices into
    the push's targets) that died during it, for the driver to re-sync after their restart."""

    version: int
    bytes: int = 0  # bytes the receivers ended up holding, in their own dtype (one copy)
    seconds: float = 0.0
    failed: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # sync/* for the metrics log
