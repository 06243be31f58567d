"""The request models of the student endpoint: vLLM's own (``vllm serve``'s), with Protégé's checks.

Everything vLLM's OpenAI layer implements is accepted (logprobs, echo, batched prompts,
response_format, seed, top_k, ...), with three differences that keep a public endpoint strict:

- a field vLLM does not know is a 400 naming it (vLLM logs and ignores it: a typo would silently
  change nothing);
- the fields that steer vLLM's internals rather than sampling (KV-transfer hand-offs, raw tensors,
  request ids, scheduling priority, cache salts, per-request chat templates) are refused: they
  are for a trusted router in front of vLLM, not for any client holding the API key;
- OpenAI's documented ranges (temperature, top_p, penalties, stop count) are checked here, so the
  error names the field instead of coming back from deep inside the sampler.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as _VLLMChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as _VLLMCompletion

MAX_STOP = 4  # OpenAI's limit on stop sequences

# Refused when sent (a field validator runs only on a value the client gave, not on the default).
INTERNAL_FIELDS = (
    "kv_transfer_params",
    "ec_transfer_params",
    "mm_payload",
    "return_mm_kwargs",
    "request_id",
    "priority",
    "session_id",
    "cache_salt",
    "vllm_xargs",
    "routed_experts_prompt_start",
)
COMPLETION_ONLY = ("prompt_embeds",)
CHAT_ONLY = ("chat_template", "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs")


class FieldError(ValueError):
    """A model-level check's error that names its field (api.validation_error reads ``parameter``)."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


def _refuse(cls, value):
    raise ValueError("not accepted by this server")


def _hidden(base, names: tuple[str, ...]):
    """``base`` with ``names`` left out of the OpenAPI schema, defaults unchanged (vLLM reads them)."""
    fields = {n: (SkipJsonSchema[base.model_fields[n].annotation], base.model_fields[n]) for n in names}
    return create_model(f"_{base.__name__}", __base__=base, **fields)


def _check_stop(cls, v):
    stops = [v] if isinstance(v, str) else (v or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops


class CompletionRequest(_hidden(_VLLMCompletion, INTERNAL_FIELDS + COMPLETION_ONLY)):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)  # the openai client always sends it; vLLM would default it
    prompt: _VLLMCompletion.model_fields["prompt"].annotation = Field(
        description="text, token ids, or a batch of either"
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=16, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = Field(default_factory=list)  # vLLM's own bound would name "stop.list[str]"

    _refused = field_validator(*INTERNAL_FIELDS, *COMPLETION_ONLY)(classmethod(_refuse))
    _stops = field_validator("stop")(classmethod(_check_stop))

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if v is None or v == "" or v == [] or (isinstance(v, list) and any(p == [] or p == "" for p in v)):
            raise ValueError("must not be empty")
        return v


class ChatCompletionRequest(_hidden(_VLLMChat, INTERNAL_FIELDS + CHAT_ONLY)):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: _VLLMChat.model_fields["messages"].annotation = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)  # older clients; newer send max_completion_tokens
    max_completion_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = Field(default_factory=list)

    _refused = field_validator(*INTERNAL_FIELDS, *CHAT_ONLY)(classmethod(_refuse))
    _stops = field_validator("stop")(classmethod(_check_stop))

    @model_validator(mode="after")
    def _one_limit(self) -> "ChatCompletionRequest":
        if self.__dict__["max_tokens"] is not None and self.max_completion_tokens is not None:
            raise FieldError("max_tokens", "give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_limit(self) -> int | None:
        # __dict__: vLLM marks max_tokens deprecated, and reading the attribute warns on every request.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.__dict__["max_tokens"]
