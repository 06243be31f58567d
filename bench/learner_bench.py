"""The learner's precision and layout, per model size: what a GRPO step costs and how far it moves.

    python bench/learner_bench.py [--rounds 3] [--only tiny|smollm2] [--skip-pipeline] [--out DIR]

Two parts, on the peer benchmark's workloads (bench/peer_trl.py ``WORKLOADS``: the same model
folders, prompts, group size and 32 response tokens):

1. **Precision** (in-process, no Ray): the training forward + backward of one step's batch
   (prompts × samples rows, one micro-batch) in three precisions, alternated ``--reps`` times:
   ``float32``; ``autocast`` (learner.autocast: bfloat16, float32 weights, matmuls in bfloat16
   under ``torch.autocast``); ``bf16-weights`` (learner.bf16: DeepSpeed's bfloat16 weights and
   activations). Against float32 on the same batch: mean and max |Δ log π| of the response tokens,
   the relative difference of a GRPO-shaped loss −mean(A · log π) with fixed random advantages,
   and the cosine of its gradient with float32's.
2. **Layout** (the real pipeline, ``protege run``: Ray, vLLM, DeepSpeed): ZeRO-0 and ZeRO-2 × 1
   and 2 ranks in float32, and autocast at ZeRO-2 × 1 and 2 ranks, ``--rounds`` rounds
   alternated (each round starts one later in the list); per run the median ``time/train`` and
   ``time/step`` after ``--warmup`` steps, and the load before it.

Writes OUT/learner_bench.json and OUT/learner_bench.md (default bench/results; ``--out
bench/reports`` for the published report, from an otherwise idle machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import peer_trl as P  # bench/peer_trl.py: the workloads, the pipeline runner, load and metadata

ROOT = P.ROOT
MODES = ("float32", "autocast", "bf16-weights")
LAYOUTS = [  # (name, zero_stage, ranks, autocast)
    ("zero0-1rank", 0, 1, "off"),
    ("zero2-1rank", 2, 1, "off"),
    ("zero0-2rank", 0, 2, "off"),
    ("zero2-2rank", 2, 2, "off"),
    ("zero2-1rank-autocast", 2, 1, "bfloat16"),
    ("zero2-2rank-autocast", 2, 2, "bfloat16"),
]


# ============================================================================================ precision
def _batch(inp: dict, seed: int = 0):
    """One step's rows: each prompt's ids + ``max_new_tokens`` response tokens drawn from the
    vocabulary (a fixed seed), right-padded into one micro-batch as the learner collates it."""
    import torch

    from protege.core.records import TrainRow
    from protege.learners.batching import collate

    g = torch.Generator().manual_seed(seed)
    vocab = _vocab(inp["model"])
    rows = []
    for p in inp["steps"][0]:
        for _ in range(inp["samples"]):
            resp = torch.randint(10, vocab, (inp["max_new_tokens"],), generator=g).tolist()
            adv = float(torch.randn((), generator=g))
            rows.append(TrainRow(prompt_ids=p["ids"], response_ids=resp, advantage=adv))
    return collate(rows, 0)


def _vocab(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["vocab_size"]


def _forward_backward(model, b, mode: str):
    import torch

    from protege.core.logprobs import response_logprobs

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else _null()
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with ctx:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp, _ = response_logprobs(logits, b["resp_pos"], b["targets"], 1.0)
    mask = b["mask"]
    loss = -(b["advantages"][:, None] * lp * mask).sum() / mask.sum()
    loss.backward()
    seconds = time.perf_counter() - t0
    # float64: a float32 cosine over ~10^8 entries is off by ~1 % (it gave 1.012 for float32 itself)
    grad = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    return seconds, lp.detach().float(), float(loss.detach()), grad


def _null():
    import contextlib

    return contextlib.nullcontext()


def bench_precision(name: str, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    inp = P.workload_inputs(name, 1)
    b = _batch(inp)
    models = {
        mode: AutoModelForCausalLM.from_pretrained(
            inp["model"], dtype=torch.bfloat16 if mode == "bf16-weights" else torch.float32
        )
        for mode in MODES
    }
    for m in models.values():
        m.config.use_cache = False
        m.train()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    ref = {}
    for r in range(reps + 1):  # the first round warms up (oneDNN kernels, allocator) and is not timed
        for i in range(len(MODES)):
            mode = MODES[(i + r) % len(MODES)]
            s, lp, loss, grad = _forward_backward(models[mode], b, mode)
            if r:
                times[mode].append(s)
            ref[mode] = (lp, loss, grad)
    lp32, loss32, g32 = ref["float32"]
    mask = b["mask"].bool()
    out = {"rows": int(b["input_ids"].shape[0]), "seq_len": int(b["input_ids"].shape[1]), "modes": {}}
    for mode in MODES:
        lp, loss, g = ref[mode]
        d = (lp - lp32).abs()[mask]
        out["modes"][mode] = {
            "step_s": statistics.median(times[mode]),
            "step_s_all": times[mode],
            "speedup_vs_float32": statistics.median(times["float32"]) / statistics.median(times[mode]),
            "logprob_abs_diff_mean": float(d.mean()),
            "logprob_abs_diff_max": float(d.max()),
            "loss": loss,
            "loss_rel_diff": abs(loss - loss32) / max(abs(loss32), 1e-12),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g, g32, dim=0)),
        }
    return out


# ============================================================================================ layout
def bench_layout(name: str, rounds: int, warmup: int, steps: int | None, work: Path, layouts=LAYOUTS) -> dict:
    inp = P.workload_inputs(name, steps or P.WORKLOADS[name][5] + warmup)
    runs: dict[str, list[dict]] = {n: [] for n, *_ in layouts}
    for r in range(rounds):
        for i in range(len(layouts)):
            lname, zero, ranks, autocast = layouts[(i + r) % len(layouts)]
            load = P._load()
            spec = P.protege_spec(inp, ranks, "fp32", work / lname / "run")
            spec["learner"].update(zero_stage=zero, autocast=autocast)
            print(f"[learner_bench] {name} round {r + 1}/{rounds} {lname} (load {load[0]})", flush=True)
            try:
                res = _run_spec(spec, work / lname, warmup)
            except Exception as e:  # one failed configuration must not lose the others
                res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            res["load_before"] = load
            runs[lname].append(res)
    out = {}
    for lname, zero, ranks, autocast in layouts:
        ok = [x for x in runs[lname] if "error" not in x]
        out[lname] = {
            "zero_stage": zero,
            "ranks": ranks,
            "autocast": autocast,
            "train_s": P._median([x["train_s"] for x in ok]),
            "step_s": P._median([x["step_s"] for x in ok]),
            "runs": runs[lname],
        }
    best = min((k for k in out if out[k]["train_s"]), key=lambda k: out[k]["train_s"], default=None)
    return {"configs": out, "best_train": best}


def _run_spec(spec: dict, work: Path, warmup: int) -> dict:
    rows, _ = P.run_spec(spec, work, timeout=1800)
    kept = rows[warmup:]
    return {
        "train_s": P._median([r["time/train"] for r in kept]),
        "step_s": P._median([r["time/step"] for r in kept]),
        "train_s_all": [r["time/train"] for r in kept],
    }


# ============================================================================================ report
def _earlier_workloads(path: Path) -> dict:
    """The workloads of an earlier report at ``path``, each with its ``run`` record. One written before
    workloads carried a ``run`` record gets the earlier file's meta, rounds and reps, so every
    workload's date, commit and repetitions stay those of the run that measured it."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    default = {**earlier.get("meta", {}), "rounds": earlier.get("rounds"), "reps": earlier.get("reps")}
    return {name: {"run": default, **w} for name, w in earlier.get("workloads", {}).items()}


def render(rep: dict) -> str:
    lines = [
        f"# Learner precision and layout ({rep['meta']['date']}, commit {rep['meta']['commit']}, "
        f"{rep['meta']['cpus']} CPUs: {rep['meta']['cpu']}; {rep['bf16_support']})",
        "",
    ]
    for name, w in rep["workloads"].items():
        run = w.get("run", {**rep["meta"], "rounds": rep["rounds"], "reps": rep["reps"]})
        about = [f"## {name}", ""]
        if run.get("date") != rep["meta"]["date"]:
            about += [f"Measured {run.get('date')}, commit {run.get('commit')}, on {run.get('cpu')}.", ""]
        if run.get("note"):
            about += [f"*{run['note']}*", ""]
        lines += about
        if "precision" in w:
            pr, prun = w["precision"], w.get("precision_run", run)
            lines += [
                f"### precision (one forward + backward of {pr['rows']} rows × {pr['seq_len']} tokens, "
                f"{prun['reps']} alternated reps, load {w['load_before'][0] if prun is run else 'see its run'})",
                "",
                "| mode | fwd+bwd s | speed vs float32 | mean abs Δ log π | max abs Δ log π | loss rel. diff | grad cosine |",
                "|---|---|---|---|---|---|---|",
            ]
            for mode, m in pr["modes"].items():
                lines.append(
                    f"| {mode} | {m['step_s']:.4f} | {m['speedup_vs_float32']:.2f}× | {m['logprob_abs_diff_mean']:.2e} "
                    f"| {m['logprob_abs_diff_max']:.2e} | {m['loss_rel_diff']:.2e} | {m['grad_cosine']:.5f} |"
                )
            lines.append("")
            if prun is not run:
                lines += [
                    f"*Precision kept from the run of {prun.get('date')} (commit {prun.get('commit')}, "
                    f"{prun.get('cpu')}): the layout's CPU has no bfloat16 instructions. {prun.get('note', '')}*",
                    "",
                ]
        if "layout" in w:
            lay = w["layout"]
            lines += [
                f"### layout (the real pipeline, {run['rounds']} alternated rounds)",
                "",
                "| config | ZeRO | ranks | autocast | time/train s (median) | time/step s (median) | loads before |",
                "|---|---|---|---|---|---|---|",
            ]
            for cname, c in lay["configs"].items():
                loads = ", ".join(f"{x['load_before'][0]:.1f}" for x in c["runs"])
                errs = [x["error"] for x in c["runs"] if "error" in x]
                tr = f"{c['train_s']:.3f}" if c["train_s"] else "failed"
                st = f"{c['step_s']:.3f}" if c["step_s"] else (errs[0][:80] if errs else "—")
                lines.append(
                    f"| {cname}{' **(fastest)**' if cname == lay['best_train'] else ''} | {c['zero_stage']} "
                    f"| {c['ranks']} | {c['autocast']} | {tr} | {st} | {loads} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5, help="alternated reps of the precision part")
    ap.add_argument("--warmup", type=int, default=1, help="pipeline steps left out of each run")
    ap.add_argument("--steps", type=int, default=None, help="pipeline steps per run (default: the workload's + warmup)")
    ap.add_argument("--only", choices=list(P.WORKLOADS), default=None)
    ap.add_argument("--skip-pipeline", action="store_true", help="the precision part only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--layout-from", default=None, help="keep the layout part of this earlier learner_bench.json")
    ap.add_argument("--note", default="", help="how the run was made (the load beside it, what was cut), kept with it")
    args = ap.parse_args(argv)
    import os

    for k, v in P.RUN_ENV.items():
        os.environ.setdefault(k, v)
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.quick = False
    ok, why = P.bf16_support()
    rep = {"meta": P.meta(args), "bf16_support": why, "reps": args.reps, "rounds": args.rounds, "workloads": {}}
    # Without bfloat16 instructions the autocast layouts would time the emulation, not the option.
    layouts = [x for x in LAYOUTS if ok or x[3] == "off"]
    published = _earlier_workloads(out / "learner_bench.json")
    if args.only:  # measuring one workload keeps the others' published results, each with its own run record
        rep["workloads"] = {k: v for k, v in published.items() if k != args.only}
    for name in [args.only] if args.only else list(P.WORKLOADS):
        if not (ROOT / P.WORKLOADS[name][0] / "config.json").exists():
            print(f"[learner_bench] {name}: {P.WORKLOADS[name][0]} is missing, skipped", flush=True)
            continue
        w = rep["workloads"][name] = {
            "load_before": P._load(),
            "run": {**rep["meta"], "rounds": args.rounds, "reps": args.reps, "note": args.note},
        }
        if ok:
            print(f"[learner_bench] {name}: precision", flush=True)
            w["precision"] = bench_precision(name, args.reps)
        elif "precision" in published.get(name, {}):
            # Emulated bfloat16 would time the emulation, not the option: keep the earlier, native figures.
            print(f"[learner_bench] {name}: {why}; the precision part is kept from the earlier report", flush=True)
            w["precision"] = published[name]["precision"]
            w["precision_run"] = published[name]["run"]
        if not args.skip_pipeline:
            w["layout"] = bench_layout(
                name, args.rounds, args.warmup, args.steps, out / "learner_bench_work" / name, layouts
            )
        elif args.layout_from:
            earlier = json.loads(Path(args.layout_from).read_text())
            if "layout" in earlier["workloads"].get(name, {}):
                w["layout"] = earlier["workloads"][name]["layout"]
                rep["rounds"] = earlier["rounds"]
                rep["layout_meta"] = earlier["meta"]
        (out / "learner_bench.json").write_text(json.dumps(rep, indent=1))
        (out / "learner_bench.md").write_text(render(rep))
    print(render(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
