"""Teacher-guided algorithms compared at CPU scale: the shape of the RLAD / KEPO tables.

    python bench/compare.py [--steps 200] [--seeds 0 1] [--algos grpo opd rlad kepo dpo] [--out bench/results/compare]

1. Task teacher: SFT the tiny 4-layer model on easy addition until it is clearly useful.
2. Weak student: a short SFT warm start of the tiny 2-layer model (same tokenizer).
3. From that same student, with the same seeds and step budget: GRPO, OPD, RLAD, KEPO, online DPO.
4. One table (held-out greedy accuracy at fixed steps, mean ± spread over seeds, wall time) and a
   plot of accuracy against step and against wall time.

Everything runs through the real pipeline (Ray, vLLM rollout worker, DeepSpeed learner,
teacher scorer actor). About 15-25 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"],
        "allow_negation": False, "allow_parentheses": False}


def base_spec(name: str, student: str, out: Path, *, steps: int, seed: int, algorithm: dict, teacher: str | None = None,
              eval_every: int = 50, **over) -> dict:
    d = {
        "name": name, "seed": seed, "steps": steps,
        "models": {"student": {"path": student}, **({"teacher": {"path": teacher}} if teacher else {})},
        "data": {"source": "reasoning_gym", "task": "basic_arithmetic", "task_config": TASK, "size": 4000,
                 "eval_size": 200, "seed": 0},  # the held-out set is fixed across seeds
        "algorithm": algorithm,
        "rollout": {"samples_per_prompt": 8, "prompts_per_step": 16, "max_new_tokens": 16, "temperature": 1.0},
        "learner": {"ranks": 1, "zero_stage": 2, "lr": 1e-4, "micro_batch": 128},
        "rewards": [{"name": "exact_match"}],
        "checkpoint": {"dir": str(out / name), "interval": steps, "keep": 1},
        "eval": {"interval": eval_every, "size": 200},
    }
    from protege.cluster.spec import set_dotted

    for k, v in over.items():
        set_dotted(d, k, v)
    return d


ALGORITHMS = {
    "grpo": {"type": "grpo"},
    "opd": {"type": "opd", "opd_coef": 1.0, "grpo_coef": 1.0},
    "rlad": {"type": "rlad", "alpha": 0.5, "clamp": 1.0},
    "kepo": {"type": "kepo", "divergence": "reverse_kl", "distill_coef": 1.0, "hints": True, "hint_attempts": 4,
             "hint_replace": 2},
    "dpo": {"type": "dpo", "mode": "online", "beta": 0.1, "reference": "initial"},
}
NEEDS_TEACHER = {"opd", "rlad", "kepo"}


def train(spec_dict: dict) -> dict:
    from protege.cluster.driver import run
    from protege.cluster.spec import parse_spec

    spec = parse_spec(spec_dict)
    t0 = time.perf_counter()
    run(spec, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    # wall-clock position of each eval: cumulative step time (startup excluded, same for all)
    clock, t = {0: 0.0}, 0.0
    for r in rows[1:]:
        t += r.get("time/step", 0.0) + r.get("eval/seconds", 0.0)
        clock[r["step"]] = t
    return {"evals": evals, "clock": [clock.get(s, 0.0) for s, _ in evals], "wall": wall,
            "model": str(spec.run_dir / "checkpoints" / f"step_{spec.steps:06d}" / "model")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="RL steps per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--algos", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--student-steps", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compare"))
    args = ap.parse_args()
    for k, v in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                 "VLLM_CPU_KVCACHE_SPACE": "1", "DS_ACCELERATOR": "cpu",
                 "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}.items():
        os.environ.setdefault(k, v)
    import ray

    from protege.models import ensure_demo_models

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    tiny = ensure_demo_models(ROOT / "models")
    load0 = os.getloadavg()

    print("1. task teacher: SFT of the 4-layer tiny model", flush=True)
    t = train(base_spec("teacher-sft", str(tiny["teacher"]), out, steps=args.teacher_steps, seed=0,
                        algorithm={"type": "sft"}, eval_every=args.teacher_steps,
                        **{"learner.lr": 3e-3, "rollout.prompts_per_step": 32, "learner.micro_batch": 32}))
    teacher, teacher_acc = t["model"], t["evals"][-1][1]
    print(f"   teacher held-out accuracy {teacher_acc:.3f}", flush=True)
    print("2. weak student: short SFT warm start of the 2-layer tiny model", flush=True)
    s = train(base_spec("student-sft", str(tiny["student"]), out, steps=args.student_steps, seed=0,
                        algorithm={"type": "sft"}, eval_every=args.student_steps,
                        **{"learner.lr": 3e-3, "rollout.prompts_per_step": 32, "learner.micro_batch": 32}))
    student, student_acc = s["model"], s["evals"][-1][1]
    print(f"   student held-out accuracy {student_acc:.3f}", flush=True)

    results: dict[str, list[dict]] = {}
    for algo in args.algos:
        for seed in args.seeds:
            name = f"{algo}-s{seed}"
            print(f"3. {name}", flush=True)
            r = train(base_spec(name, student, out, steps=args.steps, seed=seed, algorithm=ALGORITHMS[algo],
                                teacher=teacher if algo in NEEDS_TEACHER else None))
            print(f"   accuracy {r['evals'][0][1]:.3f} -> {r['evals'][-1][1]:.3f} in {r['wall']:.0f} s", flush=True)
            results.setdefault(algo, []).append(r)
    ray.shutdown()

    report = {"teacher_accuracy": teacher_acc, "student_accuracy": student_acc, "steps": args.steps,
              "seeds": args.seeds, "results": results, "load_start": load0, "load_end": os.getloadavg()}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    table = render(report)
    (out / "compare.md").write_text(table)
    print(table)
    plot(report, out / "compare.png")
    print(f"plot: {out / 'compare.png'}")
    return 0


def render(rep: dict) -> str:
    algos = list(rep["results"])
    steps = [s for s, _ in rep["results"][algos[0]][0]["evals"]]
    lines = [f"task teacher held-out accuracy {rep['teacher_accuracy']:.3f}; student (start) {rep['student_accuracy']:.3f}; "
             f"{rep['steps']} steps, seeds {rep['seeds']}; load {rep['load_start'][0]:.1f}→{rep['load_end'][0]:.1f}", "",
             "| algorithm | " + " | ".join(f"acc@{s}" for s in steps) + " | wall s |",
             "|---" * (len(steps) + 2) + "|"]
    for a in algos:
        runs = rep["results"][a]
        cells = []
        for i in range(len(steps)):
            vals = [r["evals"][i][1] for r in runs]
            spread = (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {spread:.3f}")
        wall = statistics.mean(r["wall"] for r in runs)
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {wall:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for a, runs in rep["results"].items():
        steps = [s for s, _ in runs[0]["evals"]]
        acc = [statistics.mean(r["evals"][i][1] for r in runs) for i in range(len(steps))]
        clock = [statistics.mean(r["clock"][i] for r in runs) for i in range(len(steps))]
        ax[0].plot(steps, acc, marker="o", label=a)
        ax[1].plot(clock, acc, marker="o", label=a)
    ax[0].set_xlabel("step")
    ax[1].set_xlabel("training wall time (s)")
    for a_ in ax:
        a_.set_ylabel("held-out greedy accuracy")
        a_.grid(alpha=0.3)
        a_.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
