"""REST shapes of the student endpoint: OpenAI's, so the official ``openai`` client works unchanged.

Only pydantic and the standard library here (style §3): the request models are the validation, and
a field the server does not implement is an error naming it, never silently ignored. The openai
client sends only the parameters a caller set, so rejecting unknown fields costs it nothing.
``ServeArgs`` is the typed argument of ``serve/app.py::build_app``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protege.cluster.spec import ServeSpec

MAX_STOP = 4  # OpenAI's limit on stop sequences


class ApiError(Exception):
    """An error the endpoint answers with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "overloaded_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError | Any) -> ApiError:
    """A pydantic / FastAPI validation error as one 400 whose message names every bad field."""
    parts, first = [], None
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        loc = loc[1:] if loc[:1] == ["body"] else loc  # FastAPI prefixes the request part
        field = "body" if err["type"] == "json_invalid" else ".".join(loc) or "body"
        msg = "unknown or unsupported field" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{field}: {msg}")
        first = first or field
    return ApiError(400, "; ".join(parts) or "invalid request", param=first)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Sampling fields shared by both endpoints. Static ranges here; server limits in StudentGenerator."""

    model: str = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; not used
    # vLLM's extension (extra_body={"ignore_eos": True}): fixed-length outputs for load tests.
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(description="one prompt: text or token ids")
    max_tokens: int = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            v = v[0]
        if isinstance(v, list) and not v or v == "":
            raise ValueError("must not be empty")
        return v


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # newer clients send this name
    logprobs: Literal[False] | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> "ChatCompletionRequest":
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_tokens: give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ------------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str  # "protege-vN": the checkpoint version that answered
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "protege"
    root: str  # the Hugging Face folder being served
    version: int  # the published checkpoint version (0: a plain model folder)
    step: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def fingerprint(version: int) -> str:
    return f"protege-v{version}"


# ------------------------------------------------------------------------------------- app args
class ServeArgs(BaseModel):
    """Arguments of ``build_app`` (also ``serve run protege.serve.app:build_app target=...``)."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="run dir (follows its published versions), checkpoint, or HF model folder")
    serve: ServeSpec = Field(default_factory=ServeSpec)
    engine: Literal["vllm", "hf"] = "vllm"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    model_name: str | None = Field(default=None, description="name in /v1/models; default: the run dir's name")
    max_model_len: int = Field(default=1024, ge=16)
    max_n: int = Field(default=4, ge=1, description="largest n (choices per request)")
    kv_cache_gb: float = Field(default=0.25, gt=0, description="vLLM KV cache per replica on CPU")
    poll_s: float = Field(default=2.0, gt=0, description="how often a replica checks for a newer published version")
    replica_cpus: float = Field(default=1.0, ge=0)
    replica_gpus: float = Field(default=0.0, ge=0)
    seed: int = 0
