"""JobSpec: the one typed description of a Protégé job.

The CLI, the REST job API and the driver all read this model, so the schema, the
validation messages and the running job cannot disagree. This module imports only
pydantic, pyyaml (both base dependencies), the standard library and core/storage.py (whose fsspec
waits for an object-store URI): a REST front end can validate jobs without torch, vLLM or Ray
installed (tests/unit/test_layers.py).

Each algorithm's defaults, and the papers they come from, are described in docs/algorithms.md.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as `learnig_rate` must fail, not be ignored. Infinity and
    # NaN are refused too: they pass `gt=0` checks and then cannot be written back as JSON.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _derive(model: BaseModel, name: str, value: Any) -> None:
    """Give a field the user did not write a value that follows the fields they did write.

    Stored past pydantic's assignment hook on purpose: the field stays out of
    ``model_fields_set`` (it is still "not written"), so a dump with ``exclude_unset`` (what
    ``--set`` re-validates) derives it again from the new values instead of freezing it.
    Callers only pass values that already satisfy the field's own constraints.
    """
    model.__dict__[name] = value


def _default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].default


# --------------------------------------------------------------------------- models
class ModelRef(_Strict):
    """A causal LM: a Hugging Face hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local folder."""

    path: str = Field(min_length=1, description="HF hub id or local path")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None


class TeacherRef(ModelRef):
    """The teacher: a model plus how its scores are computed."""

    score_engine: Literal["auto", "vllm", "hf"] = Field(
        default="auto",
        description=(
            "vllm: the teacher's log-probs (and top-k) of the student's responses from vLLM's prompt log-probs, "
            "batched like the rollout engine (and tensor-parallel where vLLM is); hf: a transformers forward, which "
            "also gives full rows and any sampling temperature; auto: vllm when rollout.engine is vllm, the "
            "rollout temperature is 1 and no full rows are asked for, else hf"
        ),
    )


class ModelsSpec(_Strict):
    student: ModelRef
    teacher: TeacherRef | None = None
    reward_model: ModelRef | None = Field(
        default=None,
        description=(
            "sequence-classification reward model with one output (optional); used by the reward named 'reward_model'"
        ),
    )


# --------------------------------------------------------------------------- data
class DataSpec(_Strict):
    """Where prompts come from: a reasoning-gym task, or a JSONL/Parquet file."""

    source: Literal["reasoning_gym", "file"] = "reasoning_gym"
    task: str | None = Field(default=None, description="reasoning-gym task name, e.g. basic_arithmetic")
    task_config: dict[str, Any] = Field(default_factory=dict, description="kwargs for the task generator")

    @field_validator("task_config")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        def check(x: Any) -> None:
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError(f"numbers must be finite, got {x}")
            for y in x.values() if isinstance(x, dict) else x if isinstance(x, list) else ():
                check(y)

        check(v)
        return v

    size: int = Field(default=512, ge=1, description="examples generated for a reasoning-gym task")
    seed: int = 0
    path: str | None = Field(default=None, description="JSONL/Parquet file (source: file)")
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    response_field: str | None = Field(
        default=None,
        description=(
            "source file: the field whose text is the supervised response (sft, distill) verbatim, e.g. a "
            "reasoning trace; unset: <answer>{answer}</answer>. The answer still scores evaluation"
        ),
    )
    # Preference data for offline DPO (prompt, chosen, rejected).
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    eval_size: int = Field(
        default=32,
        ge=0,
        description=(
            "held-out questions for greedy evaluation (every copy of one leaves training); unset: 32, at "
            "most half of the distinct questions (of data.size generated, or of a file's rows), or eval.size "
            "when that is larger"
        ),
    )
    system_prompt: str | None = None
    prompt_template: str | None = Field(
        default=None,
        description=(
            "the user turn, with {question} where the question goes (e.g. '{question}' alone for rows that "
            "carry their own instruction); unset: the question, then 'Give only the final answer inside "
            "<answer></answer>.'"
        ),
    )

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, v: str | None) -> str | None:
        if v is not None and "{question}" not in v:
            raise ValueError("must contain '{question}', where each question goes")
        return v

    @model_validator(mode="after")
    def _source_fields(self) -> "DataSpec":
        self._follow_defaults()
        if self.source == "reasoning_gym" and not self.task:
            raise ValueError("task: source 'reasoning_gym' needs a task name")
        if self.source == "file" and not self.path:
            raise ValueError("path: source 'file' needs a path")
        if self.response_field is not None and self.source != "file":
            raise ValueError("response_field: only a file's rows have response fields (source: file)")
        if self.source == "reasoning_gym" and self.eval_size >= self.size:
            raise ValueError(f"eval_size: must be smaller than size ({self.size})")
        return self

    def _follow_defaults(self) -> None:
        written = self.model_fields_set
        # `data: {path: rows.jsonl}` means a file, not a reasoning-gym task without a name.
        if "source" not in written and self.path and not self.task:
            _derive(self, "source", "file")
        # `size: 16` alone must be valid: hold out at most half of a small generated set.
        if "eval_size" not in written and self.source == "reasoning_gym":
            _derive(self, "eval_size", min(_default(DataSpec, "eval_size"), self.size // 2))

    def held_out(self, n_examples: int) -> int:
        """How many of ``n_examples`` distinct questions to hold out: ``eval_size`` as written (too
        many is then the user's error), else at most half, so small data still leaves some to train on."""
        if "eval_size" in self.model_fields_set:
            return self.eval_size
        return min(self.eval_size, n_examples // 2)


# --------------------------------------------------------------------------- algorithms
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KlEstimator = Literal["k1", "k2", "k3"]


@dataclass(frozen=True)
class TeacherRequest:
    """What the teacher scorer returns per response token besides the sampled token's log-prob."""

    top_k: int = 0  # > 0: the teacher's top-k ids and log-probs, plus the log-mass outside them
    full: bool = False  # whole log-prob rows over the vocabulary

    @classmethod
    def for_estimator(cls, estimator: str, top_k: int) -> TeacherRequest:
        return cls(top_k=top_k if estimator in ("topk", "topk_renorm") else 0, full=estimator == "full")


Responses = Literal["student", "answers", "preferences", "teacher"]


@dataclass(frozen=True)
class Needs:
    """What an algorithm asks of the pipeline. The driver, the launcher, the learner and data
    loading read these declarations, never an algorithm's name: a new algorithm is one spec
    variant (with its ``needs``), one credit-assignment case and one loss (learners/algorithms.py).
    """

    # Where the trained responses come from: the student's samples, the data's answers, the data's
    # (chosen, rejected) pairs, or the teacher's generations.
    responses: Responses = "student"
    teacher: TeacherRequest | None = None  # per-token teacher scoring of the responses
    rewards: bool = True  # advantages come from rewards: at least one reward is required
    groups: bool = False  # compares the samples of one prompt: samples_per_prompt ≥ 2
    pairs: bool = False  # rows come as (chosen, rejected) pairs; shards keep a pair together
    reference: bool = False  # a frozen copy of the initial student (a KL term, DPO's reference)
    teacher_reference: bool = False  # DPO: the teacher's sequence log-prob is the reference
    teacher_model: bool = False  # models.teacher must be set (scoring, hints, targets or reference)
    teacher_for: str = ""  # which setting asks for the teacher, for the error message
    hints: bool = False  # KEPO: a hint-exploration phase on groups that all failed
    resample_rounds: int = 0  # DAPO dynamic sampling: extra generation rounds that fill the batch
    extra_tokens: int = 0  # sequence room beyond the response (a KEPO hint in the prompt)

    @property
    def generates(self) -> bool:
        """Samples from the student every step (so every step ends with a weight sync)."""
        return self.responses == "student"


class _PolicyGradient(_Strict):
    """Options shared by the GRPO family (DeepSeekMath GRPO, DAPO clip-higher, Dr. GRPO)."""

    eps_low: float = Field(default=0.2, gt=0, lt=1)
    eps_high: float = Field(default=0.28, gt=0)
    adv_std_norm: bool = Field(default=True, description="False = Dr. GRPO (no std normalisation)")
    loss_agg: LossAgg = "token-mean"
    kl_coef: float = Field(default=0.0, ge=0, description="β for KL to the reference (0 = no reference pass)")
    kl_estimator: KlEstimator = "k3"
    dynamic_sampling: bool = Field(
        default=False,
        description=(
            "DAPO: groups whose rewards are all equal carry no advantage; sample new prompts until the batch "
            "holds prompts_per_step groups whose rewards differ (at most resample_rounds extra rounds), and "
            "drop the rest"
        ),
    )
    resample_rounds: int = Field(
        default=3,
        ge=0,
        le=16,
        description="dynamic sampling: extra rounds of prompts_per_step new prompts per step at most; 0: only drop",
    )
    max_staleness: int = Field(
        default=0, ge=0, le=4, description="0 strictly on-policy; 1 overlaps generation of t+1 with training of t"
    )
    tis_cap: float | None = Field(
        default=None,
        gt=0,
        description=(
            "truncated importance sampling against the rollout engine's log-probs, min(π_old/π_rollout, cap) per "
            "token; unset: 2.0 when max_staleness ≥ 1, off when 0"
        ),
    )

    def effective_tis_cap(self) -> float | None:
        return self.tis_cap if self.tis_cap is not None else (2.0 if self.max_staleness >= 1 else None)

    def filling_rounds(self) -> int:
        return self.resample_rounds if self.dynamic_sampling else 0


class GRPOSpec(_PolicyGradient):
    type: Literal["grpo"] = "grpo"

    def needs(self) -> Needs:
        return Needs(groups=True, reference=self.kl_coef > 0, resample_rounds=self.filling_rounds())


class RLADSpec(_PolicyGradient):
    """RLAD / TRRD (arXiv 2602.22495). alpha = 1 is plain GRPO (Eq. 3)."""

    type: Literal["rlad"] = "rlad"
    alpha: float = Field(default=0.5, description="mixing weight of the old policy in the TRRD anchor")
    clamp: float = Field(default=1.0, gt=0, description="clamp on log(π_θ/π_T), Appendix B")
    trust_region: Literal["ratio", "gate"] = Field(
        default="ratio",
        description=(
            "ratio: the paper's TRRD ratio is the importance ratio; gate (our variant): GRPO's ratio carries the "
            "gradient and the TRRD ratio only decides which tokens are clipped (learners/losses.py rlad_loss)"
        ),
    )

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be between 0 and 1")
        return v

    def needs(self) -> Needs:  # the sampled token's teacher log-prob is TRRD's anchor
        return Needs(
            groups=True,
            reference=self.kl_coef > 0,
            teacher=TeacherRequest(),
            teacher_model=True,
            resample_rounds=self.filling_rounds(),
        )


class KEPOSpec(_PolicyGradient):
    """KEPO: GRPO + quality-gated distillation + knowledge-enhanced exploration."""

    type: Literal["kepo"] = "kepo"
    distill_coef: float = Field(default=1.0, ge=0)
    gate_threshold: float = Field(default=1.0, description="τ: distil responses whose accuracy reward ≥ τ")
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"
    estimator: Literal["auto", "sampled", "topk", "topk_renorm", "full"] = Field(
        default="auto",
        description="what of the teacher's distribution the distillation term sees; auto: the "
        "sampled token for reverse_kl, the top-k renormalised over k for forward_kl / jsd",
    )
    top_k: int = Field(default=16, ge=1, le=1024, description="teacher top-k rows (estimators topk, topk_renorm)")
    jsd_beta: float = Field(default=0.5, gt=0, lt=1)
    hints: bool = Field(default=True, description="knowledge-enhanced exploration on all-zero groups")
    hint_attempts: int = Field(default=4, ge=1, description="N: rejection-sampling attempts with the hint")
    hint_replace: int = Field(default=2, ge=1, description="m: group members replaced by accepted responses")
    hint_max_tokens: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _estimator_fits(self) -> KEPOSpec:
        if self.estimator == "sampled" and self.divergence != "reverse_kl":
            raise ValueError(f"estimator: 'sampled' gives reverse_kl only, not {self.divergence}; use topk or full")
        return self

    def teacher_request(self) -> TeacherRequest:
        est = (
            self.estimator
            if self.estimator != "auto"
            else ("sampled" if self.divergence == "reverse_kl" else "topk_renorm")
        )
        return TeacherRequest.for_estimator(est, self.top_k)

    def needs(self) -> Needs:
        return Needs(
            groups=True,
            reference=self.kl_coef > 0,
            teacher=self.teacher_request(),
            teacher_model=True,
            hints=self.hints,
            extra_tokens=self.hint_max_tokens if self.hints else 0,
            resample_rounds=self.filling_rounds(),
        )


class OPDSpec(_Strict):
    """On-policy distillation: per-token reverse KL to the teacher on student samples (GKD, λ=1)."""

    type: Literal["opd"] = "opd"
    estimator: Literal["sampled", "topk", "full"] = Field(
        default="sampled",
        description="sampled: the sampled token's log-prob (one number per token); topk: the "
        "teacher's top_k plus a tail bucket; full: whole vocabulary rows (exact; small vocabularies)",
    )
    top_k: int = Field(default=32, ge=1, le=1024, description="teacher top-k rows for estimator topk")
    grpo_coef: float = Field(default=0.0, ge=0, description="> 0 adds the GRPO loss with this weight")
    opd_coef: float = Field(default=1.0, gt=0)
    eps_low: float = Field(default=0.2, gt=0, lt=1)
    eps_high: float = Field(default=0.28, gt=0)
    adv_std_norm: bool = True
    loss_agg: LossAgg = "token-mean"
    max_staleness: int = Field(default=0, ge=0, le=4)
    tis_cap: float | None = Field(default=None, gt=0, description="as for GRPO; unset: 2.0 when max_staleness ≥ 1")

    def teacher_request(self) -> TeacherRequest:
        return TeacherRequest.for_estimator(self.estimator, self.top_k)

    def needs(self) -> Needs:  # rewards are scored (for metrics, and for GRPO when grpo_coef > 0)
        return Needs(teacher=self.teacher_request(), teacher_model=True, rewards=self.grpo_coef > 0)

    def effective_tis_cap(self) -> float | None:
        return self.tis_cap if self.tis_cap is not None else (2.0 if self.max_staleness >= 1 else None)


class DPOSpec(_Strict):
    """DPO (arXiv 2305.18290), offline from preference pairs or online from ranked student samples."""

    type: Literal["dpo"] = "dpo"
    beta: float = Field(default=0.1, gt=0)
    mode: Literal["offline", "online"] = "online"
    reference: Literal["initial", "teacher"] = "initial"
    max_staleness: int = Field(default=0, ge=0, le=4)

    def needs(self) -> Needs:
        online = self.mode == "online"
        return Needs(
            responses="student" if online else "preferences",
            rewards=online,
            groups=online,
            pairs=True,
            reference=self.reference == "initial",
            teacher_reference=self.reference == "teacher",
            teacher_model=self.reference == "teacher",
            teacher_for="reference 'teacher'",
        )


class SFTSpec(_Strict):
    """Supervised fine-tuning on (prompt, answer) data or on teacher-generated responses."""

    type: Literal["sft"] = "sft"
    targets: Literal["data", "teacher"] = "data"
    max_staleness: int = Field(default=0, ge=0, le=4)

    def needs(self) -> Needs:
        teacher = self.targets == "teacher"
        return Needs(
            responses="teacher" if teacher else "answers",
            rewards=False,
            teacher_model=teacher,
            teacher_for="targets 'teacher'",
        )


class DistillSpec(_Strict):
    """Offline distillation: the student matches the teacher's per-token distribution on the
    data's responses (the answer field), not on its own samples, so there is no generation and
    no reward. Supervised knowledge distillation (Hinton et al., arXiv 1503.02531) in GKD's
    token-level form (arXiv 2306.13649, student-sampled fraction λ = 0), over the teacher's top-k
    (plus a tail bucket) instead of its whole softmax."""

    type: Literal["distill"] = "distill"
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    estimator: Literal["topk", "topk_renorm", "full"] = Field(
        default="topk",
        description="topk: the teacher's top_k plus a tail bucket; topk_renorm: both renormalised "
        "over the k ids; full: whole vocabulary rows",
    )
    top_k: int = Field(default=32, ge=1, le=1024)
    jsd_beta: float = Field(default=0.5, gt=0, lt=1)
    max_staleness: int = Field(default=0, ge=0, le=4)

    def teacher_request(self) -> TeacherRequest:
        return TeacherRequest.for_estimator(self.estimator, self.top_k)

    def needs(self) -> Needs:
        return Needs(responses="answers", rewards=False, teacher=self.teacher_request(), teacher_model=True)


AlgorithmSpec = Annotated[
    Union[GRPOSpec, RLADSpec, KEPOSpec, OPDSpec, DPOSpec, SFTSpec, DistillSpec], Field(discriminator="type")
]
# Every algorithm by its `type` tag, read off the union: the one list of algorithm names.
ALGORITHMS: dict[str, type] = {c.model_fields["type"].default: c for c in get_args(get_args(AlgorithmSpec)[0])}


# --------------------------------------------------------------------------- rollout / learner
def _cpu_threads(v: Any) -> Any:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError("must be 'auto' or a number of threads ≥ 1")


# rollout.cpu_threads and learner.cpu_threads (resolved per node by core/env.py::cpu_threads).
CpuThreads = Annotated[Union[int, str], BeforeValidator(_cpu_threads)]


# rollout.engine "auto" on CPU: transformers' batched generate below this many student
# parameters, vLLM from it. Measured on 2 CPU cores, one step's generation per engine
# (bench/reports/engine_bench.md, "Engine by size"): hf was 2.4x faster at 0.1 M parameters and
# 1.7x at 0.66 M, vLLM 1.7x faster at 32 M and 1.4x at 64 M; the bound sits between the two.
HF_ROLLOUT_BELOW_PARAMS = 5_000_000


class RolloutSpec(_Strict):
    samples_per_prompt: int = Field(default=4, ge=1, description="G, the group size")
    prompts_per_step: int = Field(default=8, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=32, ge=1)
    max_prompt_tokens: int = Field(default=256, ge=8)
    workers: int = Field(default=1, ge=1)
    engine: Literal["auto", "vllm", "hf"] = Field(
        default="vllm",
        description=(
            "vllm: vLLM's engine (CPU or GPU build); hf: transformers.generate (all prompts in one batched "
            "call), the fallback; auto: hf where no vLLM build is installed, or on CPU for a student under "
            "HF_ROLLOUT_BELOW_PARAMS parameters (read from its config.json where the spec is parsed), where "
            "vLLM's per-step overhead outweighs its faster kernels; vllm otherwise "
            "(bench/reports/engine_bench.md has the measured crossover)"
        ),
    )
    compile: Literal["auto", "eager", "compiled"] = Field(
        default="auto",
        description=(
            "vLLM only. compiled: torch.compile'd model (and CUDA graphs on GPU); eager: no compilation. "
            "auto: compiled on GPUs (vLLM's own default), eager on CPU, where compiling did not pay at a real "
            "model's size: inside the pipeline (a weight sync every step) SmolLM2-135M-10l generated 1.04x "
            "faster compiled for ~110 s more start-up; only the tiny test model gained (2.1x, from ~30 steps "
            "on; bench/reports/engine_bench.md)"
        ),
    )
    kv_cache_gb: float = Field(default=0.25, gt=0, description="KV cache per worker (vLLM on CPU)")
    cpu_threads: CpuThreads = Field(
        default="auto",
        description=(
            "CPU only: torch threads each rollout engine generates (and reloads weights) with. auto: the node's "
            "cores divided among rollout.workers when generation does not overlap training (max_staleness 0: "
            "the other roles wait meanwhile), else 1. On a multi-node CPU cluster with several workers per "
            "node, set it to the cores a worker may use"
        ),
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=0.95,
        description=(
            "vLLM on GPU: share of its GPU's memory a rollout worker (and the teacher's engine) may take. "
            "Default: 0.85 when the role has whole GPUs (disaggregated), 0.3 when it shares one "
            "(resources.*.gpus < 1, colocated with a learner rank that needs the rest)"
        ),
    )


class LearnerSpec(_Strict):
    ranks: int = Field(default=1, ge=1)
    cpu_threads: CpuThreads = Field(
        default="auto",
        description=(
            "CPU only: torch threads each rank trains with. auto: the node's cores divided among the ranks "
            "when training does not overlap generation (max_staleness 0: the engines wait meanwhile), else 1. "
            "On a multi-node CPU cluster, set it to the cores a rank may use"
        ),
    )
    zero_stage: Literal[0, 1, 2, 3] = 2
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    micro_batch: int = Field(
        default=8, ge=1, description=("sequences per rank per forward (unused when micro_batch_tokens is set)")
    )
    micro_batch_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "token budget of a micro-batch instead of micro_batch: rows × the longest (prompt + response) in it, "
            "padding included. Sets the micro-batch count per rank from the longest sequence a step can hold (max_prompt_tokens + "
            "max_new_tokens + 64), the same on every rank; rows are then sorted by length and packed into that "
            "many micro-batches with the fewest padded tokens in the largest one (DPO pairs stay together). Rows "
            "longer than planned go over the budget rather than change the count (learner/micro_batch_tokens_max "
            "reports the largest); unset: micro_batch sequences per forward, in arrival order"
        ),
    )
    logprob_chunk: int | None = Field(
        default=None,
        ge=1,
        description=(
            "response positions per chunk of the learner's log-prob computation: lm_head + log_softmax + gathers "
            "run on that many positions at a time under activation checkpointing, so memory grows with response "
            "length × (hidden + top-k), not × vocabulary (the same values and gradients). For long responses or "
            "large vocabularies, e.g. 1024; costs one more lm_head pass in the backward. Unset: whole-batch "
            "log-softmax rows [B, T, V] (fastest for short responses)"
        ),
    )
    grad_clip: float = Field(default=1.0, gt=0)
    bf16: bool = Field(
        default=False,
        description="DeepSpeed bf16: bfloat16 weights and activations, fp32 master weights in the optimizer",
    )
    autocast: Literal["off", "bfloat16"] = Field(
        default="off",
        description=(
            "bfloat16: float32 weights, the forward (and its backward) under torch.autocast in bfloat16; "
            "log-softmax and the losses stay float32. On an AMX CPU: 1.61x faster forward + backward at "
            "SmolLM2-135M-10l size (gradient cosine 0.995 with float32), 0.66x on the tiny test model "
            "(bench/reports/learner_bench.md); needs AVX512-BF16/AMX on CPU, or a GPU"
        ),
    )
    updates_per_step: int = Field(default=1, ge=1, description="passes over each rollout batch")
    mini_batches: int = Field(
        default=1,
        ge=1,
        description=(
            "optimizer steps per pass: the rollout batch is split into this many mini-batches (PPO), "
            "π_old stays the batch's starting policy; optimizer steps per batch = updates_per_step × mini_batches"
        ),
    )
    weight_sync: Literal["auto", "object_store", "nccl"] = Field(
        default="object_store",
        description="object_store: safetensors blob via Ray (CPU and GPU, tested); nccl / auto: vLLM's "
        "NCCL/IPC weight transfer on GPUs (written, not yet verified on hardware)",
    )
    weight_sync_bucket_mb: float = Field(
        default=512, gt=0, description=("bucket size: NCCL/IPC buffers, and the flat buffers the object store carries")
    )
    weight_sync_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "object store: the dtype weights travel in. auto: each parameter's own (the training dtype); "
            "bfloat16/float16 halve the bytes of a float32 learner (the rollout engine casts on load)"
        ),
    )


BUILTIN_REWARDS = ("exact_match", "format", "math_verify", "reasoning_gym", "reward_model")


class RewardSpec(_Strict):
    name: str = Field(
        description=f"a built-in reward ({', '.join(BUILTIN_REWARDS)}), or your label for `function`",
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
    )
    function: str | None = Field(
        default=None,
        description=(
            "your own reward: 'package.module:function' or 'path/to/file.py:function', called as "
            "f(completion, reference, meta) -> float (rewards/README: timeouts and errors score 0)"
        ),
    )
    weight: float = 1.0

    @field_validator("function")
    @classmethod
    def _importable_form(cls, v: str | None) -> str | None:
        if v is None:
            return v
        target, sep, attr = v.rpartition(":")
        if not sep or not target or not attr.isidentifier():
            raise ValueError("must look like 'package.module:function' or 'path/to/file.py:function'")
        # A file is checked here (relative to where `protege validate/run/submit` runs; submit
        # uploads the project, so the same relative path holds on the cluster). A module may only
        # exist on the cluster: it is imported when the job starts, before any actor.
        if target.endswith(".py") and not Path(target).is_file():
            raise ValueError(f"file '{target}' not found (relative paths start at {Path.cwd()})")
        return v

    @model_validator(mode="after")
    def _known(self) -> "RewardSpec":
        if self.function is None and self.name not in BUILTIN_REWARDS:
            raise ValueError(
                f"name: unknown reward '{self.name}'; built-in rewards are {', '.join(BUILTIN_REWARDS)}, "
                "or give `function: module:callable` for your own"
            )
        if self.function is not None and self.name in BUILTIN_REWARDS:
            raise ValueError(f"name: '{self.name}' is a built-in reward; give your function another name")
        return self


class CheckpointSpec(_Strict):
    dir: str = Field(
        default="runs/{name}",
        description=(
            "run directory (checkpoints, metrics, samples); '{name}' expands to the job name. A local or "
            "shared-volume path, or an object-store URI (s3://bucket/runs/{name}, gs://…, any fsspec "
            "URL; s3/gcs need `pip install 'protege[s3]'` / `'protege[gcs]'`)"
        ),
    )
    local_dir: str = Field(
        default="runs/{name}",
        description=(
            "with a URI `dir`: local staging folder for metrics and checkpoints before upload; ignored "
            "for a local `dir`"
        ),
    )
    interval: int = Field(default=10, ge=1, description="save every N steps")
    keep: int = Field(default=2, ge=1, description="keep the last K checkpoints")
    keep_best: str | None = Field(
        default=None,
        description=(
            "also keep the checkpoint with the highest value of this eval metric (e.g. eval/accuracy), as of the "
            "newest evaluation at or before it: save on eval steps (interval a multiple of eval.interval)"
        ),
    )

    @field_validator("keep_best")
    @classmethod
    def _eval_metric(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("eval/"):
            raise ValueError(f"must name an eval metric such as eval/accuracy, got {v!r}")
        return v

    @field_validator("dir")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        # Before anything starts: a typo'd scheme would otherwise fail only at the first save.
        if "://" in v:
            from protege.core.storage import check_protocol

            check_protocol(v)
        return v

    @field_validator("local_dir")
    @classmethod
    def _local(cls, v: str) -> str:
        if "://" in v:
            raise ValueError("must be a local path (the staging folder before upload)")
        return v


class EvalSpec(_Strict):
    interval: int = Field(default=5, ge=1)
    size: int = Field(
        default=32,
        ge=1,
        description=("held-out prompts, greedy decoding; unset: 32, or data.eval_size when that is smaller"),
    )


class AutoscaleSpec(_Strict):
    """Ray Serve autoscaling of the student endpoint's replicas (Serve's defaults for the delays)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1, description="unset: 2, or min_replicas when that is larger")
    target_ongoing_requests: float = Field(default=4, gt=0, description="requests in flight per replica to aim for")
    upscale_delay_s: float = Field(
        default=30, ge=0, description="load must stay above target this long to add a replica"
    )
    downscale_delay_s: float = Field(
        default=600, ge=0, description="load must stay below target this long to remove one"
    )

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscaleSpec":
        if "max_replicas" not in self.model_fields_set and self.max_replicas < self.min_replicas:
            _derive(self, "max_replicas", self.min_replicas)  # `min_replicas: 3` alone is valid
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas: must be at least min_replicas")
        return self


class ServeSpec(_Strict):
    enabled: bool = Field(default=False, description="serve the student when training ends")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_key_env: str = Field(default="PROTEGE_API_KEY", description="env var holding the API key")
    max_tokens: int = Field(default=256, ge=1)
    max_concurrent: int = Field(default=32, ge=1, description="beyond this, 503")
    max_n: int = Field(default=8, ge=1, description="most choices (n) per request")
    # Its own choice, not rollout.engine's: rollouts may need the HF fallback where serving wants vLLM.
    engine: Literal["vllm", "hf"] = Field(
        default="vllm",
        description="vllm: vLLM's own OpenAI serving layer on AsyncLLM; hf: transformers, "
        "one request at a time, behind the same serving layer (no guided decoding)",
    )
    autoscale: AutoscaleSpec = Field(default_factory=AutoscaleSpec)


class RoleResources(_Strict):
    cpus: float = Field(default=1, ge=0)
    gpus: float = Field(default=0, ge=0)
    custom: dict[str, float] = Field(default_factory=dict, description="extra Ray resources, e.g. {gpu_node: 1}")


class TeacherResources(RoleResources):
    replicas: int = Field(
        default=1,
        ge=1,
        description=(
            "teacher actors, each with these cpus/gpus and its own engine; every scoring or generation "
            "call is split across them in contiguous chunks"
        ),
    )


class ResourcesSpec(_Strict):
    # Fractional CPUs let a 2-core laptop hold every role; clusters give whole GPUs.
    rollout: RoleResources = Field(default_factory=lambda: RoleResources(cpus=0.5))
    learner: RoleResources = Field(default_factory=lambda: RoleResources(cpus=0.5))
    teacher: TeacherResources = Field(default_factory=lambda: TeacherResources(cpus=0.25))
    reward: RoleResources = Field(default_factory=lambda: RoleResources(cpus=0.25))
    reward_model: RoleResources = Field(
        default_factory=lambda: RoleResources(cpus=0.25),
        description="the models.reward_model scorer (give it a GPU for a large model)",
    )
    placement_timeout_s: float = Field(default=30, gt=0, description="fail fast when roles cannot be placed")


class MetricsSpec(_Strict):
    """Trackers that get each step's metrics besides RUN_DIR/metrics.jsonl (always written; cluster/trackers.py)."""

    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description=(
            "any of tensorboard (RUN_DIR/tb), wandb, mlflow; wandb / mlflow need `pip install 'protege[trackers]'` "
            "and their own credentials (WANDB_API_KEY, WANDB_MODE=offline; MLFLOW_TRACKING_URI); [] for none"
        ),
    )
    project: str = Field(default="protege", min_length=1, description="W&B project / MLflow experiment")
    run_name: str | None = Field(default=None, description="the tracker run's name; unset: the job name")
    entity: str | None = Field(default=None, description="W&B entity (team); unset: the key's default")
    tracking_uri: str | None = Field(
        default=None,
        description=("MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns"),
    )

    @field_validator("loggers")
    @classmethod
    def _once(cls, v: list[str]) -> list[str]:
        if twice := sorted({x for x in v if v.count(x) > 1}):
            raise ValueError(f"each logger once; repeated: {', '.join(twice)}")
        return v


class FaultToleranceSpec(_Strict):
    """How many failures a job absorbs before it stops (with an intact checkpoint)."""

    actor_restarts: int = Field(default=3, ge=0, description="restarts per rollout / reward / teacher actor")
    learner_restarts: int = Field(default=2, ge=0, description="learner-group reloads from the last checkpoint")
    reward_timeout_s: float = Field(default=5.0, gt=0, description="per reward call; a hung call scores 0")


# --------------------------------------------------------------------------- the job
class JobSpec(_Strict):
    """A whole Protégé job. Load with :func:`load_spec`; validate with ``protege validate``."""

    name: str = Field(default="protege-job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = 0
    steps: int = Field(default=20, ge=1, description="training steps (rollout batches)")
    models: ModelsSpec
    data: DataSpec
    algorithm: AlgorithmSpec = Field(default_factory=GRPOSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    learner: LearnerSpec = Field(default_factory=LearnerSpec)
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="reasoning_gym")],
        description=(
            "unset: the data's verifier (reasoning_gym for a task, exact_match for a file), plus "
            "reward_model when models.reward_model is set"
        ),
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    fault_tolerance: FaultToleranceSpec = Field(default_factory=FaultToleranceSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)

    @model_validator(mode="after")
    def _cross_field(self) -> "JobSpec":
        self._follow_defaults()
        algo, needs = self.algorithm, self.algorithm.needs()
        if needs.teacher_model and self.models.teacher is None:
            setting = f" with {needs.teacher_for}" if needs.teacher_for else ""
            raise ValueError(f"models.teacher: algorithm '{algo.type}'{setting} needs a teacher model")
        rows = self.rows_per_step() // self.learner.ranks
        if self.learner.mini_batches > max(1, rows):
            raise ValueError(
                f"learner.mini_batches: {self.learner.mini_batches} mini-batches need at least as many "
                f"rows per learner rank, and a step has {rows}"
            )
        if needs.responses == "preferences" and self.data.source != "file":
            raise ValueError(
                f"data.source: offline {algo.type} reads (prompt, chosen, rejected) rows from a file: set it to 'file'"
            )
        if needs.groups and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                f"rollout.samples_per_prompt: must be at least 2, algorithm '{algo.type}' compares samples within a group"
            )
        if needs.hints and algo.hint_replace > self.rollout.samples_per_prompt:
            raise ValueError("algorithm.hint_replace: cannot exceed rollout.samples_per_prompt")
        if self.eval.size > self.data.eval_size and self.data.eval_size > 0:
            raise ValueError(
                f"eval.size: cannot exceed data.eval_size ({self.data.eval_size}); lower it, or raise data.eval_size"
            )
        names = [r.name for r in self.rewards]
        if "reward_model" in names and self.models.reward_model is None:
            raise ValueError(
                "models.reward_model: the reward 'reward_model' needs a reward model "
                "(a sequence-classification model with one output)"
            )
        if self.models.reward_model is not None and "reward_model" not in names:
            raise ValueError(
                "rewards: models.reward_model is set but no reward uses it; add "
                "{name: reward_model, weight: …} to rewards"
            )
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(
                f"rewards: each reward needs its own name (metrics are keyed by it); repeated: {', '.join(twice)}"
            )
        if any(r.name == "reasoning_gym" for r in self.rewards) and self.data.source != "reasoning_gym":
            raise ValueError(
                "rewards: the 'reasoning_gym' reward scores reasoning-gym tasks; data.source is not reasoning_gym"
            )
        if not self.rewards and needs.rewards:
            raise ValueError(f"rewards: algorithm '{algo.type}' needs at least one reward")
        return self

    def _follow_defaults(self) -> None:
        """Unset fields that depend on others take their value from them, so a spec is never
        refused for a field its author did not write (an explicit conflict is still an error)."""
        data, ev = self.data, self.eval
        # `eval.size: 64` alone: hold out that many (when the generated set is large enough).
        if (
            "eval_size" not in data.model_fields_set
            and "size" in ev.model_fields_set
            and ev.size > data.eval_size
            and (data.source != "reasoning_gym" or ev.size < data.size)
        ):
            _derive(data, "eval_size", ev.size)
        # `data.eval_size: 4` alone: evaluate on those 4 (0 turns evaluation off; size is unused).
        if "size" not in ev.model_fields_set and data.eval_size > 0:
            _derive(ev, "size", min(_default(EvalSpec, "size"), data.eval_size))
        if "rewards" not in self.model_fields_set:
            _derive(self, "rewards", self._default_rewards())
        if self.rollout.engine == "auto":
            self.rollout.engine = self._auto_engine()

    def _auto_engine(self) -> str:
        """rollout.engine "auto": hf where no vLLM build is installed or for a small student on CPU
        rollout workers, vllm otherwise (and wherever the student's config.json is not readable here).
        Decided here, not in RolloutSpec, because it needs the student and the rollout resources."""
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return "hf"
        if self.resources.rollout.gpus > 0:
            return "vllm"
        from protege.core.models import approx_parameters, model_config_file

        found = model_config_file(self.models.student.path, self.models.student.revision)
        try:
            n = approx_parameters(json.loads(found.read_text())) if found else None
        except (OSError, ValueError):
            n = None
        return "hf" if n is not None and n < HF_ROLLOUT_BELOW_PARAMS else "vllm"

    def fit_data(self, n_examples: int) -> None:
        """The data turned out to have ``n_examples`` distinct questions (known once loaded): with
        data.eval_size unset, hold out at most half of them, and let an unset eval.size follow."""
        if "eval_size" in self.data.model_fields_set:
            return
        _derive(self.data, "eval_size", self.data.held_out(n_examples))
        if "size" not in self.eval.model_fields_set and self.data.eval_size > 0:
            _derive(self.eval, "size", min(_default(EvalSpec, "size"), self.data.eval_size))

    def _default_rewards(self) -> list[RewardSpec]:
        # The verifier that fits the data: reasoning-gym's own scorer for its tasks, exact match
        # against the answer field for a file; and the reward model when the spec names one.
        verifier = "reasoning_gym" if self.data.source == "reasoning_gym" else "exact_match"
        rewards = [RewardSpec(name=verifier)]
        if self.models.reward_model is not None:
            rewards.append(RewardSpec(name="reward_model"))
        return rewards

    @property
    def max_model_len(self) -> int:
        """Tokens one sequence may hold in a rollout or teacher engine: the prompt, the longer of
        the response and a KEPO hint, and 64 for the chat template around them."""
        longest = max(self.rollout.max_new_tokens, self.algorithm.needs().extra_tokens)
        return self.rollout.max_prompt_tokens + longest + 64

    @property
    def run_uri(self) -> str | None:
        """``checkpoint.dir`` when it is an object-store URI, else None."""
        d = self.checkpoint.dir.format(name=self.name)
        return d.rstrip("/") if "://" in d else None

    @property
    def run_dir(self) -> Path:
        """The local run dir: ``checkpoint.dir``, or with a URI the staging folder ``local_dir``."""
        if self.run_uri is not None:
            return Path(self.checkpoint.local_dir.format(name=self.name))
        return Path(self.checkpoint.dir.format(name=self.name))

    @property
    def run_location(self) -> str:
        """Where the run's durable files live: the URI, else the local run dir."""
        return self.run_uri or str(self.run_dir)

    def rows_per_step(self) -> int:
        """Training rows one step produces: a pair per prompt counts twice (DPO), a group of
        samples per prompt G times, a data or teacher response once."""
        needs, r = self.algorithm.needs(), self.rollout
        if needs.pairs:
            return 2 * r.prompts_per_step
        return r.prompts_per_step * (r.samples_per_prompt if needs.generates else 1)

    def needs_teacher_scoring(self) -> bool:
        return self.algorithm.needs().teacher is not None

    def rollout_overlaps_training(self) -> bool:
        """The generation of step t+1 runs while step t trains (algorithm.max_staleness ≥ 1)."""
        return getattr(self.algorithm, "max_staleness", 0) >= 1

    def rollout_compiled(self) -> bool:
        """rollout.compile with "auto" resolved: compiled where the rollout workers have GPUs."""
        match self.rollout.compile:
            case "compiled":
                return True
            case "eager":
                return False
        return self.resources.rollout.gpus > 0

    def teacher_score_engine(self) -> str:
        """models.teacher.score_engine with "auto" resolved (see TeacherRef)."""
        chosen = self.models.teacher.score_engine if self.models.teacher is not None else "hf"
        if chosen != "auto":
            return chosen
        vllm_ok = self.rollout.engine == "vllm" and self.rollout.temperature == 1.0 and not self.teacher_request().full
        return "vllm" if vllm_ok else "hf"

    def teacher_request(self) -> TeacherRequest:
        """The teacher's per-token signal this algorithm trains on (the sampled token's log-prob
        alone for RLAD and the sampled estimators); an empty request when it scores nothing."""
        return self.algorithm.needs().teacher or TeacherRequest()


# --------------------------------------------------------------------------- loading
class SpecError(ValueError):
    """A spec that failed to load or validate. ``errors`` holds (field path, message) pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
        super().__init__(f"{source}: invalid job spec ({len(errors)} error{'s' * (len(errors) != 1)})\n{lines}")


_FIELD_PREFIX = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*): ")


def format_validation_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Turn pydantic errors into ``(dotted.field.path, plain sentence)`` pairs.

    Discriminated-union tags are dropped from the path so the user sees
    ``algorithm.alpha`` rather than ``algorithm.rlad.alpha``.
    """
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if len(loc) >= 2 and loc[0] == "algorithm" and loc[1] in ALGORITHMS:
            loc.pop(1)
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        # Cross-field validators start their message with the field they blame: "eval.size: ...".
        m = _FIELD_PREFIX.match(msg)
        if m and err["type"] == "value_error":
            loc = [*loc, m.group(1)]
            msg = msg[m.end() :]
        out.append((".".join(loc) or "(spec)", msg))
    return out


def set_dotted(data: dict, dotted: str, value: Any) -> dict:
    """``set_dotted(d, "rollout.temperature", 0.7)``: one field of a spec mapping, creating sections
    as needed. Used by ``--set``, the demo and the benchmarks; the result is re-validated whole."""
    node = data
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return data


def parse_spec(data: Any, source: str = "<spec>") -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(source, [("(spec)", f"expected a mapping at the top level, got {type(data).__name__}")])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, format_validation_errors(exc)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Load a JobSpec from a YAML or JSON file, raising :class:`SpecError` with field paths."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [("(file)", f"cannot read: {exc}")]) from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # pyyaml is a base dependency

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError carry the line
        raise SpecError(str(path), [("(file)", f"not valid YAML/JSON: {exc}")]) from None
    return parse_spec(data, str(path))
