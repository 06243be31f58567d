"""One DeepSpeed rank of the learner group. The only module that imports DeepSpeed.

A plain class: cluster/launch.py wraps it in a Ray actor, tests can build it in-process.
Each rank holds the student under a DeepSpeed engine (ZeRO 0-3), recomputes old and
reference log-probs, applies the algorithm's loss (learners/algorithms.py) and exports full
weights for the rollout engines.

Loss normalisation across ranks and micro-batches: each micro-batch loss is the algorithm's
mean over its own units (tokens, rows or pairs), re-weighted by units_micro / units_global and
multiplied by (grad_accum × world_size), which DeepSpeed divides out again (it scales by
1/grad_accum and averages gradients over ranks). The sum is then exactly the loss a single
process would compute over the whole batch, however the rows were split.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from protege.cluster.records import TrainBatch, TrainRow
from protege.learners import algorithms, losses
from protege.learners.batching import collate, micro_batches
from protege.learners.ds_config import build_ds_config
from protege.learners.nccl_sender import NcclSenderMixin


class Learner(NcclSenderMixin):  # the mixin adds the GPU (NCCL/IPC) weight-sender methods
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
    ):
        self.rank, self.world_size = rank, world_size
        self.model_path = model_path
        self.spec, self.algo = learner_spec, algo
        self.temperature = temperature if temperature > 0 else 1.0
        self.grad_accum = grad_accum
        self.seed = seed
        self.needs_ref = needs_ref
        self.engine = None
        self.steps_done = 0

    # ------------------------------------------------------------------ setup
    def setup(self, master_addr: str, master_port: int) -> dict:
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
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
            zero_stage=self.spec.zero_stage, micro_batch=self.spec.micro_batch, grad_accum=self.grad_accum,
            world_size=self.world_size, grad_clip=self.spec.grad_clip, bf16=self.spec.bf16,
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
            # init (a raw deepspeed.zero.Init fails in _init_weights; platform.md).
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
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
        )
        return {"rank": self.rank, "pid": os.getpid(), "params": sum(p.numel() for p in model.parameters())}

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ forward
    def _token_logprobs(self, model, b: dict, want_topk: bool = False):
        """Log-probs of the response tokens [B, T] (and entropy [B, T], top-k rows [B, T, K])."""
        ids = b["input_ids"].to(self.device)
        logits = model(input_ids=ids, attention_mask=b["attention_mask"].to(self.device)).logits
        logits = logits[:, :-1].float() / self.temperature  # match the sampling distribution
        pos = b["resp_pos"].to(self.device)
        rows = torch.gather(logits, 1, pos[..., None].expand(-1, -1, logits.shape[-1]))  # [B, T, V]
        logp_all = rows.log_softmax(-1)
        lp = logp_all.gather(-1, b["targets"].to(self.device)[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
        topk = None
        if want_topk and "teacher_topk_ids" in b:
            topk = logp_all.gather(-1, b["teacher_topk_ids"].to(self.device))
        return lp, entropy, topk

    # ------------------------------------------------------------------ train
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        t0 = time.perf_counter()
        group = 2 if batch.pairs else 1
        mbs = [collate(mb, self.pad_id) for mb in micro_batches(batch.rows, self.grad_accum, group=group)]
        units = algorithms.loss_units(self.algo)
        global_units = {"tokens": batch.global_tokens, "rows": batch.global_rows, "pairs": batch.global_rows // 2}[units]
        # π_old (and π_ref) recomputed with the current weights, once per rollout batch.
        self.engine.eval()
        with torch.no_grad():
            for b in mbs:
                b["old_logprobs"], _, _ = self._token_logprobs(self.engine, b)
                if self.ref is not None:
                    b["ref_logprobs"], _, _ = self._token_logprobs(self.ref, b)
        self.engine.train()

        sums: dict[str, float] = {}
        count = 0
        # Train/infer mismatch: |log π_old(learner) − log π(engine)| on the sampled tokens. Large
        # values mean the engine did not generate from the weights the learner has.
        mism = [((b["old_logprobs"] - b["rollout_logprobs"]).abs() * b["mask"]).sum() / b["mask"].sum().clamp(min=1)
                for b in mbs if "rollout_logprobs" in b]
        for _ in range(self.spec.updates_per_step):
            for b in mbs:
                lp, entropy, topk = self._token_logprobs(self.engine, b, want_topk=True)
                mask = b["mask"].to(self.device)
                loss, metrics = self._loss(b, lp, topk, mask)
                micro_units = self._units(b, units)
                scale = (micro_units / max(1, global_units)) * self.grad_accum * self.world_size
                self.engine.backward(loss * scale)
                self.engine.step()
                ntok = float(mask.sum())
                metrics["loss/total"] = loss.detach()
                metrics["policy/entropy"] = (entropy * mask).sum() / max(ntok, 1.0)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            self.steps_done += 1
        out = {k: v / max(1, count) for k, v in sums.items()}
        if mism:
            out["rollout/logprob_mismatch"] = float(torch.stack(mism).mean())
        out["learner/step_s"] = time.perf_counter() - t0
        out["learner/lr"] = float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else self.spec.lr
        out["learner/grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        return out

    def _units(self, b: dict, units: str) -> float:
        if units == "tokens":
            return float(b["mask"].sum())
        real = b["weight"] > 0
        if units == "pairs":
            return float(real.sum()) / 2
        return float((real & (b["mask"].sum(-1) > 0)).sum())

    def _loss(self, b: dict, lp, topk, mask):
        if self.algo.type == "dpo":
            seq = losses.sequence_logprobs(lp, mask)  # [2P] chosen, rejected, chosen, ...
            if "ref_seq_logprob" in b:
                ref = b["ref_seq_logprob"].to(self.device)
            else:
                ref = losses.sequence_logprobs(b["ref_logprobs"].to(self.device), mask)
            real = b["weight"][0::2].to(self.device) > 0  # padding pairs carry weight 0
            if not bool(real.any()):
                return seq.sum() * 0.0, {}
            c, r = seq[0::2][real], seq[1::2][real]
            return losses.dpo_loss(c, r, ref[0::2][real], ref[1::2][real], beta=self.algo.beta)
        inp = losses.LossInputs(
            logprobs=lp,
            old_logprobs=b["old_logprobs"],
            mask=mask,
            advantages=b["advantages"].to(self.device),
            ref_logprobs=b.get("ref_logprobs"),
            teacher_logprobs=b["teacher_logprobs"].to(self.device) if "teacher_logprobs" in b else None,
            student_topk_logprobs=topk,
            teacher_topk_logprobs=b["teacher_topk_logprobs"].to(self.device) if "teacher_topk_logprobs" in b else None,
            gate=b["gate"].to(self.device) if self.algo.type == "kepo" else None,
        )
        return algorithms.compute_loss(self.algo, inp)

    # ------------------------------------------------------------------ logprobs (tests, eval)
    @torch.no_grad()
    def logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Temperature-1 log-probs of a response under the current weights (the sync test)."""
        b = collate([TrainRow(prompt_ids=prompt_ids, response_ids=response_ids)], self.pad_id)
        saved, self.temperature = self.temperature, 1.0
        try:
            self.engine.eval()
            lp, _, _ = self._token_logprobs(self.engine, b)
        finally:
            self.temperature = saved
            self.engine.train()
        return lp[0, : len(response_ids)].tolist()

    # ------------------------------------------------------------------ weights out
    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """Full parameters on rank 0 (all ranks must call this together under ZeRO-3)."""
        model = self.engine.module
        named = list(model.named_parameters())  # deduplicates tied weights (lm_head ↔ embed)
        if self.spec.zero_stage == 3:
            import deepspeed

            state = {}
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                if self.rank == 0:
                    state = {n: p.detach().to("cpu", copy=True) for n, p in named}
            return state if self.rank == 0 else None
        if self.rank != 0:
            return None
        return {n: p.detach().to("cpu", copy=True) for n, p in named}

    def export_weights(self, dtype: str = "float32") -> bytes | None:
        """Safetensors bytes of the full student (rank 0), cast to the rollout dtype."""
        from safetensors.torch import save

        state = self._full_state()
        if state is None:
            return None
        dt = getattr(torch, dtype)
        return save({k: v.to(dt).contiguous() for k, v in state.items()})

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
        from protege.cluster import storage

        sent = storage.upload_tree(local, dest)
        shutil.rmtree(local, ignore_errors=True)
        return sent

    def load_checkpoint(self, path: str) -> int:
        from protege.cluster import storage

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
