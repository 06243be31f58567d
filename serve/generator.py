"""StudentGenerator: what Protégé adds around vLLM's OpenAI serving layer (serve/layer.py).

It owns one engine loaded from a published checkpoint, with vLLM's serving layer on it, and
around each request:

- checks the server's limits (``max_tokens``, ``max_n`` sequences, token ids in the vocabulary),
  so a request beyond them is a 400 naming the field;
- admits at most ``max_concurrent`` at once (503 beyond: a bounded server, not an unbounded queue);
- stamps every answer, and every streamed chunk, with the checkpoint version that produced it
  (``system_fingerprint: protege-vN``);
- switches to a newer checkpoint version without failing a request:

    close the gate (new requests wait) -> let running requests finish -> load the new weights
    into the same engine (or a new engine and serving layer if the architecture changed) -> open.

The pause lasts as long as the longest running request, bounded by ``max_tokens``. vLLM is
imported only when an engine is built (this module imports without it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from protege.serve import versions
from protege.serve.api import ApiError, fingerprint
from protege.serve.versions import Version

log = logging.getLogger("protege.serve")


class _Lease:
    """What one request holds: its admission slot, and (once it runs) its place in the engine.
    Released exactly once: when the answer is done, or when the lease is collected (a streaming
    response whose body never started would otherwise hold capacity, and block switches, for good)."""

    def __init__(self, gen: "StudentGenerator"):
        self._gen: StudentGenerator | None = gen
        self._running = False
        gen.admitted += 1

    def run(self) -> None:
        """Enter the engine; the caller has just waited for the gate (no await since)."""
        self._running = True
        self._gen._active += 1

    def release(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.admitted -= 1
            if self._running:
                gen._active -= 1

    __del__ = release

    def __enter__(self) -> "_Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class EventStream:
    """A streaming answer: ``await start()`` runs vLLM up to its first event (an error raises
    ``ApiError`` here, so it gets its own status instead of a 200 stream); iterating yields the
    server-sent events, each chunk stamped with the version. Iterating starts it if needed."""

    def __init__(self, gen: "StudentGenerator", lease: _Lease, open_: Callable[[Any], Awaitable[Any]]):
        self._gen, self._lease, self._open = gen, lease, open_
        self._events: AsyncIterator[str] | None = None
        self._fingerprint = ""

    async def start(self) -> None:
        if self._events is not None:
            return
        try:
            layer, version = await self._gen._enter(self._lease)
            self._fingerprint = fingerprint(version)
            self._events = await self._open(layer)
        except BaseException:
            self._lease.release()
            raise

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        try:
            await self.start()
            async for event in self._events:
                yield stamp(event, self._fingerprint)
        finally:
            self._lease.release()
            close = getattr(self._events, "aclose", None)
            if close is not None:  # client gone mid-stream: vLLM aborts the request now, not at GC
                await close()


class StudentGenerator:
    def __init__(
        self,
        version: Version,
        *,
        model_name: str,
        engine: str = "vllm",
        max_tokens: int = 256,
        max_n: int = 4,
        max_concurrent: int = 32,
        max_model_len: int = 1024,
        dtype: str = "float32",
        kv_cache_bytes: int = 256 << 20,
        seed: int = 0,
    ):
        self.model_name = model_name
        self.max_tokens, self.max_n, self.max_concurrent = max_tokens, max_n, max_concurrent
        self.max_model_len = max_model_len
        self._engine_kind = engine
        self._engine_kw = dict(dtype=dtype, max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes, seed=seed)
        if engine == "vllm":
            self._engine_kw["max_num_seqs"] = max_concurrent * max_n
        self.engine, self.layer = self._build(version.model_path)
        self.version = version
        # Kept, not re-read: the served checkpoint's folder may be pruned (checkpoint.keep) meanwhile.
        self._signature = model_signature(version.model_path)
        self.admitted = 0  # requests holding a slot (waiting at the gate or generating)
        self._active = 0  # requests inside the engine now
        self._gate = asyncio.Event()
        self._gate.set()
        self._switch = asyncio.Lock()
        self._loaded_at = int(time.time())
        self.last_switch: dict[str, float] = {}

    def _build(self, model_path: Path):
        """An engine on ``model_path`` and vLLM's serving layer on its engine client."""
        from protege.serve.layer import OpenAILayer

        if self._engine_kind == "vllm":
            from protege.actors.engine import AsyncVLLMEngine

            engine = AsyncVLLMEngine(str(model_path), **self._engine_kw)
            client = engine.llm  # vLLM's AsyncLLM is what `vllm serve` puts under the same classes
        elif self._engine_kind == "hf":
            from protege.serve.hf_client import HFEngineClient

            engine = client = HFEngineClient(str(model_path), **self._engine_kw)
        else:
            raise ValueError(f"unknown serve engine '{self._engine_kind}' (valid: vllm, hf)")
        return engine, OpenAILayer(client, model_name=self.model_name, model_path=model_path)

    # ---------------------------------------------------------------------------------- requests
    async def complete(self, req) -> Any:
        """A whole completion (vLLM's ``CompletionResponse``); ``req.stream`` is ignored."""
        req = self._limit_completion(req, stream=False)
        with self._admit() as lease:
            layer, version = await self._enter(lease)
            out = await layer.complete(req)
        out.system_fingerprint = fingerprint(version)
        return out

    async def chat(self, req) -> Any:
        req = self._limit_chat(req, stream=False)
        with self._admit() as lease:
            layer, version = await self._enter(lease)
            out = await layer.chat_complete(req)
        out.system_fingerprint = fingerprint(version)
        return out

    def stream_completion(self, req) -> EventStream:
        """Server-sent events. Not async: limits and admission are checked now, so an excess
        request gets its 400 / 503 before anything else happens."""
        req = self._limit_completion(req, stream=True)
        return EventStream(self, self._admit(), lambda layer: layer.complete(req))

    def stream_chat(self, req) -> EventStream:
        req = self._limit_chat(req, stream=True)
        return EventStream(self, self._admit(), lambda layer: layer.chat_complete(req))

    def models(self) -> Any:
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

        v = self.version
        # vLLM's model card, plus which checkpoint it is (extra fields: the openai client keeps them).
        return ModelList(
            data=[
                ModelCard(
                    id=self.model_name,
                    created=self._loaded_at,
                    owned_by="protege",
                    root=str(v.model_path),
                    max_model_len=self.max_model_len,
                    version=v.number,
                    step=v.step,
                )
            ]
        )

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_name,
            "version": self.version.number,
            "in_flight": self.admitted,
            "switching": not self._gate.is_set(),
            "last_switch": self.last_switch,
        }

    async def check_health(self) -> None:
        await self.engine.check_health()  # raises when the engine died: Serve then replaces the replica

    # ---------------------------------------------------------------------------------- versions
    async def load_version(self, version: Version) -> dict[str, float]:
        """Serve ``version`` from now on; running requests finish on the old one, none fails."""
        async with self._switch:
            if version == self.version:
                return {"version": version.number, "seconds": 0.0}
            t0 = time.perf_counter()
            # Same architecture and tokenizer: new weights load in place. Otherwise a new engine is
            # built before pausing, so the pause covers only the drain and the swap.
            signature = model_signature(version.model_path)
            fresh = None if signature == self._signature else await asyncio.to_thread(self._build, version.model_path)
            self._gate.clear()
            try:
                while self._active:
                    await asyncio.sleep(0.005)
                paused = time.perf_counter()
                if fresh is None:
                    await self.engine.reload(version.model_path)
                else:
                    old = self.engine
                    self.engine, self.layer = fresh
                    await asyncio.to_thread(old.close)
                self.version, self._signature, self._loaded_at = version, signature, int(time.time())
            finally:
                self._gate.set()
            done = time.perf_counter()
            self.last_switch = {"version": version.number, "seconds": done - t0, "paused_s": done - paused}
            log.info(
                "serving version %d (%s) after %.2fs, paused %.3fs",
                version.number,
                version.model_path,
                done - t0,
                done - paused,
            )
            return self.last_switch

    async def follow(self, run_dir: str | Path, poll_s: float) -> None:
        """Poll the run dir forever; serve whatever ``versions.current`` names (newest or pinned)."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                target = await asyncio.to_thread(versions.current, run_dir)
                # By number and step: a bucket run lists URIs, while what is served is a local copy.
                if target is not None and (target.number, target.step) != (self.version.number, self.version.step):
                    await self.load_version(await asyncio.to_thread(versions.materialize, target))
            except Exception:  # a checkpoint pruned mid-read, a bad pin: keep serving, retry next poll
                log.exception("version check of %s failed; still serving version %d", run_dir, self.version.number)

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    # ---------------------------------------------------------------------------------- internals
    def _admit(self) -> _Lease:
        if self.admitted >= self.max_concurrent:
            raise ApiError(
                503,
                f"server overloaded: {self.max_concurrent} requests already in flight on this replica; retry later",
                code="overloaded",
            )
        return _Lease(self)

    async def _enter(self, lease: _Lease):
        """Wait while a version loads, then run on the layer and version current from then on."""
        await self._gate.wait()
        lease.run()  # no await since the gate check: a switch cannot slip in between
        return self.layer, self.version.number

    def _limit_completion(self, req, *, stream: bool):
        prompts = (
            req.prompt
            if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int)
            else [req.prompt]
        )
        self._check_sequences(len(prompts), req.n or 1, "prompt")
        update: dict[str, Any] = {"stream": stream, **_greedy_choices(req)}
        if "max_tokens" not in req.model_fields_set:  # OpenAI's default (16), within this server's limit
            update["max_tokens"] = min(req.max_tokens or 16, self.max_tokens)
        else:
            self._check_max_tokens("max_tokens", req.max_tokens)
        vocab = len(self.layer.tokenizer)
        for p in prompts:
            if isinstance(p, list) and any(t >= vocab for t in p):  # vLLM's own check names no field
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        self._check_engine_fields(req)
        return req.model_copy(update=update)

    def _limit_chat(self, req, *, stream: bool):
        self._check_sequences(1, req.n or 1, "n")
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        limit = req.token_limit
        self._check_max_tokens(field, limit)
        self._check_engine_fields(req)
        update: dict[str, Any] = {"stream": stream, **_greedy_choices(req)}
        if limit is None:  # OpenAI's default is "up to the context"; ours is bounded by the server limit
            update["max_completion_tokens"] = self.max_tokens  # vLLM lowers it to what the context leaves
        return req.model_copy(update=update)

    def _check_sequences(self, prompts: int, n: int, field: str) -> None:
        if n > self.max_n:
            raise ApiError(400, f"n: at most {self.max_n} choices per request (got {n})", param="n")
        if prompts * n > self.max_n:  # the engine is sized for max_concurrent requests of max_n sequences
            raise ApiError(
                400,
                f"{field}: {prompts} prompts x n={n} is {prompts * n} sequences; at most {self.max_n} per request",
                param=field,
            )

    def _check_engine_fields(self, req) -> None:
        if self._engine_kind == "hf":
            from protege.serve.hf_client import unsupported_field

            if (field := unsupported_field(req)) is not None:
                raise ApiError(400, f"{field}: not supported by this server's engine (serve.engine: hf)", param=field)

    def _check_max_tokens(self, field: str, value: int | None) -> None:
        if value is not None and value > self.max_tokens:
            raise ApiError(400, f"{field}: at most {self.max_tokens} on this server (got {value})", param=field)


def _greedy_choices(req) -> dict[str, Any]:
    """OpenAI answers ``n`` > 1 at temperature 0 with n greedy choices; vLLM refuses it ("n must be 1
    when using greedy sampling"). Sampling from the single most likely token (top_k 1) is the same
    argmax, and vLLM allows it with any n; logprobs are reported before sampling, so they match too."""
    if req.temperature == 0 and (req.n or 1) > 1:
        return {"temperature": 1.0, "top_k": 1}
    return {}


def stamp(event: str, version_fingerprint: str) -> str:
    """One server-sent event with the serving version as its ``system_fingerprint``.

    vLLM stamps only the last chunk (its engine's fingerprint); a client reading any chunk should
    see which checkpoint wrote it. Most chunks carry no fingerprint: a string splice, not a JSON
    round trip, for those (this runs once per streamed token)."""
    if not event.startswith('data: {"id"'):
        return event  # [DONE], or an error inside the stream
    if '"system_fingerprint"' in event:
        body = json.loads(event[6:])
        body["system_fingerprint"] = version_fingerprint
        return f"data: {json.dumps(body)}\n\n"
    return f'data: {{"system_fingerprint":"{version_fingerprint}",' + event[7:]


def model_signature(path: Path) -> str:
    """Equal for two folders whose weights are interchangeable in one engine (config and tokenizer)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    for k in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    tok = Path(path) / "tokenizer.json"
    h.update(tok.read_bytes() if tok.is_file() else b"")
    return h.hexdigest()
