"""Staleness 1 done right: the step is faster and learning per step is unchanged.

    python bench/staleness_bench.py [--steps 40] [--seeds 0 1 2] [--out bench/results/staleness]
                                    [--report bench/reports]

The same GRPO job on the tiny student, first SFT-warmed to a weak start (examples/
sft_warmstart.yaml: about 15 % held-out accuracy on one-digit a + b; a random student scores 0 on
every sample and GRPO gets no signal), 8 prompts x 4 samples, once with ``algorithm.max_staleness: 0`` (every rollout from the newest weights) and
once with 1 (the generation of step t+1 overlaps the training of step t, so its rollouts come
from the previous weights; truncated importance sampling against the rollout engine's log-probs
corrects for that, ``tis_cap`` 2.0 by default). Runs alternate (s0, s1, s0, s1, ...) per seed, so
load drift hits both alike; the load is recorded before each run.

Reported per setting: the mean step time (``time/step``, warm-up steps left out), the training
reward per step (the mean of ``reward/mean`` over the second half of the run: learning per step),
the held-out accuracy at the end, and for staleness 1 the importance ratios (``tis/ratio_mean``,
``tis/truncated_frac``) and ``rollout/version_lag``. Writes OUT/staleness.json and, with
--report, REPORT/staleness.{json,md}. Speed is a ratio measured side by side, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from protege.core import checkpoints  # noqa: E402

TASK = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 2,
    "operators": ["+"],
    "allow_negation": False,
    "allow_parentheses": False,
}
ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
}


def spec(name: str, out: Path, *, student: str, steps: int, seed: int, staleness: int) -> dict:
    return {
        "name": name,
        "seed": seed,
        "steps": steps,
        "models": {"student": {"path": student}},
        "data": {
            "source": "reasoning_gym",
            "task": "basic_arithmetic",
            "task_config": TASK,
            "size": 2000,
            "eval_size": 40,
        },
        "algorithm": {"type": "grpo", "max_staleness": staleness},
        "rollout": {"samples_per_prompt": 4, "prompts_per_step": 8, "max_new_tokens": 16},
        "learner": {"ranks": 1, "zero_stage": 2, "lr": 1e-3, "micro_batch": 32},
        "rewards": [{"name": "exact_match"}, {"name": "format", "weight": 0.1}],
        "checkpoint": {"dir": str(out / name), "interval": steps},
        "eval": {"interval": steps, "size": 40},
    }


def run_one(d: dict, out: Path) -> dict:
    path = out / f"{d['name']}.yaml"
    path.write_text(yaml.safe_dump(d))
    load = os.getloadavg()
    t0 = time.perf_counter()
    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "protege.cli", "run", str(path)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{d['name']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in (out / d["name"] / "metrics.jsonl").read_text().splitlines()]
    return {
        "name": d["name"],
        "seed": d["seed"],
        "staleness": d["algorithm"].get("max_staleness", 0),
        "wall_s": wall,
        "load_before": load,
        "rows": rows,
    }


def summarise(run: dict, warmup: int) -> dict:
    steps = [r for r in run["rows"] if r["step"] > warmup and "time/step" in r]
    half = [r for r in run["rows"] if r["step"] > len(run["rows"]) // 2 and "reward/mean" in r]
    evals = [r["eval/accuracy"] for r in run["rows"] if "eval/accuracy" in r]
    s = {
        "step_s": statistics.mean(r["time/step"] for r in steps),
        "reward_second_half": statistics.mean(r["reward/mean"] for r in half),
        "accuracy_first": evals[0],
        "accuracy_last": evals[-1],
    }
    for k in ("tis/ratio_mean", "tis/truncated_frac", "rollout/version_lag"):
        vals = [r[k] for r in steps if k in r]
        if vals:
            s[k] = statistics.mean(vals)
    return s


def render(rep: dict) -> str:
    m = rep["meta"]
    lines = [
        "# Staleness 0 vs 1 (GRPO, tiny pair)",
        "",
        f"{m['date']} · commit {m['commit']} · {m['steps']} steps × seeds {m['seeds']} · runs alternated · "
        f"load (1/5/15) start {m['load_start']} end {m['load_end']}",
        "",
        "| max_staleness | step s (mean) | reward/mean, 2nd half | held-out acc. start → end | tis ratio | truncated | version lag |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for s, agg in rep["settings"].items():
        lines.append(
            f"| {s} | {agg['step_s']:.3f} | {agg['reward_second_half']:.3f} | "
            f"{agg['accuracy_first']:.3f} → {agg['accuracy_last']:.3f} | {agg.get('tis/ratio_mean', float('nan')):.3f} | "
            f"{agg.get('tis/truncated_frac', float('nan')):.3f} | {agg.get('rollout/version_lag', 0):.2f} |"
        )
    r = rep["ratios"]
    lines += [
        "",
        f"- step time, staleness 1 / staleness 0: **{r['step_s']:.2f}×** (side by side, alternated)",
        f"- training reward per step (2nd half), staleness 1 − staleness 0: {r['reward_diff']:+.3f} "
        f"(per seed: {', '.join(f'{x:+.3f}' for x in r['reward_diff_per_seed'])})",
        f"- held-out accuracy at the end, staleness 1 − staleness 0: {r['accuracy_diff']:+.3f}",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the step time")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "staleness"))
    ap.add_argument("--report", default=None)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    warm = yaml.safe_load((ROOT / "examples" / "sft_warmstart.yaml").read_text())
    warm["checkpoint"] = {"dir": str(out / "warm"), "interval": warm["steps"], "keep": 1}
    warm["models"]["student"]["path"] = str(ROOT / "models" / "tiny" / "student")
    warm["name"] = "warm"
    if checkpoints.latest(out / "warm") is None:  # reused when the folder already holds it
        run_one(warm, out)
    student = str(checkpoints.latest(out / "warm") / "model")  # the warm student's HF folder
    runs = []
    for seed in args.seeds:
        for staleness in (0, 1):
            d = spec(f"s{staleness}-seed{seed}", out, student=student, steps=args.steps, seed=seed, staleness=staleness)
            r = run_one(d, out)
            r["summary"] = summarise(r, args.warmup)
            print(f"staleness {staleness} seed {seed}: {r['summary']}", flush=True)
            runs.append(r)
    settings = {}
    for s in (0, 1):
        mine = [r["summary"] for r in runs if r["staleness"] == s]
        settings[str(s)] = {k: statistics.mean(x[k] for x in mine) for k in mine[0] if all(k in x for x in mine)}
    by = {(r["seed"], r["staleness"]): r["summary"] for r in runs}
    per_seed = [by[(s, 1)]["reward_second_half"] - by[(s, 0)]["reward_second_half"] for s in args.seeds]
    rep = {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip(),
            "steps": args.steps,
            "seeds": args.seeds,
            "load_start": [round(x, 2) for x in load0],
            "load_end": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": settings,
        "ratios": {
            "step_s": settings["1"]["step_s"] / settings["0"]["step_s"],
            "reward_diff": statistics.mean(per_seed),
            "reward_diff_per_seed": per_seed,
            "accuracy_diff": settings["1"]["accuracy_last"] - settings["0"]["accuracy_last"],
        },
        "runs": [
            {k: v for k, v in r.items() if k != "rows"}
            | {"curve": [[x["step"], x.get("reward/mean")] for x in r["rows"] if "reward/mean" in x]}
            for r in runs
        ],
    }
    (out / "staleness.json").write_text(json.dumps(rep, indent=1))
    text = render(rep)
    print(text)
    if args.report:
        rdir = Path(args.report)
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "staleness.json").write_text(json.dumps(rep, indent=1))
        (rdir / "staleness.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
