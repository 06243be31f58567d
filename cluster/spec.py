"""JobSpec: the one typed description of a Protégé job.

The CLI, the REST job API and the driver all read this model, so the schema, the
validation messages and the running job cannot disagree. This module imports only
pydantic and the standard library: a REST front end can validate jobs without torch,
vLLM or Ray installed.

Defaults for each algorithm are the vetted settings in ../shared/docs/algorithms.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as `learnig_rate` must fail, not be ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- models
class ModelRef(_Strict):
    """A causal LM: a Hugging Face hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local folder."""

    path: str = Field(min_length=1, description="HF hub id or local path")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None


class ModelsSpec(_Strict):
    student: ModelRef
    teacher: ModelRef | None = None
    reward_model: ModelRef | None = Field(
        default=None, description=("sequence-classification reward model with one output (optional); "
                                   "used by the reward named 'reward_model'")
    )


# --------------------------------------------------------------------------- data
class DataSpec(_Strict):
    """Where prompts come from: a reasoning-gym task, or a JSONL/Parquet file."""

    source: Literal["reasoning_gym", "file"] = "reasoning_gym"
    task: str | None = Field(default=None, description="reasoning-gym task name, e.g. basic_arithmetic")
    task_config: dict[str, Any] = Field(default_factory=dict, description="kwargs for the task generator")
    size: int = Field(default=512, ge=1, description="examples generated for a reasoning-gym task")
    seed: int = 0
    path: str | None = Field(default=None, description="JSONL/Parquet file (source: file)")
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    # Preference data for offline DPO (prompt, chosen, rejected).
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    eval_size: int = Field(default=32, ge=0, description="held-out examples for greedy evaluation")
    system_prompt: str | None = None

    @model_validator(mode="after")
    def _source_fields(self) -> "DataSpec":
        if self.source == "reasoning_gym" and not self.task:
            raise ValueError("task: source 'reasoning_gym' needs a task name")
        if self.source == "file" and not self.path:
            raise ValueError("path: source 'file' needs a path")
        if self.source == "reasoning_gym" and self.eval_size >= self.size:
            raise ValueError(f"eval_size: must be smaller than size ({self.size})")
        return self


# --------------------------------------------------------------------------- algorithms
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KlEstimator = Literal["k1", "k2", "k3"]


class _PolicyGradient(_Strict):
    """Options shared by the GRPO family (DeepSeekMath GRPO, DAPO clip-higher, Dr. GRPO)."""

    eps_low: float = Field(default=0.2, gt=0, lt=1)
    eps_high: float = Field(default=0.28, gt=0)
    adv_std_norm: bool = Field(default=True, description="False = Dr. GRPO (no std normalisation)")
    loss_agg: LossAgg = "token-mean"
    kl_coef: float = Field(default=0.0, ge=0, description="β for KL to the reference (0 = no reference pass)")
    kl_estimator: KlEstimator = "k3"
    dynamic_sampling: bool = Field(default=False, description="DAPO: drop groups whose rewards are all equal")
    max_staleness: int = Field(
        default=0, ge=0, le=4, description="0 strictly on-policy; 1 overlaps generation of t+1 with training of t"
    )


class GRPOSpec(_PolicyGradient):
    type: Literal["grpo"] = "grpo"


class RLADSpec(_PolicyGradient):
    """RLAD / TRRD (arXiv 2602.22495). alpha = 1 is plain GRPO (Eq. 3)."""

    type: Literal["rlad"] = "rlad"
    alpha: float = Field(default=0.5, description="mixing weight of the old policy in the TRRD anchor")
    clamp: float = Field(default=1.0, gt=0, description="clamp on log(π_θ/π_T), Appendix B")

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be between 0 and 1")
        return v


class KEPOSpec(_PolicyGradient):
    """KEPO: GRPO + quality-gated distillation + knowledge-enhanced exploration."""

    type: Literal["kepo"] = "kepo"
    distill_coef: float = Field(default=1.0, ge=0)
    gate_threshold: float = Field(default=1.0, description="τ: distil responses whose accuracy reward ≥ τ")
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"
    top_k: int = Field(default=16, ge=1, le=1024, description="teacher top-k rows for forward_kl / jsd")
    jsd_beta: float = Field(default=0.5, gt=0, lt=1)
    hints: bool = Field(default=True, description="knowledge-enhanced exploration on all-zero groups")
    hint_attempts: int = Field(default=4, ge=1, description="N: rejection-sampling attempts with the hint")
    hint_replace: int = Field(default=2, ge=1, description="m: group members replaced by accepted responses")
    hint_max_tokens: int = Field(default=64, ge=1)


class OPDSpec(_Strict):
    """On-policy distillation: per-token reverse KL to the teacher on student samples (GKD, λ=1)."""

    type: Literal["opd"] = "opd"
    grpo_coef: float = Field(default=0.0, ge=0, description="> 0 adds the GRPO loss with this weight")
    opd_coef: float = Field(default=1.0, gt=0)
    eps_low: float = Field(default=0.2, gt=0, lt=1)
    eps_high: float = Field(default=0.28, gt=0)
    adv_std_norm: bool = True
    loss_agg: LossAgg = "token-mean"
    max_staleness: int = Field(default=0, ge=0, le=4)


class DPOSpec(_Strict):
    """DPO (arXiv 2305.18290), offline from preference pairs or online from ranked student samples."""

    type: Literal["dpo"] = "dpo"
    beta: float = Field(default=0.1, gt=0)
    mode: Literal["offline", "online"] = "online"
    reference: Literal["initial", "teacher"] = "initial"
    max_staleness: int = Field(default=0, ge=0, le=4)


class SFTSpec(_Strict):
    """Supervised fine-tuning on (prompt, answer) data or on teacher-generated responses."""

    type: Literal["sft"] = "sft"
    targets: Literal["data", "teacher"] = "data"
    max_staleness: int = Field(default=0, ge=0, le=4)


AlgorithmSpec = Annotated[
    Union[GRPOSpec, RLADSpec, KEPOSpec, OPDSpec, DPOSpec, SFTSpec], Field(discriminator="type")
]
TEACHER_ALGORITHMS = {"rlad", "kepo", "opd"}


# --------------------------------------------------------------------------- rollout / learner
class RolloutSpec(_Strict):
    samples_per_prompt: int = Field(default=4, ge=1, description="G, the group size")
    prompts_per_step: int = Field(default=8, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=32, ge=1)
    max_prompt_tokens: int = Field(default=256, ge=8)
    workers: int = Field(default=1, ge=1)
    engine: Literal["vllm", "hf"] = "vllm"
    kv_cache_gb: float = Field(default=0.25, gt=0, description="KV cache per worker (vLLM on CPU)")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=0.95, description=(
        "vLLM on GPU: share of its GPU's memory a rollout worker (and the teacher's engine) may take. "
        "Default: 0.85 when the role has whole GPUs (disaggregated), 0.3 when it shares one "
        "(resources.*.gpus < 1, colocated with a learner rank that needs the rest)"))


class LearnerSpec(_Strict):
    ranks: int = Field(default=1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    micro_batch: int = Field(default=8, ge=1, description="sequences per rank per forward")
    grad_clip: float = Field(default=1.0, gt=0)
    bf16: bool = False
    updates_per_step: int = Field(default=1, ge=1, description="optimizer steps per rollout batch")
    weight_sync: Literal["auto", "object_store", "nccl"] = Field(
        default="object_store",
        description="object_store: safetensors blob via Ray (CPU and GPU, tested); nccl / auto: vLLM's "
        "NCCL/IPC weight transfer on GPUs (written, not yet verified on hardware)")
    weight_sync_bucket_mb: float = Field(default=512, gt=0, description="NCCL/IPC bucket size")


BUILTIN_REWARDS = ("exact_match", "format", "math_verify", "reasoning_gym", "reward_model")


class RewardSpec(_Strict):
    name: str = Field(description=f"a built-in reward ({', '.join(BUILTIN_REWARDS)}), or your label for `function`",
                      pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    function: str | None = Field(default=None, description=(
        "your own reward: 'package.module:function' or 'path/to/file.py:function', called as "
        "f(completion, reference, meta) -> float (rewards/README: timeouts and errors score 0)"))
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
            raise ValueError(f"name: unknown reward '{self.name}'; built-in rewards are {', '.join(BUILTIN_REWARDS)}, "
                             "or give `function: module:callable` for your own")
        if self.function is not None and self.name in BUILTIN_REWARDS:
            raise ValueError(f"name: '{self.name}' is a built-in reward; give your function another name")
        return self


class CheckpointSpec(_Strict):
    dir: str = Field(default="runs/{name}", description=(
        "run directory (checkpoints, metrics, samples); '{name}' expands to the job name. A local or "
        "shared-volume path, or an object-store URI (s3://bucket/runs/{name}, gs://…, any fsspec "
        "URL; s3/gcs need `pip install 'protege[s3]'` / `'protege[gcs]'`)"))
    local_dir: str = Field(default="runs/{name}", description=(
        "with a URI `dir`: local staging folder for metrics and checkpoints before upload; ignored "
        "for a local `dir`"))
    interval: int = Field(default=10, ge=1, description="save every N steps")
    keep: int = Field(default=2, ge=1, description="keep the last K checkpoints")

    @field_validator("dir")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        # Before anything starts: a typo'd scheme would otherwise fail only at the first save.
        if "://" in v:
            from protege.cluster.storage import check_protocol

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
    size: int = Field(default=32, ge=1, description="held-out prompts, greedy decoding")


class AutoscaleSpec(_Strict):
    """Ray Serve autoscaling of the student endpoint's replicas (Serve's defaults for the delays)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=4, gt=0, description="requests in flight per replica to aim for")
    upscale_delay_s: float = Field(default=30, ge=0, description="load must stay above target this long to add a replica")
    downscale_delay_s: float = Field(default=600, ge=0, description="load must stay below target this long to remove one")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscaleSpec":
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
        default="vllm", description="vllm: vLLM's own OpenAI serving layer on AsyncLLM; hf: transformers, "
        "one request at a time, behind the same serving layer (no guided decoding)")
    autoscale: AutoscaleSpec = Field(default_factory=AutoscaleSpec)


class RoleResources(_Strict):
    cpus: float = Field(default=1, ge=0)
    gpus: float = Field(default=0, ge=0)
    custom: dict[str, float] = Field(default_factory=dict, description="extra Ray resources, e.g. {gpu_node: 1}")


class ResourcesSpec(_Strict):
    # Fractional CPUs let a 2-core laptop hold every role; clusters give whole GPUs.
    rollout: RoleResources = Field(default_factory=lambda: RoleResources(cpus=0.5))
    learner: RoleResources = Field(default_factory=lambda: RoleResources(cpus=0.5))
    teacher: RoleResources = Field(default_factory=lambda: RoleResources(cpus=0.25))
    reward: RoleResources = Field(default_factory=lambda: RoleResources(cpus=0.25))
    reward_model: RoleResources = Field(default_factory=lambda: RoleResources(cpus=0.25),
                                        description="the models.reward_model scorer (give it a GPU for a large model)")
    placement_timeout_s: float = Field(default=30, gt=0, description="fail fast when roles cannot be placed")


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
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="reasoning_gym")])
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    fault_tolerance: FaultToleranceSpec = Field(default_factory=FaultToleranceSpec)

    @model_validator(mode="after")
    def _cross_field(self) -> "JobSpec":
        algo = self.algorithm
        if algo.type in TEACHER_ALGORITHMS and self.models.teacher is None:
            raise ValueError(f"models.teacher: algorithm '{algo.type}' needs a teacher model")
        if algo.type == "dpo" and algo.reference == "teacher" and self.models.teacher is None:
            raise ValueError("models.teacher: dpo with reference 'teacher' needs a teacher model")
        if algo.type == "sft" and algo.targets == "teacher" and self.models.teacher is None:
            raise ValueError("models.teacher: sft with targets 'teacher' needs a teacher model")
        if algo.type == "dpo" and algo.mode == "offline" and self.data.source != "file":
            raise ValueError("data.source: offline dpo reads (prompt, chosen, rejected) rows from a file: set it to 'file'")
        needs_groups = algo.type in {"grpo", "rlad", "kepo"} or (algo.type == "dpo" and algo.mode == "online")
        if needs_groups and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                f"rollout.samples_per_prompt: must be at least 2, algorithm '{algo.type}' compares samples within a group"
            )
        if algo.type == "kepo" and algo.hint_replace > self.rollout.samples_per_prompt:
            raise ValueError("algorithm.hint_replace: cannot exceed rollout.samples_per_prompt")
        if self.eval.size > self.data.eval_size and self.data.eval_size > 0:
            raise ValueError(f"eval.size: cannot exceed data.eval_size ({self.data.eval_size})")
        names = [r.name for r in self.rewards]
        if "reward_model" in names and self.models.reward_model is None:
            raise ValueError("models.reward_model: the reward 'reward_model' needs a reward model "
                             "(a sequence-classification model with one output)")
        if self.models.reward_model is not None and "reward_model" not in names:
            raise ValueError("rewards: models.reward_model is set but no reward uses it; add "
                             "{name: reward_model, weight: …} to rewards")
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"rewards: each reward needs its own name (metrics are keyed by it); repeated: {', '.join(twice)}")
        if any(r.name == "reasoning_gym" for r in self.rewards) and self.data.source != "reasoning_gym":
            raise ValueError("rewards: the 'reasoning_gym' reward scores reasoning-gym tasks; data.source is not reasoning_gym")
        if not self.rewards and algo.type not in {"sft", "opd"} and not (algo.type == "dpo" and algo.mode == "offline"):
            raise ValueError(f"rewards: algorithm '{algo.type}' needs at least one reward")
        return self

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

    def needs_teacher_scoring(self) -> bool:
        return self.algorithm.type in TEACHER_ALGORITHMS


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
        if len(loc) >= 2 and loc[0] == "algorithm" and loc[1] in {"grpo", "rlad", "kepo", "opd", "dpo", "sft"}:
            loc.pop(1)
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        # Cross-field validators start their message with the field they blame: "eval.size: ...".
        m = _FIELD_PREFIX.match(msg)
        if m and err["type"] == "value_error":
            loc = [*loc, m.group(1)]
            msg = msg[m.end():]
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
