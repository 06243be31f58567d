"""Rollout generation engines per model size: vLLM eager, vLLM compiled, transformers.

    python bench/engine_bench.py [--rounds 2] [--calls 40] [--only tiny|smollm2] [--skip-pipeline] [--out DIR]
    python bench/engine_bench.py --sizes [--rounds 2] [--calls 12] [--out DIR]

What ``rollout.engine`` and ``rollout.compile`` choose between, on the peer benchmark's workloads
(bench/peer_trl.py ``WORKLOADS``: same model folders, prompts, group size, 32 new tokens):

1. **Engines** (each configuration in its own process, so compile caches and thread pools start
   clean): build the engine, then ``--calls`` generate calls of one step's prompts × samples.
   Per configuration: build seconds (the first round's build is cold: vLLM's compile cache is
   empty; later rounds read it), the first call, the median call after it, and for compiled
   against eager the break-even: (build_compiled − build_eager) / (call_eager − call_compiled)
   generate calls, i.e. the run length from which compiling pays.
2. **Pipeline** (tiny only, the real ``protege run``): the same GRPO job with ``rollout.engine``
   hf, vllm (eager) and vllm (compiled), ``--pipeline-steps`` steps each, alternated; median
   ``time/generate``, ``time/sync`` and ``time/step`` after the first step.

3. **Sizes** (``--sizes``): vLLM eager against hf over students of growing size (the tiny student
   and teacher, and SmolLM2-135M pruned to 1, 3 and 10 layers, ``protege models prune models/smollm2
   models/smollm2-1l --keep-every 30``, ``--keep-every 10``, ``--keep-every 3``), each at 4 prompts
   x 4 samples x 32 tokens: where ``rollout.engine: auto`` switches (core/spec.py
   ``HF_ROLLOUT_BELOW_PARAMS``). Merged into an existing OUT/engine_bench.json, the rest kept.

Configurations alternate (each round starts one later in the list); the load is recorded before
each. Writes OUT/engine_bench.json and OUT/engine_bench.md (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import peer_trl as P

ROOT = P.ROOT
ENGINES = [("vllm-eager", "vllm", True), ("vllm-compiled", "vllm", False), ("hf", "hf", True)]
SIZE_ENGINES = [("vllm-eager", "vllm", True), ("hf", "hf", True)]
# name -> model folder; the prompt batch of each is P.WORKLOADS["smollm2"]'s (4 x 4 x 32)
SIZES = {
    "tiny": "models/tiny/student",
    "tiny-teacher": "models/tiny/teacher",  # same vocabulary, 6x the parameters
    "smollm2-1l": "models/smollm2-1l",
    "smollm2-3l": "models/smollm2-3l",
    "smollm2-10l": "models/smollm2-10l",
}


def engine_worker(cfg_path: str) -> int:
    """One engine configuration, in its own process: build, then timed generate calls."""
    cfg = json.loads(Path(cfg_path).read_text())
    import torch

    from protege.actors.engine import make_engine

    torch.set_num_threads(1)
    inp = cfg["inputs"]
    prompts = [p["ids"] for p in inp["steps"][0]]
    t0 = time.perf_counter()
    kw = {"max_model_len": max(map(len, prompts)) + inp["max_new_tokens"] + 64}
    if cfg["kind"] == "vllm":
        kw["enforce_eager"] = cfg["eager"]
    engine = make_engine(cfg["kind"], inp["model"], **kw)
    build = time.perf_counter() - t0
    eos = [engine.tokenizer.eos_token_id]
    calls, tokens = [], 0
    for i in range(cfg["calls"]):
        t0 = time.perf_counter()
        groups = engine.generate(
            prompts,
            n=inp["samples"],
            temperature=1.0,
            top_p=1.0,
            max_tokens=inp["max_new_tokens"],
            seed=i,
            stop_token_ids=eos,
        )
        calls.append(time.perf_counter() - t0)
        tokens += sum(len(s.response_ids) for g in groups for s in g)
    Path(cfg["out"]).write_text(
        json.dumps({"build_s": build, "calls_s": calls, "tokens_per_call": tokens / len(calls)})
    )
    engine.close()
    return 0


def bench_engines(name: str, rounds: int, calls: int, work: Path, engines=ENGINES) -> dict:
    inp = P.workload_inputs(name, 1)
    runs: dict[str, list[dict]] = {n: [] for n, *_ in engines}
    work.mkdir(parents=True, exist_ok=True)
    for r in range(rounds):
        for i in range(len(engines)):
            cname, kind, eager = engines[(i + r) % len(engines)]
            cfg = {"inputs": inp, "kind": kind, "eager": eager, "calls": calls, "out": str(work / f"{cname}-{r}.json")}
            path = work / f"{cname}-{r}.cfg.json"
            path.write_text(json.dumps(cfg))
            load = P._load()
            print(f"[engine_bench] {name} round {r + 1}/{rounds} {cname} (load {load[0]})", flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--_worker", str(path)],
                env=P._env(),
                capture_output=True,
                text=True,
                timeout=3600,
            )
            if proc.returncode != 0:
                runs[cname].append({"error": proc.stderr[-400:], "load_before": load})
                continue
            res = json.loads(Path(cfg["out"]).read_text())
            res["load_before"] = load
            res["round"] = r
            runs[cname].append(res)
    out = {}
    for cname, kind, eager in engines:
        ok = [x for x in runs[cname] if "error" not in x]
        out[cname] = {
            "engine": kind,
            "eager": eager,
            "build_s_cold": ok[0]["build_s"] if ok and ok[0]["round"] == 0 else None,
            "build_s": P._median([x["build_s"] for x in ok]),
            "first_call_s": P._median([x["calls_s"][0] for x in ok]),
            "call_s": P._median([statistics.median(x["calls_s"][1:]) for x in ok if len(x["calls_s"]) > 1]),
            "tokens_per_call": P._median([x["tokens_per_call"] for x in ok]),
            "runs": runs[cname],
        }
    return derive(out)


def derive(out: dict) -> dict:
    """Compiled against eager: the per-call speed-up, and the break-even run length counting what
    each pays before its steady state (build + first call): (start_c − start_e) / (call_e − call_c)
    calls; None when compiling never pays (no per-call gain)."""
    e, c = out["vllm-eager"], out.get("vllm-compiled", {})
    if c and all(x[k] for x in (e, c) for k in ("call_s", "build_s", "first_call_s")):
        saved = e["call_s"] - c["call_s"]
        extra = (c["build_s"] + c["first_call_s"]) - (e["build_s"] + e["first_call_s"])
        out["start_extra_s"] = extra
        out["break_even_calls"] = max(0.0, extra) / saved if saved > 0 else None
        out["compiled_speedup"] = e["call_s"] / c["call_s"]
    if e["call_s"] and out["hf"]["call_s"]:
        out["vllm_over_hf_speed"] = out["hf"]["call_s"] / e["call_s"]
    return out


def bench_pipeline(rounds: int, steps: int, work: Path, workload: str = "tiny") -> dict:
    inp = P.workload_inputs(workload, steps)
    variants = [("hf", "hf", "eager"), ("vllm-eager", "vllm", "eager"), ("vllm-compiled", "vllm", "compiled")]
    runs: dict[str, list[dict]] = {n: [] for n, *_ in variants}
    for r in range(rounds):
        for i in range(len(variants)):
            vname, engine, compile_ = variants[(i + r) % len(variants)]
            spec = P.protege_spec(inp, 1, "fp32", work / vname / "run")
            spec["rollout"].update(engine=engine, compile=compile_)
            load = P._load()
            print(f"[engine_bench] pipeline round {r + 1}/{rounds} {vname} (load {load[0]})", flush=True)
            try:
                res = _run(spec, work / vname)
            except Exception as e:
                res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            res["load_before"] = load
            runs[vname].append(res)
    out = {}
    for vname, *_ in variants:
        ok = [x for x in runs[vname] if "error" not in x]
        out[vname] = {k: P._median([x[k] for x in ok]) for k in ("generate_s", "sync_s", "step_s", "wall_s")}
        out[vname]["runs"] = runs[vname]
    return out


def _run(spec: dict, work: Path) -> dict:
    rows, wall = P.run_spec(spec, work, timeout=3600)
    kept = [r for r in rows if r["step"] >= 2]  # step 1 builds kernels and caches
    return {
        "generate_s": P._median([r["time/generate"] for r in kept]),
        "sync_s": P._median([r["time/sync"] for r in kept]),
        "step_s": P._median([r["time/step"] for r in kept]),
        "wall_s": wall,
    }


def _f(x, fmt="{:.3f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "—"


def _measured(m: dict) -> str:
    return f"Measured {m['date']} at commit {m['commit']} on {m['cpu']} ({m['cpus']} CPUs)."


def _render_sizes(sz: dict) -> list[str]:
    lines = [
        f"## Engine by size: one step's generation, 4 prompts x 4 samples x 32 tokens ({sz['calls']} calls per "
        f"build, {sz['rounds']} alternated rounds, 1 thread)",
        "",
        _measured(sz["measured"]) + (f" {sz['conditions']}" if sz.get("conditions") else ""),
        "",
        "| student | parameters | vllm-eager call s | hf call s | vLLM / hf speed | build s vllm / hf | loads before |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, w in sz["models"].items():
        e, h = w["vllm-eager"], w["hf"]
        loads = ", ".join(f"{x['load_before'][0]:.1f}" for x in e["runs"] + h["runs"])
        lines.append(
            f"| {name} ({w['model']}) | {w['params'] / 1e6:.2f} M | {_f(e['call_s'])} | {_f(h['call_s'])} "
            f"| {_f(w.get('vllm_over_hf_speed'), '{:.2f}')}x | {_f(e['build_s'], '{:.1f}')} / "
            f"{_f(h['build_s'], '{:.1f}')} | {loads} |"
        )
    return lines + [
        "",
        "`rollout.engine: auto` on CPU takes hf below `HF_ROLLOUT_BELOW_PARAMS` (core/spec.py) and vLLM from it.",
        "",
    ]


def render(rep: dict) -> str:
    m = rep["meta"]
    lines = [f"# Rollout engines (last run {m['date']}, commit {m['commit']}, {m['cpus']} CPUs: {m['cpu']})", ""]
    lines += [
        "Each section names the run and machine it was measured on (hosts differ between sessions: compare "
        "engines within a section, not seconds across them).",
        "",
    ]
    if rep.get("sizes"):
        lines += _render_sizes(rep["sizes"])
    for name, w in rep["engines"].items():
        lines += [
            f"## {name}: one step's generation ({rep['calls']} calls per build, {rep['rounds']} alternated rounds)",
            "",
            _measured(w.get("measured", m)) + (f" {w['conditions']}" if w.get("conditions") else ""),
            "",
            "| engine | build s (cold) | build s (median) | first call s | call s (median) | tokens/call | loads before |",
            "|---|---|---|---|---|---|---|",
        ]
        for cname, *_ in ENGINES:
            if cname not in w:
                continue
            c = w[cname]
            loads = ", ".join(f"{x['load_before'][0]:.1f}" for x in c["runs"])
            lines.append(
                f"| {cname} | {_f(c['build_s_cold'], '{:.1f}')} | {_f(c['build_s'], '{:.1f}')} "
                f"| {_f(c['first_call_s'])} | {_f(c['call_s'])} | {_f(c['tokens_per_call'], '{:.0f}')} | {loads} |"
            )
        lines += [
            "",
            f"vLLM compiled / eager per call: {_f(w.get('compiled_speedup'), '{:.2f}')}× faster; compiled starts "
            f"{_f(w.get('start_extra_s'), '{:.1f}')} s later (build + first call); break-even "
            f"{_f(w.get('break_even_calls'), '{:.0f}')} generate calls (— = never). vLLM eager / hf: "
            f"{_f(w.get('vllm_over_hf_speed'), '{:.2f}')}× faster.",
            "",
        ]
    pipelines = rep.get("pipelines") or {}
    for workload, pipe in pipelines.items():
        lines += [
            f"## {workload}: inside the pipeline (GRPO, {pipe['steps']} steps, medians after step 1; every step "
            "syncs the weights into the engine)",
            "",
            _measured(pipe.get("measured", m)) + (f" {pipe['conditions']}" if pipe.get("conditions") else ""),
            "",
            "| rollout engine | time/generate s | time/sync s | time/step s | wall s (incl. start-up) | loads before |",
            "|---|---|---|---|---|---|",
        ]
        for vname, v in pipe["runs"].items():
            loads = ", ".join(f"{x['load_before'][0]:.1f}" for x in v["runs"])
            lines.append(
                f"| {vname} | {_f(v['generate_s'])} | {_f(v['sync_s'])} | {_f(v['step_s'])} "
                f"| {_f(v['wall_s'], '{:.0f}')} | {loads} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def bench_sizes(rounds: int, calls: int, work: Path) -> dict:
    """vLLM eager against hf, one step's generation, per student size (SIZES; missing folders skipped)."""
    from protege.core.models import approx_parameters

    out = {}
    for name, folder in SIZES.items():
        if not (ROOT / folder / "config.json").exists():
            print(f"[engine_bench] sizes: {folder} is missing, skipped (see the module docstring)", flush=True)
            continue
        P.WORKLOADS[f"size:{name}"] = (folder, *P.WORKLOADS["smollm2"][1:])
        res = derive(bench_engines(f"size:{name}", rounds, calls, work / name, SIZE_ENGINES))
        res["model"] = folder
        res["params"] = approx_parameters(json.loads((ROOT / folder / "config.json").read_text()))
        out[name] = res
    return out


def _merge(path: Path, rep: dict) -> dict:
    """The sections measured now over those of an earlier report at ``path``: a workload re-measured
    alone keeps the others, each section dated with the machine it ran on (``measured``)."""
    if not path.exists():
        return rep
    old = json.loads(path.read_text())
    for key in ("engines", "pipelines"):
        for name, sec in (old.get(key) or {}).items():
            if name not in rep[key]:
                sec.setdefault("measured", old["meta"])
                if old.get("conditions"):
                    sec.setdefault("conditions", old["conditions"])
                rep[key][name] = sec
    if "sizes" not in rep and old.get("sizes"):  # one section, re-measured whole or kept whole
        rep["sizes"] = old["sizes"]
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--pipeline-steps", type=int, default=12)
    ap.add_argument("--only", choices=list(P.WORKLOADS), default=None)
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--skip-engines", action="store_true", help="the pipeline part only")
    ap.add_argument("--pipeline-workload", choices=list(P.WORKLOADS), default="tiny")
    ap.add_argument("--sizes", action="store_true", help="only the engine-by-size part (vllm eager vs hf)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--render-only", action="store_true", help="re-derive and re-render OUT/engine_bench.json")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        return engine_worker(args._worker)
    out = Path(args.out)
    path = out / "engine_bench.json"
    if args.render_only:
        rep = json.loads(path.read_text())
        rep["engines"] = {k: derive(w) for k, w in rep["engines"].items()}
        path.write_text(json.dumps(rep, indent=1))
        (out / "engine_bench.md").write_text(render(rep))
        print(render(rep))
        return 0
    import os

    for k, v in P.RUN_ENV.items():
        os.environ.setdefault(k, v)
    out.mkdir(parents=True, exist_ok=True)
    args.quick = False
    meta = P.meta(args)
    rep: dict = {"meta": meta, "rounds": args.rounds, "calls": args.calls, "engines": {}, "pipelines": {}}
    if args.sizes:
        rep["sizes"] = {"measured": meta, "calls": args.calls, "rounds": args.rounds}
        rep["sizes"]["models"] = bench_sizes(args.rounds, args.calls, out / "engine_bench_work" / "sizes")
    else:
        for name in [] if args.skip_engines else [args.only] if args.only else list(P.WORKLOADS):
            if not (ROOT / P.WORKLOADS[name][0] / "config.json").exists():
                print(f"[engine_bench] {name}: {P.WORKLOADS[name][0]} is missing, skipped", flush=True)
                continue
            rep["engines"][name] = bench_engines(name, args.rounds, args.calls, out / "engine_bench_work" / name)
            rep["engines"][name]["measured"] = meta
        if not args.skip_pipeline:
            w = args.pipeline_workload
            runs = bench_pipeline(args.rounds, args.pipeline_steps, out / "engine_bench_work" / "pipeline", w)
            rep["pipelines"][w] = {"steps": args.pipeline_steps, "rounds": args.rounds, "runs": runs, "measured": meta}
    rep = _merge(path, rep)
    path.write_text(json.dumps(rep, indent=1))
    (out / "engine_bench.md").write_text(render(rep))
    print(render(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
