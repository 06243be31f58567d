"""TeacherScorer: teacher log-probs of the student's sampled tokens (RLAD, OPD, KEPO, DPO-ref).

One forward pass of the frozen teacher over (prompt + response) per rollout, batched; returns
per response token the sampled token's log-prob (float32) and, when asked, the teacher's dense
signal as tensors: the top-k ids (int32) and log-probs (float16) plus the log-mass outside them
(float32, computed here where the whole row is known), or whole rows (float16). What it is asked
for (``top_k``, ``full``: the spec's ``teacher_request()``) is fixed when it is built.

``score(rollouts, examples)`` keeps the scorer contract (core/records.py ``ScoreRecord``): one
record per rollout, no reward components, the payload in ``teacher`` and the record's share of
the call's seconds in ``seconds``. The gather of response log-probs is core/logprobs.py's, the
learner's own, so log π_θ and log π_T are read in one frame. Hints for KEPO's knowledge-enhanced
exploration, SFT targets and the DPO reference come from ``generate``, ``generate_ids`` and
``sequence_logprobs``.
"""

from __future__ import annotations

import os
import time

import torch

from protege.core.console import capture_actor_output
from protege.core.data import Example
from protege.core.env import configure_node_defaults
from protege.core.logprobs import pack, response_logprobs, tail_logprob, topk_logprobs
from protege.core.records import Rollout, ScoreRecord, TeacherScores

# Top-k and full-row log-probs travel in float16: half the bytes of float32, and its 11-bit
# mantissa keeps a log-prob of −10 to ±0.005, far below what a distillation loss can resolve.
# The sampled token's log-prob (RLAD's ratio, OPD's sampled estimator) and the tail mass stay
# float32.
PAYLOAD_DTYPE = torch.float16


class TeacherScorer:
    def __init__(
        self,
        model: str,
        *,
        top_k: int = 0,
        full: bool = False,
        dtype: str = "float32",
        batch_size: int = 16,
        temperature: float = 1.0,
        engine: str = "vllm",
        max_model_len: int = 512,
        kv_cache_bytes: int = 128 << 20,
        gpu_memory_utilization: float = 0.3,
        score_engine: str = "hf",
        max_logprobs: int = 20,
    ):
        capture_actor_output()  # third-party output to RUN_DIR/logs (core/console.py)
        configure_node_defaults()  # this node's hardware decides, before the model and engine load
        from transformers import AutoTokenizer

        self.model_path, self.dtype, self.engine_kind = model, dtype, engine
        self.top_k, self.full = top_k, full  # the dense signal `score` returns (spec.teacher_request())
        # "vllm": scores from the generation engine's prompt log-probs; "hf": a transformers forward
        # (also the fallback for full rows and temperatures other than 1, which vLLM's raw prompt
        # log-probs cannot give).
        self.score_engine = score_engine
        self.engine_kwargs = {
            "max_model_len": max_model_len,
            "kv_cache_bytes": kv_cache_bytes,
            "gpu_memory_utilization": gpu_memory_utilization,
        }
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

            self._model = (
                AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype))
                .to(self.device)
                .eval()
            )
        return self._model

    def scores_with_vllm(self, full: bool) -> bool:
        return self.score_engine == "vllm" and self.engine_kind == "vllm" and not full and self.temperature == 1.0

    def score(self, rollouts: list[Rollout], examples: list[Example]) -> list[ScoreRecord]:
        """The scorer contract: the teacher's payload for each rollout's (prompt ids, response ids),
        as asked at construction. The call's seconds are spread evenly over its records."""
        if len(rollouts) != len(examples):
            raise ValueError(f"rollouts and examples must have equal lengths, got {len(rollouts)}, {len(examples)}")
        t0 = time.perf_counter()
        out = self._payloads([(r.prompt_ids, r.sample.response_ids) for r in rollouts], self.top_k, self.full)
        share = (time.perf_counter() - t0) / max(1, len(out))
        return [ScoreRecord(teacher=ts, seconds=share) for ts in out]

    @torch.no_grad()
    def _payloads(
        self, items: list[tuple[list[int], list[int]]], top_k: int = 0, full: bool = False
    ) -> list[TeacherScores]:
        """The payload for each (prompt ids, response ids): through vLLM's prompt log-probs when
        that engine can give it, else one transformers forward per batch."""
        if self.scores_with_vllm(full):
            return self._score_vllm(items, top_k)
        return self._score_hf(items, top_k, full)

    def _score_vllm(self, items, top_k: int) -> list[TeacherScores]:
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
        out: list[TeacherScores] = []
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            b = {k: v.to(self.device) for k, v in pack(chunk, self.pad_id).items()}
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            lp, logp = response_logprobs(logits, b["resp_pos"], b["targets"], self.temperature)  # [B, T], [B, T, V]
            lp = lp.cpu()
            if top_k:
                vals, ids, tail = topk_logprobs(logp, top_k)
                tail = tail.cpu()
                vals, ids = vals.to(PAYLOAD_DTYPE).cpu(), ids.to(torch.int32).cpu()
            rows_out = logp.to(PAYLOAD_DTYPE).cpu() if full else None
            for j, (_, resp) in enumerate(chunk):
                n = len(resp)
                ts = TeacherScores(logprobs=lp[j, :n].clone())
                if top_k:
                    ts.topk_ids, ts.topk_logprobs, ts.tail_logprobs = (
                        ids[j, :n].clone(),
                        vals[j, :n].clone(),
                        tail[j, :n].clone(),
                    )
                if full:
                    ts.full_logprobs = rows_out[j, :n].clone()
                out.append(ts)
        return out

    @torch.no_grad()
    def sequence_logprobs(self, items: list[tuple[list[int], list[int]]]) -> list[float]:
        """Σ_t log π_T(y_t): the teacher as DPO reference, at the sampling temperature, the one
        the learner reads the policy's (and the initial reference's) log-probs at, so DPO's
        log-ratio compares like with like (it was temperature 1 before: a mismatch whenever
        rollout.temperature ≠ 1)."""
        return [float(s.logprobs.sum()) for s in self._payloads(items)]

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 64,
        seed: int | None = None,
    ) -> list[list[str]]:
        """The teacher as a generator (KEPO hints, SFT on teacher responses)."""
        groups = self._engine().generate(
            prompts,
            n=n,
            temperature=temperature,
            top_p=1.0,
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=[self.tokenizer.eos_token_id],
        )
        return [[s.text for s in g] for g in groups]

    def generate_ids(self, prompts: list[list[int]], *, max_tokens: int = 64) -> list[list[int]]:
        """Greedy teacher responses as token ids (with the end-of-turn token), for SFT targets."""
        groups = self._engine().generate(
            prompts,
            n=1,
            temperature=0.0,
            top_p=1.0,
            max_tokens=max_tokens,
            stop_token_ids=[self.tokenizer.eos_token_id],
        )
        return [g[0].response_ids for g in groups]

    def _engine(self):
        # Started on first use, so scoring-only jobs never pay for a second engine.
        if self._generator is None:
            from protege.actors.engine import make_engine

            self._generator = make_engine(self.engine_kind, self.model_path, dtype=self.dtype, **self.engine_kwargs)
        return self._generator

    def pid(self) -> int:
        return os.getpid()
