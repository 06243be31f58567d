"""``serve.engine: hf``: transformers ``generate`` behind vLLM's OpenAI serving layer.

vLLM's serving classes (serve/layer.py) need little of an engine client: its configs, its
renderer (tokenizer, chat template), ``generate(input, SamplingParams, request_id)`` yielding
``RequestOutput`` objects, and liveness. ``HFEngineClient`` provides exactly that around
actors/engine.py's ``HFEngine``, so the fallback engine serves the same API with the same
validation and response shapes as vLLM, and needs no second request layer.

What transformers does not do here is refused with a 400 naming the field
(``UNSUPPORTED_FIELDS``): guided decoding, logit bias and token allow/deny lists, OpenAI's
presence/frequency penalties, beam search. Requests run one at a time (no continuous batching),
each answered in one piece (a stream gets one delta per choice). Stop strings cut the output
after it is generated.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator

# Request fields the hf engine cannot honour, with the values that mean "not used".
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "response_format": (None,),
    "structured_outputs": (None,),
    "logit_bias": (None, {}),
    "allowed_token_ids": (None, []),
    "bad_words": (None, []),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "use_beam_search": (False,),
    "logprob_token_ids": (None, []),
    "min_p": (None, 0, 0.0),
    "repetition_detection": (None,),
    "thinking_token_budget": (None,),
}


def unsupported_field(req) -> str | None:
    """The first field of ``req`` that the hf engine cannot honour, if any."""
    for name, unset in UNSUPPORTED_FIELDS.items():
        value = getattr(req, name, None)
        if name == "response_format" and value is not None and getattr(value, "type", None) == "text":
            continue  # plain text is what it produces anyway
        if value not in unset:
            return name
    return None


class HFEngineClient:
    """An engine client (the part of vllm.engine.protocol.EngineClient the serving layer uses)."""

    errored = False
    is_running = True

    def __init__(self, model: str, *, dtype: str = "float32", max_model_len: int = 1024, seed: int = 0, **_: Any):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.renderers import renderer_from_config

        from protege.actors.engine import HFEngine

        # The config and renderer only: no vLLM engine starts (vllm's render-only server does the same).
        self.vllm_config = AsyncEngineArgs(
            model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=True
        ).create_engine_config()
        self.model_config = self.vllm_config.model_config
        self.renderer = renderer_from_config(self.vllm_config)
        self.input_processor = None  # beam search's only use; refused above
        self.hf = HFEngine(model, dtype=dtype, seed=seed)
        self.tokenizer = self.hf.tokenizer
        self._lock = asyncio.Lock()

    @property
    def dead_error(self) -> BaseException:
        return RuntimeError("the hf engine is closed")

    def check_admission(self, n: int, request_id: str | None = None) -> None:
        return None  # StudentGenerator admits requests

    async def generate(self, prompt: dict, sampling_params, request_id: str, **_: Any) -> AsyncIterator[Any]:
        from vllm.exceptions import VLLMValidationError

        p = sampling_params
        for name in ("structured_outputs", "logit_bias", "allowed_token_ids", "bad_words"):
            if getattr(p, name, None):
                raise VLLMValidationError("not supported by the hf engine", parameter=name)
        if prompt.get("type", "token") != "token":
            raise VLLMValidationError("only text or token prompts on the hf engine", parameter="prompt")
        ids = list(prompt["prompt_token_ids"])
        async with self._lock:  # one request at a time: transformers has no continuous batching
            out = await asyncio.to_thread(self._generate, ids, p, request_id, prompt.get("prompt"))
        yield out

    # --------------------------------------------------------------------------------- generation
    def _generate(self, ids: list[int], p, request_id: str, prompt_text: str | None):
        import torch
        from vllm.outputs import CompletionOutput, RequestOutput

        model, tok = self.hf.model, self.tokenizer
        device = self.hf.device
        eos = set() if p.ignore_eos else {tok.eos_token_id}
        stop_ids = set(p.stop_token_ids or [])
        if p.seed is not None:
            torch.manual_seed(p.seed)
        x = torch.tensor([ids] * p.n, device=device)
        greedy = p.temperature == 0
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            gen = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=not greedy,
                temperature=None if greedy else p.temperature,
                top_p=None if greedy else p.top_p,
                top_k=None if greedy or p.top_k in (None, 0, -1) else p.top_k,
                repetition_penalty=None if p.repetition_penalty in (None, 1.0) else p.repetition_penalty,
                min_new_tokens=p.min_tokens or None,
                max_new_tokens=p.max_tokens,
                pad_token_id=pad,
                eos_token_id=sorted(eos | stop_ids) or [-1],  # [-1]: never stops (ignore_eos)
                output_logits=True,
                return_dict_in_generate=True,
            )
            # Raw logprobs (before temperature and top-p), as vLLM's default logprobs_mode reports them.
            logps = torch.stack(gen.logits, 1).float().log_softmax(-1) if p.logprobs is not None else None
            prompt_lps = self._prompt_logprobs(ids, p.prompt_logprobs) if p.prompt_logprobs is not None else None
        outputs = []
        for i, row in enumerate(gen.sequences[:, len(ids) :].tolist()):
            resp, finish, reason = [], "length", None
            for t in row:
                resp.append(t)
                if t in stop_ids:
                    finish, reason = "stop", t
                    break
                if t in eos:
                    finish = "stop"
                    break
            text = tok.decode(resp, skip_special_tokens=p.skip_special_tokens)
            resp, text, finish, reason = self._cut_at_stop(resp, text, finish, reason, p)
            lps = None if logps is None else [self._top(logps[i, j], t, p.logprobs) for j, t in enumerate(resp)]
            cumulative = None if lps is None else sum(d[t].logprob for d, t in zip(lps, resp))
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=resp,
                    cumulative_logprob=cumulative,
                    logprobs=lps,
                    finish_reason=finish,
                    stop_reason=reason,
                )
            )
        return RequestOutput(
            request_id=request_id,
            prompt=prompt_text,
            prompt_token_ids=ids,
            prompt_logprobs=prompt_lps,
            outputs=outputs,
            finished=True,
        )

    def _cut_at_stop(self, resp, text, finish, reason, p):
        """vLLM stops at a stop string; here the output is cut at the first one, after the fact."""
        hits = [(text.find(s), s) for s in p.stop or [] if s in text]
        if not hits:
            return resp, text, finish, reason
        at, s = min(hits)
        keep = at + len(s) if p.include_stop_str_in_output else at
        tok = self.tokenizer
        # The fewest tokens whose text reaches the stop string: token ids and logprobs match the text.
        n = next(
            (
                k
                for k in range(1, len(resp) + 1)
                if len(tok.decode(resp[:k], skip_special_tokens=p.skip_special_tokens)) >= at + len(s)
            ),
            len(resp),
        )
        return resp[:n], text[:keep], "stop", s

    def _top(self, row, token: int, k: int) -> dict:
        from vllm.logprobs import Logprob

        dec = self.tokenizer.decode
        lp = float(row[token])
        out = {token: Logprob(lp, int((row > row[token]).sum()) + 1, dec([token]))}
        if k > 0:
            vals, idx = row.topk(k)
            for rank, (v, t) in enumerate(zip(vals.tolist(), idx.tolist()), 1):
                out.setdefault(t, Logprob(v, rank, dec([t])))
        return out

    def _prompt_logprobs(self, ids: list[int], k: int) -> list:
        import torch

        full = torch.tensor([ids], device=self.hf.device)
        rows = self.hf.model(full).logits[0, :-1].float().log_softmax(-1)
        return [None] + [self._top(rows[j], ids[j + 1], k) for j in range(len(ids) - 1)]

    # --------------------------------------------------------------------------------- lifecycle
    async def abort(self, request_id) -> None:
        return None  # a running generate() finishes; its result is dropped

    async def check_health(self) -> None:
        if self.hf.model is None:
            raise self.dead_error

    async def is_tracing_enabled(self) -> bool:
        return False

    async def reload(self, model_dir: str | Path) -> float:
        from protege.actors.engine import safetensors_payload

        payload = await asyncio.to_thread(safetensors_payload, model_dir)
        async with self._lock:
            t0 = time.perf_counter()
            await asyncio.to_thread(self.hf.load_weights, payload)
            return time.perf_counter() - t0

    def close(self) -> None:
        self.hf.close()
