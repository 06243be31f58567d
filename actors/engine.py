"""Generation engines. The only module that builds a vLLM engine (vLLM is imported elsewhere only by
its weight-transfer halves, actors/nccl_{trainer,receiver}.py, and by serve/; tests/unit/test_layers.py).

Two engines behind one small surface (generate / score / load_weights):
- ``VLLMEngine``: vLLM's offline ``LLM`` in-process (CPU build or GPU build, same API).
- ``HFEngine``: ``transformers.generate`` over the whole batch in one call, the fallback
  (``rollout.engine: hf``) and, on CPU, the faster engine for very small students, where vLLM's
  per-step scheduling costs more than the model (``rollout.engine: auto`` picks it there:
  core/spec.py ``HF_ROLLOUT_BELOW_PARAMS``, bench/reports/engine_bench.md).

Weights arrive as named tensors (views into the object store's buffers, see
cluster/weight_sync.py) or safetensors bytes, and are loaded in place into the running engine;
the version is tracked by the caller.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, AsyncIterator, NamedTuple

import torch

from protege.core.records import Sample

EXTENSION = "protege.actors.vllm_ext.WeightReloadExtension"


def fp32_exact_env(dtype: str, cuda: bool) -> dict[str, str]:
    """Environment an engine needs so that float32 means float32 on a GPU.

    vLLM rules out FlashAttention/FlashInfer for float32 and picks its Triton attention, whose
    ``tl.dot`` defaults to TF32 (10-bit mantissa): log-probs then drift ~1e-3 from the learner's
    float32 ones, the size of the train/infer mismatch the sync checks look for. IEEE dots keep
    them to float32 rounding. bf16/fp16 engines are untouched.
    """
    return {"TRITON_F32_DEFAULT": "ieee"} if cuda and dtype == "float32" else {}


class VLLMEngine:
    TOKEN_BUDGET = 8192

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 512,
        kv_cache_bytes: int = 256 << 20,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        max_logprobs: int = 20,
        enforce_eager: bool = True,
    ):
        import os

        # Before vLLM is imported: Triton reads it when kernels are compiled, in this process or
        # in the engine-core process that inherits the environment.
        for k, v in fp32_exact_env(dtype, torch.cuda.is_available()).items():
            os.environ.setdefault(k, v)
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            # Eager unless rollout.compile says otherwise: on CPU, torch.compile gave a real-size model
            # ~1.04x faster generation for ~110 s more start-up (bench/reports/engine_bench.md).
            enforce_eager=enforce_eager,
            enable_prefix_caching=True,  # reset after every weight sync (stale logprobs otherwise)
            worker_extension_cls=EXTENSION,
            logprobs_mode="processed_logprobs",  # behaviour logprobs after temperature, as sampled
            # A prefill split across scheduler steps makes vLLM rewind each seeded request's RNG
            # (Generator.set_offset), which CPU generators do not support ("CPU Generator does
            # not use offset"). generate() therefore submits at most this many prompt tokens
            # at once, so prefills are never chunked.
            max_num_batched_tokens=self.TOKEN_BUDGET,
            max_num_seqs=256,
            max_logprobs=max(20, max_logprobs),  # a teacher's top-k rows
        )
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.dtype = dtype

    def _waves(self, costs: list[int]) -> list[list[int]]:
        """Consecutive indices whose prompt tokens fit the scheduler budget: see TOKEN_BUDGET."""
        waves, cur, used = [], [], 0
        for i, cost in enumerate(costs):
            if cur and used + cost > self.TOKEN_BUDGET:
                waves.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += cost
        if cur:
            waves.append(cur)
        return waves

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> list[list[Sample]]:
        waves = self._waves([len(p) * n for p in prompts])
        out: list[list[Sample]] = []
        for wave in waves:
            out += self._generate(
                [prompts[i] for i in wave],
                [i for i in wave],
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                seed=seed,
                stop_token_ids=stop_token_ids,
            )
        return out

    def _generate(self, prompts, indices, *, n, temperature, top_p, max_tokens, seed, stop_token_ids):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out = []
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                logprobs=0,  # the sampled token's logprob only
                seed=None if seed is None else seed + i,  # per-prompt seed: reproducible, not identical
                stop_token_ids=stop_token_ids,
            )
            for i in indices
        ]
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        for res in results:
            group = []
            for c in res.outputs:
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for d, t in zip(c.logprobs or [], ids)] if c.logprobs else [0.0] * len(ids)
                group.append(Sample(ids, lps, c.text, c.finish_reason or "length"))
            out.append(group)
        return out

    def score(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Raw (temperature 1) log-probs of ``response_ids`` given ``prompt_ids``, via prompt logprobs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        full = list(prompt_ids) + list(response_ids)
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        res = self.llm.generate([TokensPrompt(prompt_token_ids=full)], sp, use_tqdm=False)[0]
        rows = res.prompt_logprobs
        return [float(rows[i][full[i]].logprob) for i in range(len(prompt_ids), len(full))]

    def prompt_logprobs(self, items: list[tuple[list[int], list[int]]], top_k: int = 0) -> list[dict]:
        """Teacher scoring: for each (prompt ids, response ids) the temperature-1 log-probs of the
        response tokens and, with ``top_k``, the k most likely ids and their log-probs at each
        response position, from vLLM's prompt log-probs (one prefill per item, no decoding).
        Returns [{"logprobs": [T], "topk_ids": [T][k], "topk_logprobs": [T][k]}]."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=1.0)
        full = [list(p) + list(r) for p, r in items]
        out: list[dict] = []
        for wave in self._waves([len(x) for x in full]):
            results = self.llm.generate([TokensPrompt(prompt_token_ids=full[i]) for i in wave], sp, use_tqdm=False)
            for i, res in zip(wave, results):
                start, ids = len(items[i][0]), full[i]
                rows = res.prompt_logprobs[start:]
                entry = {"logprobs": [float(row[ids[start + t]].logprob) for t, row in enumerate(rows)]}
                if top_k:
                    # Each row holds the top-k (rank 1..k) plus the actual token when it ranks lower.
                    best = [
                        sorted((lp.rank, tok, lp.logprob) for tok, lp in row.items() if lp.rank <= top_k)
                        for row in rows
                    ]
                    entry["topk_ids"] = [[tok for _, tok, _ in b] for b in best]
                    entry["topk_logprobs"] = [[float(v) for _, _, v in b] for b in best]
                out.append(entry)
        return out

    def load_weights(self, payload: bytes) -> float:
        """Load safetensors bytes into the running engine; returns seconds taken."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("protege_reload", args=(payload,))
        # The prefix cache would otherwise keep serving KV computed with the old weights.
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def load_tensors(self, named: list[tuple[str, torch.Tensor]]) -> float:
        """Load ``(name, tensor)`` pairs (any dtype; the loaders cast) in place; returns seconds taken."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("protege_reload_tensors", args=(named,))
        self.llm.reset_prefix_cache()  # as above
        return time.perf_counter() - t0

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # best effort: in-process engines have nothing to leak
                pass
            self.llm = None


class HFEngine:
    """transformers ``generate`` with the same surface as :class:`VLLMEngine`."""

    def __init__(self, model: str, *, dtype: str = "float32", seed: int = 0, **_: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.seed = seed
        self.dtype = dtype

    @torch.no_grad()
    def generate(self, prompts, *, n, temperature, top_p, max_tokens, seed=None, stop_token_ids=None):
        """All prompts × n samples in one left-padded ``generate`` call, as TRL batches them: one
        decode step per token for the whole batch, not one per prompt (8 prompts × 4 samples of the
        tiny model: ~3x faster than a call per prompt). The seed seeds the one call, so a sample
        depends on the batch it is drawn in (vLLM's per-request seeds do not)."""
        if not prompts:  # a replica's empty share of a call
            return []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        eos = stop_token_ids or [self.tokenizer.eos_token_id]
        if seed is not None:
            torch.manual_seed(seed)
        rows = [p for p in prompts for _ in range(n)]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        greedy = temperature == 0
        gen = self.model.generate(
            ids,
            attention_mask=mask,  # left padding: positions and attention follow the mask
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None,
            max_new_tokens=max_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            output_scores=True,
            return_dict_in_generate=True,
        )
        new = gen.sequences[:, width:]
        # scores are the processed (temperature-scaled) logits, like vLLM's processed_logprobs;
        # gathered at the sampled tokens before anything leaves the [batch, step, vocab] block
        scores = torch.stack(gen.scores, 1).float().log_softmax(-1)
        picked = scores.gather(-1, new[..., None])[..., 0].tolist()
        samples = []
        for row, lp in zip(new.tolist(), picked):
            cut = next((t + 1 for t, tok in enumerate(row) if tok in eos), len(row))
            resp = row[:cut]
            finish = "stop" if resp and resp[-1] in eos else "length"
            text = self.tokenizer.decode(resp, skip_special_tokens=True)
            samples.append(Sample(resp, lp[:cut], text, finish))
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def score(self, prompt_ids, response_ids):
        full = torch.tensor([list(prompt_ids) + list(response_ids)], device=self.device)
        lp = self.model(full).logits[0, :-1].float().log_softmax(-1)
        tgt = full[0, 1:]
        vals = lp.gather(-1, tgt[:, None])[:, 0]
        return vals[len(prompt_ids) - 1 :].tolist()

    def load_weights(self, payload: bytes) -> float:
        from safetensors.torch import load

        return self.load_tensors(list(load(payload).items()))

    def load_tensors(self, named: list[tuple[str, torch.Tensor]]) -> float:
        t0 = time.perf_counter()
        state = {k: v.to(self.device) for k, v in named}  # load_state_dict copies (and casts) into the parameters
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"weights for an unknown model: unexpected keys {unexpected[:5]}")
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.model = None


def make_engine(kind: str, model: str, **kwargs: Any):
    match kind:
        case "vllm":
            return VLLMEngine(model, **kwargs)
        case "hf":
            return HFEngine(model, **kwargs)
        case _:
            raise ValueError(f"unknown engine '{kind}' (valid: vllm, hf)")


# ------------------------------------------------------------------------------------- serving
# The classes below back serve/ (the student endpoint). Serving differs from rollouts: requests
# arrive one at a time from many clients and must stream tokens, so the engine batches
# concurrent requests itself (vLLM's AsyncLLM: continuous batching) instead of taking a list.


class StreamDelta(NamedTuple):
    """New output of one choice since the previous delta. ``tokens`` counts the new tokens."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None  # "stop" | "length" | "abort" once finished, else None


def safetensors_payload(model_dir: str | Path) -> bytes:
    """All weights of a Hugging Face folder as one safetensors blob (the format ``load_weights`` takes)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    if len(files) == 1:
        return files[0].read_bytes()
    from safetensors.torch import load_file, save

    merged: dict[str, torch.Tensor] = {}
    for f in files:  # sharded checkpoints: merge so one reload sees every tensor
        merged.update(load_file(f))
    return save(merged)


class AsyncVLLMEngine:
    """vLLM's ``AsyncLLM`` for the student endpoint: concurrent requests, token streaming.

    AsyncLLM always runs its engine core in a child process (13 s start on 2 CPU cores, against 3 s
    for the in-process ``LLM``); that is the price of continuous batching across independent
    asyncio requests. Weight reload goes through the same worker extension as RL weight sync.
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        kv_cache_bytes: int = 256 << 20,
        seed: int = 0,
        max_num_seqs: int = 64,
        gpu_memory_utilization: float = 0.5,
    ):
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cuda = torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=not cuda,  # CPU: compiling costs more start time than it saves on a tiny model
            enable_prefix_caching=True,  # reset after every reload (stale KV otherwise)
            worker_extension_cls=EXTENSION,
            max_num_seqs=max_num_seqs,
            disable_log_stats=True,
            # Worker inside the engine-core process: one child process, not two (CPU vLLM keeps this only
            # with VLLM_ENABLE_V1_MULTIPROCESSING=0, which protege sets on CPU).
            distributed_executor_backend="uni",
        )
        if cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
            # Seeded requests cannot survive a chunked prefill on CPU (see VLLMEngine.TOKEN_BUDGET):
            # schedule whole prompts only; every prompt fits because the budget is >= max_model_len.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(VLLMEngine.TOKEN_BUDGET, max_model_len)
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.max_model_len = max_model_len

    async def stream(
        self,
        prompt_ids: list[int],
        *,
        request_id: str,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 16,
        stop: list[str] | None = None,
        seed: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        ignore_eos: bool = False,
        final_only: bool = False,
    ) -> AsyncIterator[list[StreamDelta]]:
        """Yields each choice's new text as it is generated, or (``final_only``) once, whole, at the end."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=stop or None,
            seed=seed,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            ignore_eos=ignore_eos,
            # A caller that does not stream needs no per-token wake-ups.
            output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA,
        )
        # Closing this generator early (client gone) aborts the request inside vLLM.
        async for out in self.llm.generate(
            TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id=request_id
        ):
            yield [StreamDelta(c.index, c.text, len(c.token_ids), c.finish_reason) for c in out.outputs]

    async def reload(self, model_dir: str | Path) -> float:
        """Load the weights of ``model_dir`` (same architecture) in place. Caller drains requests first."""
        payload = await asyncio.to_thread(safetensors_payload, model_dir)
        t0 = time.perf_counter()
        await self.llm.collective_rpc("protege_reload", args=(payload,))
        await self.llm.reset_prefix_cache()  # KV computed with the old weights must not be reused
        return time.perf_counter() - t0

    async def check_health(self) -> None:
        await self.llm.check_health()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.shutdown()  # stops the engine-core process (and frees its /dev/shm segments)
