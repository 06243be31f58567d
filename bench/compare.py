"""Teacher-guided algorithms against GRPO on equal budgets, evaluated on questions never trained on.

    python bench/compare.py [--steps 150] [--seeds 0 1 2] [--algos grpo opd opd_full rlad kepo]
                            [--settings ups1 ups4] [--out bench/results/compare] [--report bench/reports]

1. Task teacher: SFT the tiny 4-layer model on two-digit addition (a + b, operands 0-99: ~10k
   distinct questions) until it is competent on the test questions (it generalises from about
   step 800: 0.06 at step 500, 0.75 at 1000 in a bare-torch probe).
2. Weak student: an SFT warm start of the tiny 2-layer model (same tokenizer), checkpointed every
   25 steps; the student is the first checkpoint whose validation accuracy reaches 0.2 (the
   issue's 0.2-0.4 band: an untrained student scores 0 and RL gets no signal).
   Both are cached in OUT (teacher.json, student.json) and reused by later invocations.
3. From that student, same seeds and step budget: every algorithm × setting × seed through the
   real pipeline (Ray, vLLM rollout worker, DeepSpeed learner, teacher scorer actor).
4. Evaluation that means something: the train/validation split is disjoint by question text
   (core/data.py ``split``); the curves use the validation questions; the result is greedy
   accuracy of the final student on a separate **test** set (another seed, every question seen in
   training or validation removed), scored once. Paired difference against GRPO at the same
   setting and seed, per test question, with a bootstrap 95 % interval over seeds × questions.

``--resume`` keeps the finished runs of OUT/compare.json and runs only the missing ones, so the
cells can be run in several invocations (e.g. ``--settings ups4`` then ``--settings ups1``).

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
RL_LR = 3e-4  # every algorithm, every setting
WARM_BAND = (0.2, 0.4)  # the weak student's validation accuracy at the start of RL

ALGORITHMS = {
    "grpo": {"type": "grpo"},
    "opd": {"type": "opd", "opd_coef": 1.0, "grpo_coef": 1.0},  # sampled-token estimator
    "opd_full": {"type": "opd", "opd_coef": 1.0, "grpo_coef": 1.0, "estimator": "full"},
    "opd_topk": {"type": "opd", "opd_coef": 1.0, "grpo_coef": 1.0, "estimator": "topk", "top_k": 32},
    "rlad": {"type": "rlad", "alpha": 0.5, "clamp": 1.0},
    "distill": {"type": "distill", "top_k": 32, "divergence": "reverse_kl"},  # offline, on the data's answers
    "kepo": {
        "type": "kepo",
        "divergence": "reverse_kl",
        "distill_coef": 1.0,
        "hints": True,
        "hint_attempts": 4,
        "hint_replace": 2,
    },
}
NEEDS_TEACHER = {"opd", "opd_full", "opd_topk", "rlad", "kepo", "distill"}
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
            "size": 8000,
            "eval_size": VAL_SIZE,
            "seed": DATA_SEED,
        },  # the same rows and validation questions for the teacher, the student and every run
        "algorithm": algorithm,
        "rollout": {"samples_per_prompt": 8, "prompts_per_step": 16, "max_new_tokens": 16, "temperature": 1.0},
        "learner": {"ranks": 1, "zero_stage": 2, "lr": RL_LR, "micro_batch": 128},
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
        f"Tiny pair, two-digit addition (a + b, operands 0-99). Task teacher (4 layers, SFT) test accuracy "
        f"{pair['teacher_test_accuracy']:.3f}; student (2 layers, SFT warm start) at start "
        f"{pair['student_test_accuracy']:.3f}. {pair['steps']} RL steps of 16 prompts × 8 samples at lr {RL_LR:g} "
        f"for every algorithm; ups1 / ups4 = 1 / 4 updates per rollout batch. Test = {pair['test_questions']} questions never "
        f"trained or validated on, greedy, scored once; vs GRPO = paired difference at the same setting and seed, "
        f"bootstrap 95 % interval over seeds × questions. Load {pair['load_start'][0]:.1f} → "
        f"{pair['load_end'][0]:.1f} (wall seconds are loaded figures)."
        + (f" {pair['conditions']}" if pair.get("conditions") else ""),
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


def prepare_teacher(out: Path, model: Path, steps: int, sft: dict):
    """The task teacher (cached in OUT/teacher.json) and the test questions."""
    meta = out / "teacher.json"
    if meta.exists():
        t = json.loads(meta.read_text())
        from protege.core.spec import parse_spec

        spec = parse_spec(_sft_spec(out, "teacher-sft", model, steps, steps, sft))
        questions = test_questions(spec)
        print(f"1. task teacher (cached): test {t['test_accuracy']:.3f}", flush=True)
        return t["model"], t["test_accuracy"], questions, spec
    print("1. task teacher: SFT of the 4-layer tiny model", flush=True)
    t = train(_sft_spec(out, "teacher-sft", model, steps, steps, sft))
    questions = test_questions(t["spec"])
    acc = statistics.mean(test_accuracy(t["model"], t["spec"], questions))
    print(f"   teacher: validation {t['evals'][-1][1]:.3f}, test {acc:.3f} ({t['wall']:.0f} s)", flush=True)
    meta.write_text(json.dumps({"model": t["model"], "test_accuracy": acc, "validation": t["evals"], "steps": steps}))
    return t["model"], acc, questions, t["spec"]


def prepare_student(out: Path, model: Path, steps: int, sft: dict, questions) -> tuple[str, float]:
    """The weak student (cached in OUT/student.json): SFT checkpointed and evaluated every 25 steps,
    stopped at the first validation accuracy ≥ WARM_BAND[0]; that checkpoint starts every run."""
    meta = out / "student.json"
    if meta.exists():
        s = json.loads(meta.read_text())
        print(f"2. weak student (cached): step {s['step']}, test {s['test_accuracy']:.3f}", flush=True)
        return s["model"], s["test_accuracy"]
    print("2. weak student: SFT warm start of the 2-layer tiny model", flush=True)
    spec = _sft_spec(
        out, "student-sft", model, steps, 25, sft, **{"checkpoint.interval": 25, "checkpoint.keep": steps // 25 + 1}
    )
    r = train(spec)
    step, val = next(((st, a) for st, a in r["evals"] if a >= WARM_BAND[0] and st > 0), r["evals"][-1])
    ckpt = str(r["spec"].run_dir / "checkpoints" / f"step_{step:06d}" / "model")
    acc = statistics.mean(test_accuracy(ckpt, r["spec"], questions))
    print(f"   student: step {step}, validation {val:.3f}, test {acc:.3f}", flush=True)
    meta.write_text(json.dumps({"model": ckpt, "step": step, "validation": val, "test_accuracy": acc}))
    return ckpt, acc


def _sft_spec(out: Path, name: str, model: Path, steps: int, every: int, sft: dict, **over) -> dict:
    return base_spec(
        name, str(model), out, steps=steps, seed=0, algorithm={"type": "sft"}, eval_every=every, **sft, **over
    )


def _previous_runs(out: Path) -> list[dict]:
    path = out / "compare.json"
    if not path.exists():
        return []
    runs = json.loads(path.read_text())["pairs"]["tiny"]["runs"]
    return [r for r in runs if not r.get("error")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="RL steps per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algos", nargs="+", default=["grpo", "opd", "opd_full", "rlad", "kepo"], choices=list(ALGORITHMS))
    ap.add_argument("--settings", nargs="+", default=["ups4"], choices=list(SETTINGS))
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--student-steps", type=int, default=600, help="most SFT steps of the warm start")
    ap.add_argument("--eval-every", type=int, default=20, help="validation interval of the RL runs")
    ap.add_argument("--conditions", default=None, help="what else ran on the machine (written into the report)")
    ap.add_argument("--resume", action="store_true", help="keep OUT/compare.json's finished runs")
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

    out = Path(args.out).resolve()  # model paths are stored in OUT/*.json and read from other folders
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    tiny = ensure_demo_models(ROOT / "models")
    load0 = os.getloadavg()
    if args.resume and (out / "compare.json").exists():  # the load when the first of the runs started
        load0 = json.loads((out / "compare.json").read_text())["pairs"]["tiny"].get("load_start", load0)
    sft = {"learner.lr": 3e-3, "rollout.prompts_per_step": 64, "learner.micro_batch": 64}

    teacher, teacher_acc, questions, _ = prepare_teacher(out, tiny["teacher"], args.teacher_steps, sft)
    student, student_acc = prepare_student(out, tiny["student"], args.student_steps, sft, questions)
    args.test_questions = len(questions)  # up to TEST_SIZE: the unseen ones among the pool drawn

    runs = _previous_runs(out) if args.resume else []
    done = {(r["algorithm"], r["setting"], r["seed"]) for r in runs}
    for setting in args.settings:
        for seed in args.seeds:
            for algo in args.algos:
                if (algo, setting, seed) in done:
                    continue
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
                            teacher=teacher if algo in NEEDS_TEACHER else None,
                            eval_every=args.eval_every,
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
                "test_questions": args.test_questions,
                "validation_questions": VAL_SIZE,
                "load_start": load0,
                "load_end": os.getloadavg(),
                "conditions": args.conditions,
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
