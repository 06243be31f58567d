"""One DeepSpeed rank of the learner group. DeepSpeed is imported only here and, to gather ZeRO-3
partitions for the engines, in learners/weight_sender.py (tests/unit/test_layers.py).

A plain class: cluster/launch.py wraps it in a Ray actor, tests can build it in-process.
Each rank holds the student under a DeepSpeed engine (ZeRO 0-3), computes old and reference
log-probs, applies the algorithm's loss (learners/algorithms.py) and exports full weights for
the rollout engines.

Loss normalisation across ranks and micro-batches: every loss is a set of (sum, count) terms
(learners/losses.py). Before any backward the rank adds up each term's count over its
micro-batches and all-reduces them, so each micro-batch backpropagates Σ sum_mb / count_global.
That is multiplied by (grad_accum × world_size), which DeepSpeed divides out again (it scales by
1/grad_accum and averages gradients over ranks). The sum is then exactly the loss one process
would compute over the whole batch, however the rows were split.

Updates: ``updates_per_step`` passes over the batch, each of ``mini_batches`` optimizer steps
(PPO's epochs × mini-batches); DeepSpeed's gradient accumulation spans one mini-batch
(``grad_accum`` micro-batches), and each mini-batch is normalised by its own global counts.

π_old: it is the weights at the start of the step, and DeepSpeed only steps the optimizer at the
end of a mini-batch, so the first mini-batch's training forward on the first pass runs at π_old.
Its detached log-probs are π_old's, and no separate forward is spent on them — unless the model
has active dropout, where the training forward (train mode) is not π_old's eval-mode forward.
Later mini-batches train after a step, so their π_old is computed before the first update.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from protege.core.records import TrainBatch, TrainRow
from protege.core.console import capture_actor_output
from protege.core.env import apply_cpu_threads, configure_node_defaults
from protege.core.logprobs import (
    chunked_response_logprobs,
    entropy as token_entropy,
    hidden_and_head,
    logprobs_at,
    response_logprobs,
)
from protege.learners import algorithms, losses
from protege.learners.batching import collate, micro_batches, padded_tokens, to_device
from protege.learners.ds_config import build_ds_config
from protege.learners.weight_sender import WeightSender


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Dropout modules with p > 0, or a config dropout rate > 0 (attention dropout in HF models
    is a functional argument read from the config, not a module)."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    cfg = getattr(model, "config", None)
    rates = [v for k, v in (vars(cfg).items() if cfg is not None else []) if k.endswith("dropout")]
    return any(isinstance(v, (int, float)) and v > 0 for v in rates)


class Learner:
    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        model_path: str,
        learner_spec: Any,
        algo: Any,
        temperature: float,
        grad_accum: int,
        seed: int = 0,
        needs_ref: bool = False,
        max_response_tokens: int | None = None,
        overlap: bool = False,
    ):
        capture_actor_output()  # third-party output to RUN_DIR/logs (core/console.py)
        configure_node_defaults()  # this node's hardware decides, before DeepSpeed is imported (setup)
        self.overlap = overlap  # training runs while the engines generate (max_staleness ≥ 1): see cpu_threads
        self.rank, self.world_size = rank, world_size
        self.model_path = model_path
        self.spec, self.algo = learner_spec, algo
        self.temperature = temperature if temperature > 0 else 1.0
        self.grad_accum = grad_accum
        self.seed = seed
        self.needs_ref = needs_ref
        # The generation limit: Dr. GRPO's constant denominator (loss_agg seq-mean-token-sum-norm).
        self.max_response_tokens = max_response_tokens
        self.engine = self.ref = self.scheduler = None
        self.device = torch.device("cpu")
        self.pad_id = 0
        self.old_from_training_forward = True
        self.steps_done = 0
        self.micro_batch_tokens_max = 0
        # The weights' way out (object store and GPU transfer); it reads the model at each call.
        self.sender = WeightSender(lambda: self.engine.module, rank=rank, zero_stage=learner_spec.zero_stage)

    # ------------------------------------------------------------------ setup
    def setup(self, master_addr: str, master_port: int) -> dict:
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
        )
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(self.seed)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(0)  # Ray gives each rank its own GPU as device 0
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        ds_config = build_ds_config(
            zero_stage=self.spec.zero_stage,
            micro_batch=self.spec.micro_batch,
            grad_accum=self.grad_accum,
            world_size=self.world_size,
            grad_clip=self.spec.grad_clip,
            bf16=self.spec.bf16,
        )
        self.ref = None
        if self.needs_ref:
            # Frozen initial student outside DeepSpeed: it never steps and never syncs. Loaded
            # before HfDeepSpeedConfig exists, so ZeRO-3 does not partition it.
            self.ref = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(self.device)
            self.ref.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.spec.zero_stage == 3:
            # transformers 5.19 needs this alive *before* from_pretrained for ZeRO-3 partitioned
            # init (a raw deepspeed.zero.Init fails in _init_weights; docs/platform.md).
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        model.config.use_cache = False
        if self.spec.optimizer == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=self.spec.lr, weight_decay=self.spec.weight_decay)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=self.spec.lr, weight_decay=self.spec.weight_decay)
        warm = max(1, self.spec.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        engine, self.optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
        )
        self.attach(engine, device=self.device, pad_id=self.pad_id, ref=self.ref, scheduler=scheduler)
        # After DeepSpeed's CPU accelerator is up, which reads the thread count at start.
        apply_cpu_threads(self.spec.cpu_threads, sharers=self.world_size, overlap=self.overlap)
        return {"rank": self.rank, "pid": os.getpid(), "params": sum(p.numel() for p in model.parameters())}

    def attach(self, engine, *, device, pad_id: int, ref=None, scheduler=None) -> None:
        """The training state the step uses. ``engine`` is DeepSpeed's (forward, ``backward``
        scaling by 1/grad_accum, ``step`` at the accumulation boundary); tests attach a plain
        module with the same three calls to run the step on other devices (``meta``)."""
        self.engine, self.device, self.pad_id, self.ref, self.scheduler = (
            engine,
            torch.device(device),
            pad_id,
            ref,
            scheduler,
        )
        model = getattr(engine, "module", engine)
        # learner.autocast: the ops autocast covers (matmuls) run in bfloat16; the log-softmax
        # rows are cast to float32 first (core/logprobs.py), so the losses see float32 inputs.
        self.autocast = self.spec.autocast == "bfloat16"
        self.old_from_training_forward = not has_active_dropout(model)

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ forward
    def _token_logprobs(self, model, b: dict, want_topk: bool = False):
        """Log-probs of the response tokens [B, T], entropy [B, T] and the student's side of the
        teacher's dense signal: {"topk": [B, T, K] at the teacher's ids, "full": [B, T, V]}.
        ``b`` is already on the learner's device (to_device). The gather is core/logprobs.py's,
        the one the teacher scorer uses too, so both sides read the same frame.

        With ``learner.logprob_chunk`` set and a model with a decoder/lm_head split (any Hugging
        Face causal LM, tied embeddings or not), the rows come from the last hidden states,
        ``logprob_chunk`` positions at a time under activation checkpointing
        (core/logprobs.py ``chunked_response_logprobs``): the same values and gradients, and no
        [B, T, V] tensor unless full rows are asked for. A model without the split (the tests'
        plain modules) takes the logits path below.

        ZeRO-3: the lm_head's weight is partitioned, and DeepSpeed gathers a module's parameters
        in its forward pre-hook and releases them in the post-hook. The chunks call the lm_head
        *module* (never its weight), so each call and each recomputation in the backward runs
        those hooks. Verified on CPU (gloo, one rank, DeepSpeed 0.19.8, transformers 5.19, the
        tiny Qwen2 with tied embeddings, 8-position chunks; bench/long_response_bench.py
        --zero3-check): one ZeRO-3 step (KEPO top-k, 2 micro-batches, SGD) gives the same loss,
        grad norm (2e-8 apart) and weights after the step (3e-8 apart) as the logits path. (ZeRO-3
        partitions with one rank too, so a head whose weight was not gathered should fail rather
        than pass; that release was not inspected separately.) Not yet run on GPUs or several
        ranks."""
        if not self.autocast:  # (torch.autocast refuses some device types even when disabled)
            return self._token_logprobs_fp(model, b, want_topk)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return self._token_logprobs_fp(model, b, want_topk)

    def _token_logprobs_fp(self, model, b: dict, want_topk: bool):
        chunk = getattr(self.spec, "logprob_chunk", None)
        split = hidden_and_head(model, b["input_ids"], b["attention_mask"]) if chunk else None
        if split is not None:
            hidden, head = split
            full = want_topk and "teacher_full_logprobs" in b
            ids = b["teacher_topk_ids"] if want_topk and "teacher_topk_ids" in b else None
            lp, entropy, topk, rows = chunked_response_logprobs(
                hidden, head, b["resp_pos"], b["targets"], self.temperature, chunk=chunk, topk_ids=ids, full=full
            )
            dense = {k: v for k, v in (("topk", topk), ("full", rows)) if v is not None}
            return lp, entropy.detach(), dense
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        # at the sampling temperature, to match the sampling distribution
        lp, logp_all = response_logprobs(logits, b["resp_pos"], b["targets"], self.temperature)
        entropy = token_entropy(logp_all).detach()
        dense = {}
        if want_topk and "teacher_topk_ids" in b:
            dense["topk"] = logprobs_at(logp_all, b["teacher_topk_ids"])
        if want_topk and "teacher_full_logprobs" in b:
            dense["full"] = logp_all
        return lp, entropy, dense

    # ------------------------------------------------------------------ train
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One rollout batch: micro-batches on the device, the terms' global counts, then
        ``updates_per_step`` passes of ``mini_batches`` optimizer steps each."""
        t0 = time.perf_counter()
        mbs = self.prepare(batch)
        counts = self.global_counts(mbs)
        metrics = self.run_updates(mbs, counts)
        out = dict(zip(metrics, torch.stack(list(metrics.values())).tolist())) if metrics else {}
        out["learner/step_s"] = time.perf_counter() - t0
        out["learner/micro_batch_tokens_max"] = float(self.micro_batch_tokens_max)  # padded, this rank
        out["learner/lr"] = float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else self.spec.lr
        out["learner/grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        return out

    @property
    def mini_batches(self) -> int:
        return self.spec.mini_batches

    def prepare(self, batch: TrainBatch) -> list[dict[str, torch.Tensor]]:
        """Rows → micro-batches on the device (``grad_accum`` per mini-batch), with the log-probs
        that need their own forward: the reference model's, and π_old's where the training
        forward cannot stand in for it (dropout; every mini-batch after the first, which trains
        after an optimizer step)."""
        group = 2 if batch.pairs else 1
        parts = micro_batches(
            batch.rows,
            self.grad_accum * self.mini_batches,
            group=group,
            tokens=self.spec.micro_batch_tokens,
            blocks=self.mini_batches,
        )
        self.micro_batch_tokens_max = max(padded_tokens(mb) for mb in parts)
        mbs = [to_device(collate(mb, self.pad_id), self.device) for mb in parts]
        need_old = [not (self.old_from_training_forward and i < self.grad_accum) for i in range(len(mbs))]
        if self.ref is None and not any(need_old):
            return mbs
        self.engine.eval()
        with torch.no_grad():
            for b, old in zip(mbs, need_old):
                if old:
                    b["old_logprobs"], _, _ = self._token_logprobs(self.engine, b)
                if self.ref is not None:
                    b["ref_logprobs"], _, _ = self._token_logprobs(self.ref, b)
        self.engine.train()
        return mbs

    def global_counts(self, mbs: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Each loss term's count (tokens, rows, pairs, gated tokens) per mini-batch, over every
        rank. Counts depend on masks, gates and weights only, so they are read off the loss
        evaluated on placeholder log-probs: one definition of each count, the loss's own."""
        per_mini: list[dict[str, torch.Tensor]] = [{} for _ in range(self.mini_batches)]
        for i, b in enumerate(mbs):
            zeros = torch.zeros_like(b["mask"])
            dense = {
                side: torch.zeros_like(b[f"teacher_{side}_logprobs"])
                for side in ("topk", "full")
                if f"teacher_{side}_logprobs" in b
            }
            local = per_mini[i // self.grad_accum]
            for name, c in self._loss(b, zeros, dense, old=zeros).counts().items():
                local[name] = local.get(name, 0) + c
        names = sorted(per_mini[0])
        if not names:
            return per_mini
        flat = torch.stack(
            [torch.as_tensor(d.get(n, 0.0), device=self.device, dtype=torch.float32) for d in per_mini for n in names]
        )
        flat = self.all_reduce_sum(flat).view(len(per_mini), len(names))
        return [dict(zip(names, row.unbind())) for row in flat]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def run_updates(self, mbs: list[dict], counts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``updates_per_step`` passes over the mini-batches, one optimizer step per mini-batch;
        metrics as 0-d tensors (means over micro-batches; ``loss/total`` is the exact global loss
        of a mini-batch, averaged over the optimizer steps)."""
        sums: dict[str, torch.Tensor] = {}
        seen: dict[str, int] = {}
        total = torch.zeros((), device=self.device)
        for update in range(self.spec.updates_per_step):
            for i, b in enumerate(mbs):
                loss, metrics = self._micro_step(b, counts[i // self.grad_accum], first=update == 0)
                total = total + loss
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                    seen[k] = seen.get(k, 0) + 1
                if (i + 1) % self.grad_accum == 0:
                    self.steps_done += 1  # DeepSpeed stepped the optimizer at this boundary
        out = {k: v / seen[k] for k, v in sums.items()}
        out["loss/total"] = self.all_reduce_sum(total) / (self.spec.updates_per_step * self.mini_batches)
        return out

    def _micro_step(self, b: dict, counts: dict[str, torch.Tensor], *, first: bool) -> tuple[torch.Tensor, dict]:
        lp, entropy, dense = self._token_logprobs(self.engine, b, want_topk=True)
        mask = b["mask"]
        metrics: dict[str, torch.Tensor] = {}
        if "old_logprobs" not in b:
            # First pass, first mini-batch: the weights are still π_old (module docstring).
            b["old_logprobs"] = lp.detach()
        if first and "rollout_logprobs" in b:
            # Train/infer mismatch: |log π_old(learner) − log π(engine)| on the sampled tokens.
            # Large values mean the engine did not generate from the weights the learner has.
            metrics["rollout/logprob_mismatch"] = (
                (b["old_logprobs"] - b["rollout_logprobs"]).abs() * mask
            ).sum() / mask.sum().clamp(min=1)
        out = self._loss(b, lp, dense, old=b["old_logprobs"])
        loss = out.normalised(counts)
        # DeepSpeed divides by grad_accum and averages over ranks; undo both (module docstring).
        self.engine.backward(loss * (self.grad_accum * self.world_size))
        self.engine.step()
        metrics.update(out.metrics)
        metrics["policy/entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        return loss.detach(), metrics

    def _loss(self, b: dict, lp, dense: dict, *, old) -> losses.LossOut:
        inp = losses.LossInputs(
            logprobs=lp,
            old_logprobs=old,
            mask=b["mask"],
            advantages=b["advantages"],
            ref_logprobs=b.get("ref_logprobs"),
            teacher_logprobs=b.get("teacher_logprobs"),
            student_topk_logprobs=dense.get("topk"),
            teacher_topk_logprobs=b.get("teacher_topk_logprobs"),
            teacher_tail_logprobs=b.get("teacher_tail_logprobs"),
            student_full_logprobs=dense.get("full"),
            teacher_full_logprobs=b.get("teacher_full_logprobs"),
            gate=b.get("gate"),
            behaviour_logprobs=b.get("rollout_logprobs"),
            ref_seq_logprobs=b.get("ref_seq_logprob"),
            weight=b.get("weight"),
        )
        return algorithms.compute_loss(self.algo, inp, max_len=self.max_response_tokens)

    # ------------------------------------------------------------------ logprobs (tests, eval)
    @torch.no_grad()
    def logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Temperature-1 log-probs of a response under the current weights (the sync test)."""
        b = to_device(collate([TrainRow(prompt_ids=prompt_ids, response_ids=response_ids)], self.pad_id), self.device)
        saved, self.temperature = self.temperature, 1.0
        try:
            self.engine.eval()
            lp, _, _ = self._token_logprobs(self.engine, b)
        finally:
            self.temperature = saved
            self.engine.train()
        return lp[0, : len(response_ids)].tolist()

    # ------------------------------------------------------------------ weights out
    # Ray-callable forwards to the sender (learners/weight_sender.py); cluster/weight_sync.py calls them.
    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """Full parameters on rank 0 (all ranks must call this together under ZeRO-3)."""
        return self.sender.full_state()

    def export_weights(self, dtype: str = "float32") -> bytes | None:
        """Safetensors bytes of the full student (rank 0), cast to the rollout dtype."""
        return self.sender.export(dtype)

    def pack_weights(self, wire_dtype: str | None = None, bucket_mb: float = 512.0):
        """(summary, PackedWeights or None): the object-store sync's payload (every rank under ZeRO-3).
        Called with ``num_returns=2``: the driver reads the summary and hands the buffers on unread."""
        return self.sender.pack(wire_dtype, bucket_mb)

    def nccl_device_uuid(self) -> str | None:
        return self.sender.device_uuid()

    def nccl_rendezvous(self, count: int) -> tuple[str, list[int]]:
        return self.sender.rendezvous(count)

    def nccl_meta(self, dtype: str) -> list[tuple[str, list[int], str]]:
        return self.sender.meta(dtype)

    def nccl_init(self, **kwargs) -> dict[str, Any]:
        return self.sender.init(**kwargs)

    def nccl_send(self, version: int, targets: list[int]) -> dict[str, Any] | None:
        return self.sender.send(version, targets)

    def nccl_close(self) -> None:
        self.sender.close()

    def save_checkpoint(self, path: str) -> bool:
        """DeepSpeed state (model, optimizer, scheduler) from every rank + HF folder from rank 0."""
        p = Path(path)
        self.engine.save_checkpoint(str(p / "deepspeed"), tag="state", client_state={"steps_done": self.steps_done})
        state = self._full_state()
        if self.rank == 0:
            model = self.engine.module
            model.save_pretrained(str(p / "model"), state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(str(p / "model"))
        return True

    def upload_checkpoint(self, local: str, dest: str) -> int:
        """Object-store checkpoints: copy what this node's ranks saved under ``local`` to ``dest``
        (the driver calls one rank per node, then writes state.json last), then free the disk."""
        from protege.core import storage

        sent = storage.upload_tree(local, dest)
        shutil.rmtree(local, ignore_errors=True)
        return sent

    def load_checkpoint(self, path: str) -> int:
        from protege.core import storage

        if storage.is_uri(path):
            # Every rank fetches the whole DeepSpeed folder: ZeRO-1/2 loading reads all ranks'
            # optimizer shards (DeepSpeed's _get_all_zero_checkpoints), so a per-rank subset fails.
            local = Path(tempfile.mkdtemp(prefix=f"protege-resume-r{self.rank}-"))
            try:
                storage.download_tree(storage.join(path, "deepspeed"), local / "deepspeed")
                return self.load_checkpoint(str(local))
            finally:
                shutil.rmtree(local, ignore_errors=True)
        _, client = self.engine.load_checkpoint(str(Path(path) / "deepspeed"), tag="state")
        self.steps_done = int((client or {}).get("steps_done", 0))
        return self.steps_done

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
