"""What the student endpoint adds to OpenAI's REST API, and the typed argument of ``build_app``.

The API itself (request and response shapes, sampling, logprobs, streaming, guided decoding) is
vLLM's own OpenAI serving layer, the one behind ``vllm serve`` (serve/protocol.py, serve/layer.py).
This module holds Protégé's part and imports only pydantic, the standard library and core/spec.py
(serve/protocol.py, which needs vLLM, on first use of its request models), so the CLI and the spec
load without vLLM:

- ``ApiError``: an error answered with a status and OpenAI's error body, the bad field named;
- ``validation_error``: a pydantic error as one 400 naming every bad field;
- ``ServeArgs``: arguments of ``serve/app.py::build_app``.

``CompletionRequest`` and ``ChatCompletionRequest`` (serve/protocol.py, vLLM's request models with
Protégé's stricter checks) are importable from here too, loaded on first use.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protege.core.spec import ServeSpec

_LAZY = ("CompletionRequest", "ChatCompletionRequest")


def __getattr__(name: str):
    # The request models subclass vLLM's: importing them here eagerly would make every
    # `import protege.serve.api` (the CLI, spec validation) load vLLM and torch.
    if name in _LAZY:
        from protege.serve import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ApiError(Exception):
    """An error the endpoint answers with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "overloaded_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError | Any) -> ApiError:
    """A pydantic / FastAPI validation error as one 400 whose message names every bad field."""
    parts, first = [], None
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        loc = loc[1:] if loc[:1] == ["body"] else loc  # FastAPI prefixes the request part
        # A model-level check names its field on the error it raised (serve/protocol.py FieldError).
        named = getattr((err.get("ctx") or {}).get("error"), "parameter", None)
        field = "body" if err["type"] == "json_invalid" else (loc[0] if loc else named or "body")
        msg = "unknown or unsupported field" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        # Deeper locations (messages.0.content, a union member) follow the field, which comes first.
        parts.append(f"{field}: {msg}" + (f" (at {'.'.join(loc)})" if len(loc) > 1 else ""))
        first = first or field
    return ApiError(400, "; ".join(parts) or "invalid request", param=first)


def fingerprint(version: int) -> str:
    """``system_fingerprint`` of every answer: the checkpoint version that produced it."""
    return f"protege-v{version}"


# ------------------------------------------------------------------------------------- app args
class ServeArgs(BaseModel):
    """Arguments of ``build_app`` (also ``serve run protege.serve.app:build_app target=...``).

    The engine and the request limits are ``serve.*`` (core/spec.py ServeSpec); these are how a
    replica loads the model.
    """

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="run dir (follows its published versions), checkpoint, or HF model folder")
    serve: ServeSpec = Field(default_factory=ServeSpec)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    model_name: str | None = Field(default=None, description="name in /v1/models; default: the run dir's name")
    max_model_len: int = Field(default=1024, ge=16)
    kv_cache_gb: float = Field(default=0.25, gt=0, description="vLLM KV cache per replica on CPU")
    poll_s: float = Field(default=2.0, gt=0, description="how often a replica checks for a newer published version")
    replica_cpus: float = Field(default=1.0, ge=0)
    replica_gpus: float = Field(default=0.0, ge=0)
    seed: int = 0
