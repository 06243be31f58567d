"""StudentGenerator: the serving logic, as a plain class (serve/app.py only routes HTTP to it).

It owns one streaming engine (actors/engine.py) loaded from a published checkpoint and answers
OpenAI-shaped requests (serve/api.py): checks them against the server's limits, admits at most
``max_concurrent`` at once (503 beyond: a bounded server, not an unbounded queue), and switches to
a newer checkpoint version without failing a request:

    close the gate (new requests wait) -> let running requests finish -> load the new weights
    into the same engine (or a new engine if the architecture changed) -> open the gate.

Every answer is produced entirely by one version and says which (``system_fingerprint``). The
pause lasts as long as the longest running request, bounded by ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from protege.serve import versions
from protege.serve.api import (
    ApiError, AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, CompletionChoice,
    CompletionRequest, CompletionResponse, ModelCard, ModelList, Usage, fingerprint, new_id, now,
)
from protege.serve.versions import Version

log = logging.getLogger("protege.serve")


class _Slot:
    """One admitted request. Released exactly once: when its stream ends, or when it is collected
    (a streaming response whose body never started would otherwise leak capacity for good)."""

    def __init__(self, gen: "StudentGenerator"):
        self._gen: StudentGenerator | None = gen
        gen.admitted += 1

    def release(self) -> None:
        if self._gen is not None:
            self._gen.admitted -= 1
            self._gen = None

    __del__ = release

    def __enter__(self) -> "_Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StudentGenerator:
    def __init__(self, version: Version, *, model_name: str, engine: str = "vllm", max_tokens: int = 256,
                 max_n: int = 4, max_concurrent: int = 32, max_model_len: int = 1024, dtype: str = "float32",
                 kv_cache_bytes: int = 256 << 20, seed: int = 0):
        self.model_name = model_name
        self.max_tokens, self.max_n, self.max_concurrent = max_tokens, max_n, max_concurrent
        self.max_model_len = max_model_len
        self._engine_kind = engine
        self._engine_kw = dict(dtype=dtype, max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes, seed=seed)
        if engine == "vllm":
            self._engine_kw["max_num_seqs"] = max_concurrent * max_n
        self.engine = self._make_engine(version.model_path)
        self.version = version
        # Kept, not re-read: the served checkpoint's folder may be pruned (checkpoint.keep) meanwhile.
        self._signature = model_signature(version.model_path)
        self.admitted = 0  # requests holding a slot (waiting at the gate or generating)
        self._active = 0  # requests inside the engine now
        self._gate = asyncio.Event()
        self._gate.set()
        self._switch = asyncio.Lock()
        self._loaded_at = now()
        self.last_switch: dict[str, float] = {}

    def _make_engine(self, model_path: Path):
        from protege.actors.engine import make_async_engine

        return make_async_engine(self._engine_kind, str(model_path), **self._engine_kw)

    # ---------------------------------------------------------------------------------- requests
    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        ids, params = self._prepare_completion(req)
        with self._admit():
            rid = new_id("cmpl")
            texts, finish, tokens, version = await self._collect(ids, params, rid, req.n)
        return CompletionResponse(
            id=rid, created=now(), model=self.model_name, system_fingerprint=fingerprint(version),
            choices=[CompletionChoice(index=i, text=texts[i], finish_reason=finish[i]) for i in range(req.n)],
            usage=Usage(prompt_tokens=len(ids), completion_tokens=tokens, total_tokens=len(ids) + tokens))

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        ids, params = self._prepare_chat(req)
        with self._admit():
            rid = new_id("chatcmpl")
            texts, finish, tokens, version = await self._collect(ids, params, rid, req.n)
        return ChatCompletionResponse(
            id=rid, created=now(), model=self.model_name, system_fingerprint=fingerprint(version),
            choices=[ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=finish[i])
                     for i in range(req.n)],
            usage=Usage(prompt_tokens=len(ids), completion_tokens=tokens, total_tokens=len(ids) + tokens))

    def stream_completion(self, req: CompletionRequest) -> AsyncIterator[str]:
        """Server-sent events. Not async: validation and admission happen now, so a bad or excess
        request gets its 4xx / 503 status instead of an error inside a 200 stream."""
        ids, params = self._prepare_completion(req)
        return self._sse(ids, params, new_id("cmpl"), "text_completion", req.include_usage, self._admit())

    def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        ids, params = self._prepare_chat(req)
        return self._sse(ids, params, new_id("chatcmpl"), "chat.completion.chunk", req.include_usage, self._admit())

    def models(self) -> ModelList:
        v = self.version
        return ModelList(data=[ModelCard(id=self.model_name, created=self._loaded_at, root=str(v.model_path),
                                         version=v.number, step=v.step)])

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "version": self.version.number,
                "in_flight": self.admitted, "switching": not self._gate.is_set(), "last_switch": self.last_switch}

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
            fresh = None if signature == self._signature else \
                await asyncio.to_thread(self._make_engine, version.model_path)
            self._gate.clear()
            try:
                while self._active:
                    await asyncio.sleep(0.005)
                paused = time.perf_counter()
                if fresh is None:
                    await self.engine.reload(version.model_path)
                else:
                    old, self.engine = self.engine, fresh
                    await asyncio.to_thread(old.close)
                self.version, self._signature, self._loaded_at = version, signature, now()
            finally:
                self._gate.set()
            done = time.perf_counter()
            self.last_switch = {"version": version.number, "seconds": done - t0, "paused_s": done - paused}
            log.info("serving version %d (%s) after %.2fs, paused %.3fs",
                     version.number, version.model_path, done - t0, done - paused)
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
    def _admit(self) -> _Slot:
        if self.admitted >= self.max_concurrent:
            raise ApiError(503, f"server overloaded: {self.max_concurrent} requests already in flight on this "
                                "replica; retry later", code="overloaded")
        return _Slot(self)

    @asynccontextmanager
    async def _use_engine(self):
        await self._gate.wait()  # closed while a new version loads
        self._active += 1  # no await since the gate check: a switch cannot slip in between
        try:
            yield self.engine, self.version.number
        finally:
            self._active -= 1

    async def _run(self, ids, params, rid, final_only: bool = False) -> AsyncIterator[tuple[list, int]]:
        async with self._use_engine() as (engine, version):
            async for deltas in engine.stream(ids, request_id=rid, final_only=final_only, **params):
                yield deltas, version

    async def _collect(self, ids, params, rid, n):
        texts, finish, tokens, version = [""] * n, [None] * n, 0, -1
        async for deltas, version in self._run(ids, params, rid, final_only=True):
            for d in deltas:
                texts[d.index] += d.text
                tokens += d.tokens
                finish[d.index] = d.finish_reason or finish[d.index]
        return texts, finish, tokens, version

    async def _sse(self, ids, params, rid, kind, include_usage, slot: _Slot) -> AsyncIterator[str]:
        chat = kind == "chat.completion.chunk"
        started, tokens, version = set(), 0, self.version.number

        def head() -> dict:
            return {"id": rid, "object": kind, "created": now(), "model": self.model_name,
                    "system_fingerprint": fingerprint(version)}

        try:
            async for deltas, version in self._run(ids, params, rid):
                choices = []
                for d in deltas:
                    tokens += d.tokens
                    first = d.index not in started
                    started.add(d.index)
                    if not (d.text or d.finish_reason or first):
                        continue  # tokens that do not yet decode to whole characters: nothing to send
                    if chat:  # OpenAI opens each choice with the role
                        delta = {"role": "assistant", "content": d.text} if first else \
                            ({"content": d.text} if d.text else {})
                        choices.append({"index": d.index, "delta": delta, "finish_reason": d.finish_reason,
                                        "logprobs": None})
                    else:
                        choices.append({"index": d.index, "text": d.text, "finish_reason": d.finish_reason,
                                        "logprobs": None})
                if choices:
                    yield _event({**head(), "choices": choices})
            if include_usage:
                usage = Usage(prompt_tokens=len(ids), completion_tokens=tokens, total_tokens=len(ids) + tokens)
                yield _event({**head(), "choices": [], "usage": usage.model_dump()})
        except Exception as exc:  # headers are sent: the error can only travel inside the stream
            log.exception("stream %s failed", rid)
            yield _event(ApiError(500, f"generation failed: {exc}").body())
        finally:
            slot.release()
        yield "data: [DONE]\n\n"

    def _check_model(self, req) -> None:
        if req.model != self.model_name:
            raise ApiError(404, f"model '{req.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _prepare_completion(self, req: CompletionRequest) -> tuple[list[int], dict]:
        self._check_model(req)
        if isinstance(req.prompt, str):
            ids = self.engine.tokenizer(req.prompt)["input_ids"]
        else:
            vocab = len(self.engine.tokenizer)
            if any(not 0 <= t < vocab for t in req.prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            ids = list(req.prompt)
        return ids, self._params(req, ids, req.max_tokens)

    def _prepare_chat(self, req: ChatCompletionRequest) -> tuple[list[int], dict]:
        self._check_model(req)
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "messages: this model has no chat template; use /v1/completions", param="messages")
        # developer is OpenAI's newer name for system; HF chat templates know only system.
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        limit = req.token_limit
        if limit is None:  # OpenAI's default is "up to the context"; ours is bounded by the server limit
            limit = max(1, min(self.max_tokens, self.max_model_len - len(ids)))
        return ids, self._params(req, ids, limit)

    def _params(self, req, ids: list[int], max_tokens: int) -> dict:
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        if req.n > self.max_n:
            raise ApiError(400, f"n: at most {self.max_n} choices per request (got {req.n})", param="n")
        if max_tokens > self.max_tokens:
            raise ApiError(400, f"{field}: at most {self.max_tokens} on this server (got {max_tokens})", param=field)
        if len(ids) + max_tokens > self.max_model_len:
            raise ApiError(400, f"prompt: {len(ids)} prompt tokens plus {field} {max_tokens} exceed the context "
                                f"of {self.max_model_len} tokens; shorten the prompt or lower {field}", param="prompt")
        return dict(n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens, stop=req.stop,
                    seed=req.seed, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                    ignore_eos=req.ignore_eos)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def model_signature(path: Path) -> str:
    """Equal for two folders whose weights are interchangeable in one engine (config and tokenizer)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    for k in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    tok = Path(path) / "tokenizer.json"
    h.update(tok.read_bytes() if tok.is_file() else b"")
    return h.hexdigest()
