"""Teacher-guided algorithms against GRPO on equal budgets, evaluated on questions never trained on.

    python bench/compare.py [--steps 150] [--seeds 0 1 2] [--algos grpo opd opd_full rlad kepo]
                            [--settings ups1 ups4] [--out bench/results/compare] [--report bench/reports]

1. Task teacher: SFT the tiny 4-layer model on two-digit addition (a + b, operands 0-99: ~10k
   distinct questions) until it is clearly useful.
2. Weak student: a short SFT warm start of the tiny 2-layer model (same tokenizer).
3. From that student, same seeds and step budget: every algorithm × setting × seed through the
   real pipeline (Ray, vLLM rollout worker, DeepSpeed learner, teacher scorer actor).
4. Evaluation that means something: the train/validation split is disjoint by question text
   (core/data.py ``split``); the curves use the validation questions; the result is greedy
   accuracy of the final student on a separate **test** set (another seed, every question seen in
   training or validation removed), scored once. Paired difference against GRPO at the same
   setting and seed, per test question, with a bootstrap 95 % interval over seeds × questions.

Writes OUT/compare.json ({"pairs": {"tiny": {"runs": [...]}}}, one run per algorithm × setting ×
seed; its last eval point is the test accuracy), and with --report also REPORT/compare.json,
compare.md (table) and compare.png (plot).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 2,
    "operators": ["+"],
    "allow_negation": False,
    "allow_parentheses": False,
}
# reasoning-gym seeds item i with (seed + i): a test seed near the data seed would replay training items.
DATA_SEED, TEST_SEED, VAL_SIZE, TEST_SIZE = 0, 10**6, 200, 300

ALGORITHMS = {
    "grpo": {"type": "grpo"},
    "opd": {"type": "opd", "opd_coef": 1.0, "grpo_coef": 1.0},  # sampled-token estimator
    "opd_full": {"type": "opd", "opd_coef": 1.0, "grpo_coef": 1.0, "estimator": "full"},
    "opd_topk": {"type": "opd", "opd_coef": 1.0, "grpo_coef": 1.0, "estimator": "topk", "top_k": 32},
    "rlad": {"type": "rlad", "alpha": 0.5, "clamp": 1.0},
    "kepo": {
        "type": "kepo",
        "divergence": "reverse_kl",
        "distill_coef": 1.0,
        "hints": True,
        "hint_attempts": 4,
        "hint_replace": 2,
    },
}
NEEDS_TEACHER = {"opd", "opd_full", "opd_topk", "rlad", "kepo"}
SETTINGS = {"ups1": {"learner.updates_per_step": 1}, "ups4": {"learner.updates_per_step": 4}}


def base_spec(
    name: str,
    student: str,
    out: Path,
    *,
    steps: int,
    seed: int,
    algorithm: dict,
    teacher: str | None = None,
    eval_every: int = 50,
    **over,
) -> dict:
    d = {
        "name": name,
        "seed": seed,
        "steps": steps,
        "models": {"student": {"path": student}, **({"teacher": {"path": teacher}} if teacher else {})},
        "data": {
            "source": "reasoning_gym",
            "task": "basic_arithmetic",
            "task_config": TASK,
            "size": 4000,
            "eval_size": VAL_SIZE,
            "seed": DATA_SEED,
        },  # the validation questions are fixed across seeds
        "algorithm": algorithm,
        "rollout": {"samples_per_prompt": 8, "prompts_per_step": 16, "max_new_tokens": 16, "temperature": 1.0},
        "learner": {"ranks": 1, "zero_stage": 2, "lr": 1e-4, "micro_batch": 128},
        "rewards": [{"name": "exact_match"}],
        "checkpoint": {"dir": str(out / name), "interval": steps, "keep": 1},
        "eval": {"interval": eval_every, "size": VAL_SIZE},
    }
    from protege.core.spec import set_dotted

    for k, v in over.items():
        set_dotted(d, k, v)
    return d


def train(spec_dict: dict) -> dict:
    from protege.cluster.driver import run
    from protege.core.spec import parse_spec

    spec = parse_spec(spec_dict)
    t0 = time.perf_counter()
    run(spec, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    return {
        "evals": evals,
        "wall": wall,
        "spec": spec,
        "model": str(spec.run_dir / "checkpoints" / f"step_{spec.steps:06d}" / "model"),
    }


def test_questions(spec) -> list:
    """TEST_SIZE questions from another seed, none of which appears in training or validation."""
    from protege.cluster.jobdata import load_job_data
    from protege.core.data import load_reasoning_gym

    train_set, val_set = load_job_data(spec)
    seen = {e.prompt for e in train_set} | {e.prompt for e in val_set}
    pool, out = load_reasoning_gym("basic_arithmetic", size=TEST_SIZE * 3, seed=TEST_SEED, config=TASK), []
    for e in pool:
        if e.prompt not in seen and e.prompt not in {x.prompt for x in out}:
            out.append(e)
    return out[:TEST_SIZE]


def test_accuracy(model: str, spec, questions) -> list[float]:
    """Greedy correctness (exact_match) of ``model`` on each test question."""
    from transformers import AutoTokenizer

    from protege.actors.engine import make_engine
    from protege.cluster.jobdata import Encoder
    from protege.rewards.rules import exact_match

    tok = AutoTokenizer.from_pretrained(model)
    enc = Encoder(tok, system_prompt=spec.data.system_prompt, max_prompt_tokens=spec.rollout.max_prompt_tokens)
    engine = make_engine("hf", model)
    groups = engine.generate(
        [enc.prompt(q.prompt) for q in questions],
        n=1,
        temperature=0.0,
        top_p=1.0,
        max_tokens=spec.rollout.max_new_tokens,
    )
    return [exact_match(g[0].text, q.answer) for g, q in zip(groups, questions)]


def paired_bootstrap(diffs: list[list[float]], *, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % interval of a paired difference; ``diffs[s][q]`` per seed × question.
    Resamples seeds, then questions within each, so both sources of spread count."""
    rnd = random.Random(seed)
    mean = statistics.mean(x for row in diffs for x in row)
    stats = []
    for _ in range(n):
        rows = [diffs[rnd.randrange(len(diffs))] for _ in diffs]
        stats.append(statistics.mean(row[rnd.randrange(len(row))] for row in rows for _ in row))
    stats.sort()
    return mean, stats[int(0.025 * n)], stats[int(0.975 * n) - 1]


def summarise(runs: list[dict]) -> list[dict]:
    """Per algorithm × setting: mean test accuracy and the paired difference against GRPO."""
    by = {}
    for r in runs:
        by.setdefault((r["algorithm"], r["setting"]), []).append(r)
    rows = []
    for (algo, setting), rs in sorted(by.items()):
        base = {r["seed"]: r for r in by.get(("grpo", setting), [])}
        diffs = [
            [a - b for a, b in zip(r["test_correct"], base[r["seed"]]["test_correct"])]
            for r in rs
            if r["seed"] in base and r.get("test_correct") and base[r["seed"]].get("test_correct")
        ]
        row = {
            "algorithm": algo,
            "setting": setting,
            "seeds": len(rs),
            "test_accuracy": statistics.mean(r["eval"][-1][1] for r in rs),
            "test_accuracies": [r["eval"][-1][1] for r in rs],
            "wall_s": statistics.mean(r["wall_s"] for r in rs),
        }
        if diffs and algo != "grpo":
            row["vs_grpo"], row["ci_low"], row["ci_high"] = paired_bootstrap(diffs)
        rows.append(row)
    return rows


def render(rep: dict) -> str:
    pair = rep["pairs"]["tiny"]
    lines = [
        f"Tiny pair, two-digit addition. Task teacher test accuracy {pair['teacher_test_accuracy']:.3f}; student "
        f"at start {pair['student_test_accuracy']:.3f}. {pair['steps']} steps; test = {TEST_SIZE} questions never "
        f"trained or validated on; load {pair['load_start'][0]:.1f} → {pair['load_end'][0]:.1f}.",
        "",
        "| algorithm | setting | seeds | test accuracy (per seed) | vs GRPO (paired, 95 % CI) | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for row in pair["summary"]:
        ci = f"{row['vs_grpo']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" if "vs_grpo" in row else "—"
        per = ", ".join(f"{x:.3f}" for x in row["test_accuracies"])
        lines.append(
            f"| {row['algorithm']} | {row['setting']} | {row['seeds']} | {row['test_accuracy']:.3f} ({per}) "
            f"| {ci} | {row['wall_s']:.0f} |"
        )
    failed = [r for r in pair["runs"] if r.get("error")]
    if failed:
        lines += [
            "",
            "Runs that failed: "
            + "; ".join(f"{r['algorithm']}/{r['setting']}/s{r['seed']}: {r['error']}" for r in failed),
        ]
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rep["pairs"]["tiny"]["runs"] if r["val_curve"]]
    settings = sorted({r["setting"] for r in runs})
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        by = {}
        for r in runs:
            if r["setting"] == setting:
                by.setdefault(r["algorithm"], []).append(r)
        for algo, rs in by.items():
            steps = [s for s, _ in rs[0]["val_curve"]]
            acc = [
                statistics.mean(r["val_curve"][i][1] for r in rs if i < len(r["val_curve"])) for i in range(len(steps))
            ]
            ax.plot(steps, acc, marker="o", label=f"{algo} (test {statistics.mean(r['eval'][-1][1] for r in rs):.2f})")
        ax.set_title(f"{setting}: validation accuracy (mean over seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("greedy accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="RL steps per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algos", nargs="+", default=["grpo", "opd", "opd_full", "rlad", "kepo"], choices=list(ALGORITHMS))
    ap.add_argument("--settings", nargs="+", default=["ups4"], choices=list(SETTINGS))
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--student-steps", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compare"))
    ap.add_argument("--report", default=None, help="also write compare.json/md/png here (bench/reports)")
    args = ap.parse_args()
    for k, v in {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
    }.items():
        os.environ.setdefault(k, v)
    import ray

    from protege.core.models import ensure_demo_models

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    tiny = ensure_demo_models(ROOT / "models")
    load0 = os.getloadavg()
    sft = {"learner.lr": 3e-3, "rollout.prompts_per_step": 64, "learner.micro_batch": 64}

    print("1. task teacher: SFT of the 4-layer tiny model", flush=True)
    t = train(
        base_spec(
            "teacher-sft",
            str(tiny["teacher"]),
            out,
            steps=args.teacher_steps,
            seed=0,
            algorithm={"type": "sft"},
            eval_every=args.teacher_steps,
            **sft,
        )
    )
    questions = test_questions(t["spec"])
    teacher_acc = statistics.mean(test_accuracy(t["model"], t["spec"], questions))
    print(f"   teacher: validation {t['evals'][-1][1]:.3f}, test {teacher_acc:.3f}", flush=True)
    print("2. weak student: short SFT warm start of the 2-layer tiny model", flush=True)
    s = train(
        base_spec(
            "student-sft",
            str(tiny["student"]),
            out,
            steps=args.student_steps,
            seed=0,
            algorithm={"type": "sft"},
            eval_every=args.student_steps,
            **sft,
        )
    )
    student, student_acc = s["model"], statistics.mean(test_accuracy(s["model"], s["spec"], questions))
    print(f"   student: validation {s['evals'][-1][1]:.3f}, test {student_acc:.3f}", flush=True)

    runs = []
    for setting in args.settings:
        for seed in args.seeds:
            for algo in args.algos:
                name = f"{algo}-{setting}-s{seed}"
                print(f"3. {name}", flush=True)
                run = {"algorithm": algo, "setting": setting, "seed": seed, "eval": [], "val_curve": [], "wall_s": 0.0}
                try:
                    r = train(
                        base_spec(
                            name,
                            student,
                            out,
                            steps=args.steps,
                            seed=seed,
                            algorithm=ALGORITHMS[algo],
                            teacher=t["model"] if algo in NEEDS_TEACHER else None,
                            **SETTINGS[setting],
                        )
                    )
                    correct = test_accuracy(r["model"], r["spec"], questions)
                    run.update(
                        val_curve=r["evals"],
                        wall_s=r["wall"],
                        test_correct=correct,
                        eval=[*r["evals"][:-1], [args.steps, statistics.mean(correct)]],
                    )
                    print(
                        f"   validation {r['evals'][0][1]:.3f} -> {r['evals'][-1][1]:.3f}, "
                        f"test {statistics.mean(correct):.3f} in {r['wall']:.0f} s",
                        flush=True,
                    )
                except Exception as e:  # one broken run must not lose the others
                    run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"   FAILED: {run['error']}", flush=True)
                runs.append(run)
                _write(out, args, runs, teacher_acc, student_acc, load0, final=False)
    ray.shutdown()
    rep = _write(out, args, runs, teacher_acc, student_acc, load0, final=True)
    print(render(rep))
    return 0


def _write(out: Path, args, runs, teacher_acc, student_acc, load0, *, final: bool) -> dict:
    done = [r for r in runs if not r.get("error")]
    rep = {
        "pairs": {
            "tiny": {
                "runs": runs,
                "summary": summarise(done) if done else [],
                "steps": args.steps,
                "seeds": args.seeds,
                "teacher_test_accuracy": teacher_acc,
                "student_test_accuracy": student_acc,
                "task": TASK,
                "test_questions": TEST_SIZE,
                "validation_questions": VAL_SIZE,
                "load_start": load0,
                "load_end": os.getloadavg(),
                "complete": final,
            }
        }
    }
    for folder in [out] + ([Path(args.report)] if args.report else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "compare.json").write_text(json.dumps(rep, indent=1))
        if done:
            (folder / "compare.md").write_text(render(rep))
            plot(rep, folder / "compare.png")
    return rep


if __name__ == "__main__":
    sys.exit(main())
