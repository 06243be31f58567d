"""Learner memory and step time at long responses: today's log-prob path vs chunked log-probs.

Each configuration runs in a fresh subprocess (so ``ru_maxrss``, the process's peak resident
set, is that configuration's alone): load the model, one warm-up forward + backward on a short
row, record the RSS, then one timed forward + backward of ``Learner._token_logprobs`` on one
row of a 32-token prompt and T response tokens with the teacher's top-8 ids (the KEPO / OPD
top-k case: sampled log-probs, entropy and the student's top-k log-probs, loss = their sum).
``peak − before`` is the step's own memory. Configurations alternate (today, chunked, today, …)
and the load average is written beside each run, since the machine is shared.

    .venv/bin/python bench/long_response_bench.py            # the table (bench/reports/long_responses.*)
    .venv/bin/python bench/long_response_bench.py --zero3-check

``--zero3-check``: one real DeepSpeed ZeRO-3 learner step (CPU, gloo, one rank) on the tiny
student (tied embeddings), with and without ``logprob_chunk``: the loss, the grad norm and the
weights after one SGD step must agree (the partitioned lm_head is gathered by DeepSpeed's module
hooks at each chunk and at each recomputation in the backward).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "models" / "tiny" / "student"
REPORTS = ROOT / "bench" / "reports"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _model(vocab: int | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if vocab is None:
        m = AutoModelForCausalLM.from_pretrained(str(STUDENT), dtype=torch.float32)
    else:  # the tiny student's shape with a larger vocabulary, random init (no tokenizer needed)
        cfg = AutoConfig.from_pretrained(str(STUDENT))
        cfg.vocab_size = vocab
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    m.config.use_cache = False
    return m


def worker(cfg: dict) -> dict:
    import torch

    from protege.core import spec as S
    from protege.core.records import TrainRow
    from protege.learners.batching import collate
    from protege.learners.learner import Learner

    torch.set_num_threads(1)
    model = _model(cfg["vocab"])
    V = model.config.vocab_size
    ln = Learner(
        rank=0,
        world_size=1,
        model_path="",
        learner_spec=S.LearnerSpec(logprob_chunk=cfg["chunk"]),
        algo=S.KEPOSpec(estimator="topk"),
        temperature=1.0,
        grad_accum=1,
    )
    ln.attach(model, device="cpu", pad_id=0)
    g = torch.Generator().manual_seed(0)

    def step(T: int) -> float:
        prompt = torch.randint(0, V, (32,), generator=g).tolist()
        resp = torch.randint(0, V, (T,), generator=g).tolist()
        ids = torch.randint(0, V, (T, 8), generator=g).tolist()
        b = collate(
            [
                TrainRow(
                    prompt_ids=prompt, response_ids=resp, teacher_topk_ids=ids, teacher_topk_logprobs=[[-1.0] * 8] * T
                )
            ],
            0,
        )
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        lp, ent, dense = ln._token_logprobs(model, b, want_topk=True)
        (lp.sum() + dense["topk"].sum()).backward()
        return time.perf_counter() - t0

    step(64)  # warm-up: allocator, kernels, gradient buffers
    before = _rss_mb()
    load = os.getloadavg()[0]
    seconds = step(cfg["T"])
    peak = _rss_mb()
    return {
        **cfg,
        "V": V,
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(peak, 1),
        "step_mb": round(peak - before, 1),
        "step_s": round(seconds, 3),
        "load1": round(load, 2),
    }


def zero3_worker(chunk: int | None) -> dict:
    import torch

    from protege.core import spec as S
    from protege.core.records import TrainBatch, TrainRow
    from protege.learners.learner import Learner

    spec = S.LearnerSpec(zero_stage=3, optimizer="sgd", lr=0.05, micro_batch=2, logprob_chunk=chunk)
    ln = Learner(
        rank=0,
        world_size=1,
        model_path=str(STUDENT),
        learner_spec=spec,
        algo=S.KEPOSpec(estimator="topk", divergence="forward_kl"),
        temperature=0.8,
        grad_accum=2,
    )
    port = 29500 + (os.getpid() % 1000)
    ln.setup("127.0.0.1", port)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4):
        R = 20 + 7 * i
        rows.append(
            TrainRow(
                prompt_ids=torch.randint(1, 500, (6,), generator=g).tolist(),
                response_ids=torch.randint(1, 500, (R,), generator=g).tolist(),
                advantage=1.0 - 0.5 * i,
                teacher_logprobs=[-1.0] * R,
                teacher_topk_ids=torch.randint(0, 512, (R, 4), generator=g).tolist(),
                teacher_topk_logprobs=[[-1.0, -2.0, -3.0, -4.0]] * R,
                teacher_tail_logprobs=[-0.5] * R,
                gate=1.0,
            )
        )
    out = ln.train_step(TrainBatch(rows=rows, policy_version=0))
    state = ln._full_state()
    flat = torch.cat([v.flatten().double() for _, v in sorted(state.items())])
    ln.close()
    torch.save(flat, os.environ["Z3_OUT"])
    return {"chunk": chunk, "loss": out["loss/total"], "grad_norm": out["learner/grad_norm"]}


def _sub(args: list[str], **extra: str) -> dict:
    env = {**os.environ, **extra, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    line = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not line:
        raise RuntimeError(f"{args}: rc={p.returncode}\n{p.stderr[-3000:]}")
    return json.loads(line[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--zero3-worker", help=argparse.SUPPRESS)
    ap.add_argument("--zero3-check", action="store_true")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--big-vocab", type=int, default=32768)
    ap.add_argument("--big-lengths", default="1024,2048")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.zero3_worker:
        print(json.dumps(zero3_worker(None if a.zero3_worker == "none" else int(a.zero3_worker))))
        return
    if a.zero3_check:
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as tmp:
            runs = [_sub(["--zero3-worker", c], Z3_OUT=f"{tmp}/{c}.pt") for c in ("none", "8")]
            w = [torch.load(f"{tmp}/{c}.pt") for c in ("none", "8")]
        moved = float((w[0] - w[1]).abs().max())
        print(
            json.dumps(
                {
                    "runs": runs,
                    "weights_max_abs_diff_after_step": moved,
                    "loss_diff": abs(runs[0]["loss"] - runs[1]["loss"]),
                    "grad_norm_diff": abs(runs[0]["grad_norm"] - runs[1]["grad_norm"]),
                },
                indent=1,
            )
        )
        return
    configs = [{"vocab": None, "T": int(t)} for t in a.lengths.split(",")]
    configs += [{"vocab": a.big_vocab, "T": int(t)} for t in a.big_lengths.split(",")]
    runs = []
    for rnd in range(a.rounds):
        for c in configs:
            for chunk in (None, a.chunk) if rnd % 2 == 0 else (a.chunk, None):  # alternate the order
                r = _sub(["--worker", json.dumps({**c, "chunk": chunk})])
                r["round"] = rnd
                print(json.dumps(r), flush=True)
                runs.append(r)
    REPORTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "cpus": os.cpu_count(),
        "torch_threads": 1,
        "chunk": a.chunk,
        "note": (
            "ru_maxrss of a fresh process per run; step_mb = peak RSS − RSS after a warm-up step; one row, "
            "32 prompt tokens, top-8 teacher ids, float32, CPU; the machine was shared (load1)"
        ),
    }
    (REPORTS / "long_responses.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    lines = [
        "# Learner log-probs at long responses: today's path vs chunked",
        "",
        f"One forward + backward of `Learner._token_logprobs` (sampled log-probs, entropy, top-8), "
        f"float32 on CPU, one row of 32 prompt + T response tokens, chunk = {a.chunk} positions. "
        "Memory: `ru_maxrss` of a fresh process per run, minus the RSS after a warm-up step; "
        "every run is listed by round (the order of the two paths alternates between rounds), with the "
        "1-minute load average of a shared 2-core machine.",
        "",
        "| V | T | round | today MB | chunked MB | today s | chunked s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rnd in range(a.rounds):
        for c in configs:
            pair = {r["chunk"]: r for r in runs if r["round"] == rnd and r["vocab"] == c["vocab"] and r["T"] == c["T"]}
            t, k = pair[None], pair[a.chunk]
            lines.append(
                f"| {t['V']} | {c['T']} | {rnd} | {t['step_mb']} | {k['step_mb']} | {t['step_s']} | "
                f"{k['step_s']} | {max(t['load1'], k['load1'])} |"
            )
    (REPORTS / "long_responses.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
