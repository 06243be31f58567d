"""The student endpoint as a Ray Serve application (a typed app builder over a plain class).

    build_app(ServeArgs) -> Application       also: serve run protege.serve.app:build_app target=RUN_DIR

One deployment, ``StudentServer``: a thin shell that builds a :class:`StudentGenerator`, follows the
run dir for newly published versions, and routes OpenAI's REST API to it. The API is vLLM's own
serving layer (the one behind ``vllm serve``: serve/layer.py), with the same request and response
shapes, logprobs, echo, batched prompts, seeds, guided decoding and streaming usage:

    GET  /health                 no key needed (load balancers, Serve's own probes use check_health)
    GET  /v1/models              the served model and its checkpoint version
    POST /v1/completions         text or token-id prompt(s); "stream": true for server-sent events
    POST /v1/chat/completions    chat template applied server side; "stream": true likewise

Replicas follow load between ``serve.autoscale`` bounds. Each replica admits at most
``serve.max_concurrent`` requests and answers 503 beyond (the openai client retries 503 with
backoff by itself); Serve's router queue in front of the replicas is bounded as well.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import logging.handlers
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from vllm.exceptions import VLLMError

from protege.core import storage
from protege.core.env import configure_node_defaults
from protege.core.spec import ServeSpec
from protege.serve import versions
from protege.serve.api import ApiError, ServeArgs, validation_error
from protege.serve.generator import StudentGenerator
from protege.serve.layer import api_error
from protege.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)  # module level: FastAPI reads the annotations

APP_NAME = "protege"
# Serve runs user code on a second event loop thread by default, to shield its control loop from
# blocking user code. Ours never blocks the loop (vLLM runs in its own process, a new engine is built
# in a worker thread), and sharing one loop halved the per-request overhead on 2 CPU cores.
#
# VLLM_CONFIGURE_LOGGING=0: building an engine otherwise runs vLLM's logging.config.dictConfig, which
# closes every handler in the process, Serve's included. Serve writes the replica log (one access line
# per request) through a logging.handlers.MemoryHandler; once closed, its target is None, so it still
# accepts every record but can never flush one: the replica kept one LogRecord per request for good
# (~2.7 kB each, +14 MB/min at 100 req/s in bench/soak.py) and its log file stopped at start-up.
# vLLM's own warnings still reach the replica's stderr log (logging's last-resort handler).
# VLLM_LOGGING_CONFIG_PATH is blanked: vLLM refuses a logging config file with configuration off, so
# one inherited from the cluster's environment would stop the replica from starting.
REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "VLLM_CONFIGURE_LOGGING": "0",
    "VLLM_LOGGING_CONFIG_PATH": "",
}
SERVE_LOGGER = "ray.serve"
log = logging.getLogger("protege.serve")


# ------------------------------------------------------------------------------------- HTTP layer
def make_asgi_app(gen: StudentGenerator, key_hash: str | None) -> FastAPI:
    """OpenAI routes over ``gen``. A plain FastAPI app: tests drive it without Serve too."""
    app = FastAPI(title="Protégé student endpoint", docs_url=None, redoc_url=None)

    def require_key(request: Request) -> None:
        # A dependency, so it runs before body validation: no field-level hints without a key.
        if key_hash is None:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise ApiError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        if not hmac.compare_digest(_sha256(presented.strip()), key_hash):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        err = validation_error(exc)  # OpenAI answers 400, with the offending field named
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(VLLMError)
    async def _vllm_invalid(request: Request, exc: VLLMError):
        # vLLM's request models raise their own error type from some checks, which pydantic passes on.
        return await _api_error(request, api_error(exc))

    @app.get("/health")
    async def health():
        return gen.health()

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        return JSONResponse(gen.models().model_dump())

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(req: CompletionRequest):
        if req.stream:
            return await _streaming(gen.stream_completion(req))
        return JSONResponse((await gen.complete(req)).model_dump())

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(req: ChatCompletionRequest):
        if req.stream:
            return await _streaming(gen.stream_chat(req))
        return JSONResponse((await gen.chat(req)).model_dump())

    return app


async def _streaming(stream) -> StreamingResponse:
    await stream.start()  # a request vLLM rejects gets its 4xx here, not an error inside a 200 stream
    return StreamingResponse(stream, media_type="text/event-stream")


@serve.deployment
@serve.ingress()
class StudentServer:
    """Serve shell: everything it does is build, delegate, and stop."""

    async def __init__(self, args: dict, key_hash: str | None):
        configure_node_defaults()  # this replica's node decides (threads, vLLM's CPU settings), before the engine
        a = ServeArgs.model_validate(args)
        target = versions.resolve(a.target)
        # Version switches belong in the replica's log, which Serve writes through its own logger.
        log.setLevel(logging.INFO)
        for handler in logging.getLogger(SERVE_LOGGER).handlers:
            log.addHandler(handler)
        self.key_hash = key_hash
        with serve_log_handlers_kept():  # see REPLICA_ENV: the engine build must not close Serve's log
            self.gen = StudentGenerator(
                target.version,
                model_name=a.model_name or default_model_name(target),
                engine=a.serve.engine,
                max_tokens=a.serve.max_tokens,
                max_n=a.serve.max_n,
                max_concurrent=a.serve.max_concurrent,
                max_model_len=a.max_model_len,
                dtype=a.dtype,
                kv_cache_bytes=int(a.kv_cache_gb * (1 << 30)),
                seed=a.seed,
            )
        # Runs on the replica's event loop, next to the requests it pauses during a switch.
        self._follow = asyncio.create_task(self.gen.follow(target.run_dir, a.poll_s)) if target.run_dir else None

    def __serve_build_asgi_app__(self):
        return make_asgi_app(self.gen, self.key_hash)

    async def check_health(self) -> None:
        await self.gen.check_health()

    def __del__(self):
        if getattr(self, "_follow", None) is not None:
            self._follow.cancel()
        if getattr(self, "gen", None) is not None:
            self.gen.close()


@contextmanager
def serve_log_handlers_kept(logger_name: str = SERVE_LOGGER) -> Iterator[None]:
    """Undo a ``close()`` of the logger's buffering handlers by code run inside (a library's dictConfig).

    A closed ``MemoryHandler`` drops its target yet stays attached and keeps buffering, so every later
    record is held in memory for good: an unbounded leak (one access-log record per request on a Serve
    replica). REPLICA_ENV keeps vLLM from doing this; this guard covers any other dictConfig run while
    the engine is built (another library, a vLLM version that ignores VLLM_CONFIGURE_LOGGING).
    """
    kept = [
        (h, h.target)
        for h in logging.getLogger(logger_name).handlers
        if isinstance(h, logging.handlers.MemoryHandler) and h.target is not None
    ]
    try:
        yield
    finally:
        for handler, target in kept:
            if handler.target is None:
                handler.target = target  # a closed file handler reopens its file on the next record
                log.warning(
                    "logging handler %r was closed during start-up (a logging dictConfig?); reattached to %r",
                    handler,
                    target,
                )


# ------------------------------------------------------------------------------------- builder
def build_app(args: ServeArgs) -> Application:
    """Check everything that can fail here, in the caller's process, before any replica starts."""
    if isinstance(args, dict):
        args = ServeArgs.model_validate(args)
    target = versions.resolve(args.target)
    key_hash = api_key_hash(args.serve)
    # Absolute: replicas do not share the caller's working directory.
    local = not storage.is_uri(args.target)
    args = args.model_copy(
        update={
            "target": str(Path(args.target).resolve()) if local else args.target,
            "model_name": args.model_name or default_model_name(target),
        }
    )
    # The key itself never travels: replicas get its hash and compare hashes.
    return StudentServer.options(**deployment_options(args)).bind(args.model_dump(mode="json"), key_hash)


def deployment_options(args: ServeArgs) -> dict:
    from protege.core.env import worker_env

    spec = args.serve
    return {
        "name": "StudentServer",
        "autoscaling_config": {
            "min_replicas": spec.autoscale.min_replicas,
            "initial_replicas": max(1, spec.autoscale.min_replicas),  # answer the first request without a cold start
            "max_replicas": spec.autoscale.max_replicas,
            "target_ongoing_requests": spec.autoscale.target_ongoing_requests,
            "upscale_delay_s": spec.autoscale.upscale_delay_s,
            "downscale_delay_s": spec.autoscale.downscale_delay_s,
        },
        # Above max_concurrent the replica itself answers 503 (an OpenAI-shaped error), so Serve may
        # route it more; the router's own queue (no replica free, e.g. while scaling up) is bounded too.
        "max_ongoing_requests": 2 * spec.max_concurrent,
        "max_queued_requests": spec.max_concurrent,
        "ray_actor_options": {
            "num_cpus": args.replica_cpus,
            "num_gpus": args.replica_gpus,
            "runtime_env": {"env_vars": {**worker_env(), **REPLICA_ENV}},
        },
        "health_check_period_s": 10,
        # A stopping replica finishes its requests first: at most max_tokens decoding steps each.
        "graceful_shutdown_timeout_s": 30,
    }


def api_key_hash(spec: ServeSpec) -> str | None:
    """The key is required beyond localhost, and whenever its env var is set."""
    key = os.environ.get(spec.api_key_env, "")
    if key:
        return _sha256(key)
    if not is_loopback(spec.host):
        raise ValueError(
            f"serve.host {spec.host} listens beyond localhost: set {spec.api_key_env} to an API key "
            "(clients send it as 'Authorization: Bearer <key>')"
        )
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def default_model_name(target: versions.Target) -> str:
    if target.run_dir is not None:
        if storage.is_uri(target.run_dir):
            return str(target.run_dir).rstrip("/").rsplit("/", 1)[-1]
        return Path(target.run_dir).resolve().name
    path = Path(target.version.model_path).resolve()
    # step_N/model -> the run's name, which is what a user calls the student
    return (
        path.parent.parent.parent.name if path.name == "model" and path.parent.name.startswith("step_") else path.name
    )


def run(args: ServeArgs) -> str:
    """Start (or update) the app on the connected Ray cluster; returns the base URL. Does not block."""
    serve.start(http_options={"host": args.serve.host, "port": args.serve.port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{args.serve.host}:{args.serve.port}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
