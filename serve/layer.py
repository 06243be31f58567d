"""vLLM's OpenAI serving layer (the classes behind ``vllm serve``) on one engine client.

``OpenAILayer(engine_client, ...)`` builds what ``vllm serve``'s api_server builds for a generate
model (vllm/entrypoints/launchers/api_server/app_state.py, generate/api_router.py):
``OpenAIServingModels``, one ``OnlineRenderer`` (chat templates, tokenization, length checks),
``OpenAIServingCompletion`` and ``OpenAIServingChat``, with ``vllm serve``'s defaults (no request
logging, no tool parser, the model's own chat template). The engine client is vLLM's ``AsyncLLM``
or serve/hf_client.py's adapter.

Each call returns vLLM's response model, or for a streaming request its server-sent-event
generator; vLLM's ``ErrorResponse`` and exceptions become ``ApiError`` with the field named.
Protégé's own part (versions, admission, limits, fingerprints) is serve/generator.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

from protege.serve.api import ApiError

# vLLM names the checked quantity, not the request field it came from.
_FIELD = {"input_tokens": "prompt", "input_text": "prompt"}


class OpenAILayer:
    def __init__(self, engine_client: Any, *, model_name: str, model_path: str | Path):
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers.online_renderer import OnlineRenderer

        self.client = engine_client
        self.models = OpenAIServingModels(engine_client, [BaseModelPath(name=model_name, model_path=str(model_path))])
        renderer = OnlineRenderer(
            engine_client.model_config,
            engine_client.renderer,
            request_logger=None,
            chat_template=None,
            chat_template_content_format="auto",
        )
        self.completion = OpenAIServingCompletion(
            engine_client, self.models, online_renderer=renderer, request_logger=None
        )
        self.chat = OpenAIServingChat(
            engine_client,
            self.models,
            "assistant",
            online_renderer=renderer,
            request_logger=None,
            chat_template=None,
            chat_template_content_format="auto",
        )
        self.tokenizer = engine_client.renderer.tokenizer
        self.max_model_len = engine_client.model_config.max_model_len

    # raw_request=None: vLLM would take the request id, priority, session and data-parallel rank
    # from client headers, which are a trusted router's to set, not a client's.
    async def complete(self, req) -> Any:
        try:
            return _checked(await self.completion.create_completion(req, None), "prompt")
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below: client errors 4xx, the rest 5xx
            raise api_error(exc, "prompt") from exc

    async def chat_complete(self, req) -> Any:
        try:
            return _checked(await self.chat.create_chat_completion(req, None), "messages")
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc, "messages") from exc


def _checked(out: Any, prompt_field: str) -> Any:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(out, ErrorResponse):
        raise _from_error_response(out, prompt_field)
    return out


def api_error(exc: BaseException, prompt_field: str = "prompt") -> ApiError:
    """vLLM's classification of an exception (``vllm serve``'s handlers) as an ``ApiError``."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return _from_error_response(create_error_response(exc), prompt_field)


def _from_error_response(err: Any, prompt_field: str) -> ApiError:
    e = err.error
    param = _FIELD.get(e.param, e.param)
    if param == "prompt":
        param = prompt_field  # a chat prompt is its messages
    status = e.code
    if status == 501:  # "not implemented" is a request this server cannot serve: the client's to change
        status = 400
    message = f"{param}: {e.message}" if param and not e.message.startswith(f"{param}:") else e.message
    return ApiError(status, message, param=param)


def is_event_stream(out: Any) -> bool:
    return isinstance(out, AsyncIterator)
