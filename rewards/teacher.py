"""TeacherScorer: teacher log-probs of the student's sampled tokens (RLAD, OPD, KEPO, DPO-ref).

One forward pass of the frozen teacher over (prompt + response) per rollout, batched; returns
per response token the sampled token's log-prob (float32) and, when asked, the teacher's dense
signal as tensors: the top-k ids (int32) and log-probs (float16) plus the log-mass outside them
(float32, computed here where the whole row is known), or whole rows (float16). Hints for KEPO's
knowledge-enhanced exploration come from the teacher as a generator (``generate``).
"""

from __future__ import annotations

import os
import time

import torch

from protege.core.records import TeacherScores, TrainRow
from protege.core.console import capture_actor_output
from protege.core.env import configure_node_defaults
from protege.learners.batching import collate, to_device

# Top-k and full-row log-probs travel in float16: half the bytes of float32, and its 11-bit
# mantissa keeps a log-prob of −10 to ±0.005, far below what a distillation loss can resolve.
# The sampled token's log-prob (RLAD's ratio, OPD's sampled estimator) and the tail mass stay
# float32.
PAYLOAD_DTYPE = torch.float16


class TeacherScorer:
    def __init__(self, model: str, *, dtype: str = "float32", batch_size: int = 16, temperature: float = 1.0,
                 engine: str = "vllm", max_model_len: int = 512, kv_cache_bytes: int = 128 << 20,
                 gpu_memory_utilization: float = 0.3, score_engine: str = "hf", max_logprobs: int = 20):
        capture_actor_output()  # third-party output to RUN_DIR/logs (core/console.py)
        configure_node_defaults()  # this node's hardware decides, before the model and engine load
        from transformers import AutoTokenizer

        self.model_path, self.dtype, self.engine_kind = model, dtype, engine
        # "vllm": scores from the generation engine's prompt log-probs; "hf": a transformers forward
        # (also the fallback for full rows and temperatures other than 1, which vLLM's raw prompt
        # log-probs cannot give).
        self.score_engine = score_engine
        self.engine_kwargs = {"max_model_len": max_model_len, "kv_cache_bytes": kv_cache_bytes,
                              "gpu_memory_utilization": gpu_memory_utilization}
        if engine == "vllm":
            self.engine_kwargs["max_logprobs"] = max_logprobs
        self._generator = None
        self._model = None
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batch_size = batch_size
        # Same temperature as the student's sampling so log-ratios compare like with like.
        self.temperature = temperature if temperature > 0 else 1.0

    @property
    def model(self):
        """The transformers teacher, loaded on first use (a vLLM-scored teacher may never need it)."""
        if self._model is None:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=getattr(torch, self.dtype)).to(self.device).eval()
        return self._model

    def scores_with_vllm(self, full: bool) -> bool:
        return self.score_engine == "vllm" and self.engine_kind == "vllm" and not full and self.temperature == 1.0

    @torch.no_grad()
    def score(self, items: list[tuple[list[int], list[int]]], top_k: int = 0, full: bool = False) -> dict:
        """Scores for each (prompt ids, response ids). Returns {"scores": [TeacherScores],
        "seconds", "bytes" (payload size), "tokens", "engine"}."""
        t0 = time.perf_counter()
        vllm = self.scores_with_vllm(full)
        out = self._score_vllm(items, top_k) if vllm else self._score_hf(items, top_k, full)
        return {"scores": out, "seconds": time.perf_counter() - t0, "bytes": sum(s.nbytes() for s in out),
                "tokens": sum(len(r) for _, r in items), "engine": "vllm" if vllm else "hf"}

    def _score_vllm(self, items, top_k: int) -> list[TeacherScores]:
        from protege.learners.losses import tail_logprob

        out = []
        for entry in self._engine().prompt_logprobs(items, top_k):
            ts = TeacherScores(logprobs=torch.tensor(entry["logprobs"], dtype=torch.float32))
            if top_k:
                vals = torch.tensor(entry["topk_logprobs"], dtype=torch.float32).view(len(entry["logprobs"]), -1)
                ts.topk_ids = torch.tensor(entry["topk_ids"], dtype=torch.int32).view(vals.shape)
                ts.topk_logprobs, ts.tail_logprobs = vals.to(PAYLOAD_DTYPE), tail_logprob(vals)
            out.append(ts)
        return out

    def _score_hf(self, items, top_k: int, full: bool) -> list[TeacherScores]:
        from protege.learners.losses import tail_logprob

        out: list[TeacherScores] = []
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            b = to_device(collate([TrainRow(prompt_ids=p, response_ids=r) for p, r in chunk], self.pad_id), self.device)
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            rows = torch.gather(logits, 1, b["resp_pos"][..., None].expand(-1, -1, logits.shape[-1]))
            logp = (rows.float() / self.temperature).log_softmax(-1)  # [B, T, V]
            lp = logp.gather(-1, b["targets"][..., None])[..., 0].cpu()
            if top_k:
                vals, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
                tail = tail_logprob(vals).cpu()
                vals, ids = vals.to(PAYLOAD_DTYPE).cpu(), ids.to(torch.int32).cpu()
            rows_out = logp.to(PAYLOAD_DTYPE).cpu() if full else None
            for j, (_, resp) in enumerate(chunk):
                n = len(resp)
                ts = TeacherScores(logprobs=lp[j, :n].clone())
                if top_k:
                    ts.topk_ids, ts.topk_logprobs, ts.tail_logprobs = ids[j, :n].clone(), vals[j, :n].clone(), tail[j, :n].clone()
                if full:
                    ts.full_logprobs = rows_out[j, :n].clone()
                out.append(ts)
        return out

    @torch.no_grad()
    def sequence_logprobs(self, items: list[tuple[list[int], list[int]]]) -> list[float]:
        """Σ_t log π_T(y_t) at temperature 1: the teacher as DPO reference."""
        saved, self.temperature = self.temperature, 1.0
        try:
            scores = self.score(items)["scores"]
        finally:
            self.temperature = saved
        return [float(s.logprobs.sum()) for s in scores]

    def generate(self, prompts: list[list[int]], *, n: int = 1, temperature: float = 0.0, max_tokens: int = 64,
                 seed: int | None = None) -> list[list[str]]:
        """The teacher as a generator (KEPO hints, SFT on teacher responses)."""
        groups = self._engine().generate(prompts, n=n, temperature=temperature, top_p=1.0, max_tokens=max_tokens,
                                          seed=seed, stop_token_ids=[self.tokenizer.eos_token_id])
        return [[s.text for s in g] for g in groups]

    def generate_ids(self, prompts: list[list[int]], *, max_tokens: int = 64) -> list[list[int]]:
        """Greedy teacher responses as token ids (with the end-of-turn token), for SFT targets."""
        groups = self._engine().generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens,
                                          stop_token_ids=[self.tokenizer.eos_token_id])
        return [g[0].response_ids for g in groups]

    def _engine(self):
        # Started on first use, so scoring-only jobs never pay for a second engine.
        if self._generator is None:
            from protege.actors.engine import make_engine

            self._generator = make_engine(self.engine_kind, self.model_path, dtype=self.dtype, **self.engine_kwargs)
        return self._generator

    def pid(self) -> int:
        return os.getpid()
