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
from dataclasses import dataclass
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
DATA_SEED, TEST_SEED = 0, 10**6
WARM_BAND = (0.2, 0.4)  # the weak student's validation accuracy at the start of RL


@dataclass(frozen=True)
class Pair:
    """One teacher/student pair and its budget. ``rl`` and the SFT dicts are dotted spec overrides;
    the RL lr is a tenth of the teacher's SFT lr on both pairs (fixed before any run, not tuned)."""

    label: str
    teacher_model: str  # "tiny-teacher" / "tiny-student": the offline demo models; else a folder
    student_model: str
    teacher_sft: dict
    student_sft: dict
    rl: dict
    teacher_steps: int
    student_steps: int
    steps: int  # RL steps per run
    val_size: int
    test_size: int
    hint_teacher: bool = False  # SFT the teacher to write KEPO hints as well as answers
    warm_every: int = 25  # the warm start's checkpoint and validation interval


PAIRS = {
    "tiny": Pair(
        label="Tiny pair: task teacher 4 layers, student 2 layers (SFT warm start), same tokenizer",
        teacher_model="tiny-teacher",
        student_model="tiny-student",
        teacher_sft={"learner.lr": 3e-3, "rollout.prompts_per_step": 64, "learner.micro_batch": 64},
        student_sft={"learner.lr": 3e-3, "rollout.prompts_per_step": 64, "learner.micro_batch": 64},
        rl={"learner.lr": 3e-4, "rollout.prompts_per_step": 16, "learner.micro_batch": 128},
        teacher_steps=2000,
        student_steps=600,
        steps=60,
        val_size=200,
        test_size=300,
    ),
    # Real weights. SmolLM2-135M-Instruct is at 0.58 after 15 SFT steps (the answer format) on
    # this task. Its layer prunes were meant as the student, but they are not viable here: before
    # SFT the 10-, 15- and 18-layer prunes write gibberish, and after 75-100 SFT steps (16-32
    # prompts a step, lr 1e-4 or 3e-4) each had learnt the answer format and was still at 0.00-0.02
    # on validation. So the student is the same model, SFT-warmed only until validation reaches
    # WARM_BAND (every 5 steps), and the teacher the same model SFT'd 120 steps on answers and
    # hints. A 30-layer RL step is about ten seconds on 2 cores: 4 prompts × 8, short runs.
    "smollm2": Pair(
        label="SmolLM2 pair: SmolLM2-135M-Instruct SFT'd 120 steps (teacher) and SFT-warmed into the band (student)",
        teacher_model="models/smollm2",
        student_model="models/smollm2",
        teacher_sft={"learner.lr": 3e-5, "rollout.prompts_per_step": 16, "learner.micro_batch": 16},
        student_sft={"learner.lr": 1e-5, "rollout.prompts_per_step": 16, "learner.micro_batch": 16},
        rl={
            "learner.lr": 3e-6,
            "rollout.prompts_per_step": 4,
            "learner.micro_batch": 32,
            "learner.autocast": "bfloat16",
        },
        teacher_steps=120,
        student_steps=40,
        warm_every=5,
        steps=30,
        val_size=100,
        test_size=200,
        hint_teacher=True,
    ),
}

ALGORITHMS = {
    "grpo": {"type": "grpo"},
    "opd": {"type": "opd", "opd_coef": 1.0, "grpo_coef": 1.0},  # sampled-token estimator
    "opd_full": {"type": "opd", "opd_coef": 1.0, "grpo_coef": 1.0, "estimator": "full"},
    "opd_topk": {"type": "opd", "opd_coef": 1.0, "grpo_coef": 1.0, "estimator": "topk", "top_k": 32},
    "rlad": {"type": "rlad", "alpha": 0.5, "clamp": 1.0},
    "rlad_gate": {"type": "rlad", "alpha": 0.5, "clamp": 1.0, "trust_region": "gate"},  # our variant
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
NEEDS_TEACHER = {"opd", "opd_full", "opd_topk", "rlad", "rlad_gate", "kepo", "distill"}
SETTINGS = {"ups1": {"learner.updates_per_step": 1}, "ups4": {"learner.updates_per_step": 4}}
KEPO_METRICS = ("kepo/hints_requested", "kepo/hints_valid", "kepo/hint_samples_accepted", "kepo/injected")


def base_spec(
    pair: Pair,
    name: str,
    student: str,
    out: Path,
    *,
    steps: int,
    seed: int,
    algorithm: dict,
    teacher: str | None = None,
    eval_every: int = 50,
    over: dict | None = None,
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
            "eval_size": pair.val_size,
            "seed": DATA_SEED,
        },  # the same rows and validation questions for the teacher, the student and every run
        "algorithm": algorithm,
        "rollout": {"samples_per_prompt": 8, "prompts_per_step": 16, "max_new_tokens": 16, "temperature": 1.0},
        "learner": {"ranks": 1, "zero_stage": 2, "lr": 3e-4, "micro_batch": 128},
        "rewards": [{"name": "exact_match"}],
        "checkpoint": {"dir": str(out / name), "interval": steps, "keep": 1},
        "eval": {"interval": eval_every, "size": pair.val_size},
    }
    from protege.core.spec import set_dotted

    for k, v in {**pair.rl, **(over or {})}.items():
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
    kepo = {k: sum(r.get(k, 0.0) for r in rows) for k in KEPO_METRICS if any(k in r for r in rows)}
    return {
        "evals": evals,
        "wall": wall,
        "spec": spec,
        "kepo": kepo,
        "model": str(spec.run_dir / "checkpoints" / f"step_{spec.steps:06d}" / "model"),
    }


def test_questions(spec, size: int) -> list:
    """``size`` questions from another seed, none of which appears in training or validation."""
    from protege.cluster.jobdata import load_job_data
    from protege.core.data import load_reasoning_gym

    train_set, val_set = load_job_data(spec)
    seen = {e.prompt for e in train_set} | {e.prompt for e in val_set}
    pool, out = load_reasoning_gym("basic_arithmetic", size=size * 3, seed=TEST_SEED, config=TASK), []
    for e in pool:
        if e.prompt not in seen and e.prompt not in {x.prompt for x in out}:
            out.append(e)
    return out[:size]


def _greedy(model: str, spec, prompts: list[list[int]], max_tokens: int) -> list[str]:
    from protege.actors.engine import make_engine

    engine = make_engine("hf", model)
    groups = engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    return [g[0].text for g in groups]


def test_accuracy(model: str, spec, questions) -> list[float]:
    """Greedy correctness (exact_match) of ``model`` on each test question."""
    from transformers import AutoTokenizer

    from protege.cluster.jobdata import Encoder
    from protege.rewards.rules import exact_match

    enc = Encoder.for_spec(AutoTokenizer.from_pretrained(model), spec)
    texts = _greedy(model, spec, [enc.prompt(q.prompt) for q in questions], spec.rollout.max_new_tokens)
    return [exact_match(t, q.answer) for t, q in zip(texts, questions)]


# ---- the hint-writing teacher (KEPO) ------------------------------------------------------------


def digit_hint(answer: str) -> str:
    """The hint the teacher is taught to write: the answer's last digit, never the answer itself.

    >>> digit_hint("57")
    '<hint>The last digit of the answer is 7.</hint>'
    """
    return f"<hint>The last digit of the answer is {answer.strip()[-1]}.</hint>"


def teacher_rows(examples) -> list[dict]:
    """SFT rows for a teacher that answers and writes hints: per question one answer row (the
    student's prompt, rendered in full) and one hint row (core/hints.py's request), so one
    ``data.prompt_template: "{question}"`` serves both kinds."""
    from protege.core.data import DEFAULT_TEMPLATE
    from protege.core.hints import hint_request

    rows = []
    for e in examples:
        rows.append(
            {
                "prompt": DEFAULT_TEMPLATE.replace("{question}", e.prompt),
                "answer": e.answer,
                "response": f"<answer>{e.answer}</answer>",
            }
        )
        rows.append({"prompt": hint_request(e.prompt, e.answer), "answer": e.answer, "response": digit_hint(e.answer)})
    return rows


def hint_rate(model: str, spec, questions) -> float:
    """Share of test questions on which the teacher's greedy hint has its tags and the right digit."""
    from transformers import AutoTokenizer

    from protege.cluster.jobdata import Encoder
    from protege.core.hints import extract_hint, hint_request

    enc = Encoder.for_spec(AutoTokenizer.from_pretrained(model), spec)
    asks = [enc.prompt(hint_request(q.prompt, q.answer), raw=True) for q in questions]
    texts = _greedy(model, spec, asks, 32)
    return statistics.mean(float(extract_hint(t) == digit_hint(q.answer)[6:-7]) for t, q in zip(texts, questions))


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
    lines = []
    for key, pair in rep["pairs"].items():
        lines += [f"## {key}", "", _caption(pair), ""] + _table(pair) + [""]
    return "\n".join(lines)


def _caption(pair: dict) -> str:
    hint = (
        f" The teacher also writes KEPO hints (the answer's last digit): right on {pair['teacher_hint_rate']:.2f} "
        f"of the test questions."
        if pair.get("teacher_hint_rate") is not None
        else ""
    )
    return (
        f"{pair.get('label', 'Tiny pair')}. Two-digit addition (a + b, operands 0-99). Teacher test accuracy "
        f"{pair['teacher_test_accuracy']:.3f}; student at start {pair['student_test_accuracy']:.3f}.{hint} "
        f"{pair['steps']} RL steps of {pair.get('prompts_per_step', 16)} prompts × 8 samples at lr "
        f"{pair.get('rl_lr', 3e-4):g} for every algorithm; ups1 / ups4 = 1 / 4 updates per rollout batch. "
        f"Test = {pair['test_questions']} questions never trained or validated on, greedy, scored once; vs GRPO "
        f"= paired difference at the same setting and seed, bootstrap 95 % interval over seeds × questions. "
        f"Load {pair['load_start'][0]:.1f} → {pair['load_end'][0]:.1f} (wall seconds are loaded figures)."
        + (f" {pair['conditions']}" if pair.get("conditions") else "")
    )


def _table(pair: dict) -> list[str]:
    lines = [
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
    kepo = [r for r in pair["runs"] if r.get("kepo")]
    if kepo:
        lines += ["", "KEPO's hint path, summed over each run's steps:"]
        lines += [
            f"- {r['setting']}/s{r['seed']}: " + ", ".join(f"{k.split('/')[1]} {v:.0f}" for k, v in r["kepo"].items())
            for r in kepo
        ]
    failed = [r for r in pair["runs"] if r.get("error")]
    if failed:
        lines += [
            "",
            "Runs that failed: "
            + "; ".join(f"{r['algorithm']}/{r['setting']}/s{r['seed']}: {r['error']}" for r in failed),
        ]
    return lines


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (key, setting, [r for r in pair["runs"] if r["val_curve"] and r["setting"] == setting])
        for key, pair in rep["pairs"].items()
        for setting in sorted({r["setting"] for r in pair["runs"] if r["val_curve"]})
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, setting, runs) in zip(axes[0], panels):
        by = {}
        for r in runs:
            by.setdefault(r["algorithm"], []).append(r)
        for algo, rs in by.items():
            steps = [s for s, _ in rs[0]["val_curve"]]
            acc = [
                statistics.mean(r["val_curve"][i][1] for r in rs if i < len(r["val_curve"])) for i in range(len(steps))
            ]
            ax.plot(steps, acc, marker="o", label=f"{algo} (test {statistics.mean(r['eval'][-1][1] for r in rs):.2f})")
        ax.set_title(f"{key}, {setting}: validation accuracy (mean over seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("greedy accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _model(name: str, tiny: dict) -> Path:
    return tiny[name.split("-")[1]] if name.startswith("tiny-") else (ROOT / name).resolve()


def prepare_teacher(pair: Pair, out: Path, model: Path, rl_spec, questions):
    """The task teacher, cached in OUT/teacher.json: SFT on the pair's training questions (only
    those: the test and validation questions stay unseen), on answers and, for a hint teacher,
    on hint requests too."""
    meta = out / "teacher.json"
    if meta.exists():
        t = json.loads(meta.read_text())
        print(f"2. task teacher (cached): test {t['test_accuracy']:.3f}", flush=True)
        return t
    print(f"2. task teacher: SFT of {model.name}", flush=True)
    from protege.cluster.jobdata import load_job_data

    over = {"eval.interval": pair.teacher_steps}
    if pair.hint_teacher:
        train_set, _ = load_job_data(rl_spec)
        rows = out / "teacher_rows.jsonl"
        rows.write_text("".join(json.dumps(r) + "\n" for r in teacher_rows(train_set)))
        over.update(
            {
                "eval.size": 50,
                "data": {
                    "source": "file",
                    "path": str(rows),
                    "response_field": "response",
                    "prompt_template": "{question}",
                    "eval_size": 50,
                    "seed": DATA_SEED,
                },
            }
        )
    t = train(_sft_spec(pair, out, "teacher-sft", model, pair.teacher_steps, pair.teacher_sft, over))
    acc = statistics.mean(test_accuracy(t["model"], rl_spec, questions))
    res = {"model": t["model"], "test_accuracy": acc, "steps": pair.teacher_steps, "wall_s": t["wall"]}
    if pair.hint_teacher:
        res["hint_rate"] = hint_rate(t["model"], rl_spec, questions)
    print(f"   teacher: test {acc:.3f}, hints {res.get('hint_rate')} ({t['wall']:.0f} s)", flush=True)
    meta.write_text(json.dumps(res))
    return res


def prepare_student(pair: Pair, out: Path, model: Path, questions) -> dict:
    """The weak student (cached in OUT/student.json): SFT checkpointed and evaluated every warm_every steps,
    stopped at the first validation accuracy ≥ WARM_BAND[0]; that checkpoint starts every run."""
    meta = out / "student.json"
    if meta.exists():
        s = json.loads(meta.read_text())
        print(f"1. weak student (cached): step {s['step']}, test {s['test_accuracy']:.3f}", flush=True)
        return s
    print(f"1. weak student: SFT warm start of {model.name}", flush=True)
    n = pair.student_steps
    k = pair.warm_every
    over = {"checkpoint.interval": k, "checkpoint.keep": n // k + 1, "eval.interval": k}
    r = train(_sft_spec(pair, out, "student-sft", model, n, pair.student_sft, over))
    step, val = next(((st, a) for st, a in r["evals"] if a >= WARM_BAND[0] and st > 0), r["evals"][-1])
    ckpt = str(r["spec"].run_dir / "checkpoints" / f"step_{step:06d}" / "model")
    acc = statistics.mean(test_accuracy(ckpt, r["spec"], questions))
    print(f"   student: step {step}, validation {val:.3f}, test {acc:.3f}", flush=True)
    s = {"model": ckpt, "step": step, "validation": val, "test_accuracy": acc, "curve": r["evals"]}
    meta.write_text(json.dumps(s))
    return s


def _sft_spec(pair: Pair, out: Path, name: str, model: Path, steps: int, sft: dict, over: dict) -> dict:
    """An SFT run of the pair; ``over`` holds dotted overrides, and ``data`` replaces the task."""
    from protege.core.spec import set_dotted

    d = base_spec(pair, name, str(model), out, steps=steps, seed=0, algorithm={"type": "sft"}, over=sft)
    d["rollout"]["samples_per_prompt"] = 1
    for k, v in over.items():
        if k == "data":
            d["data"] = v
        else:
            set_dotted(d, k, v)
    return d


def _previous_runs(out: Path, key: str) -> list[dict]:
    path = out / "compare.json"
    if not path.exists():
        return []
    runs = json.loads(path.read_text())["pairs"].get(key, {}).get("runs", [])
    return [r for r in runs if not r.get("error")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="tiny", choices=list(PAIRS))
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the pair's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algos", nargs="+", default=["grpo", "opd", "opd_full", "rlad", "kepo"], choices=list(ALGORITHMS))
    ap.add_argument("--settings", nargs="+", default=["ups4"], choices=list(SETTINGS))
    ap.add_argument("--eval-every", type=int, default=20, help="validation interval of the RL runs")
    ap.add_argument("--conditions", default=None, help="what else ran on the machine (written into the report)")
    ap.add_argument("--resume", action="store_true", help="keep OUT/compare.json's finished runs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compare"))
    ap.add_argument("--report", default=None, help="also write compare.json/md/png here (bench/reports)")
    args = ap.parse_args()
    pair = PAIRS[args.pair]
    args.steps = args.steps or pair.steps
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
    from protege.core.spec import parse_spec

    root = Path(args.out).resolve()  # model paths are stored in OUT/*.json and read from other folders
    out = root / args.pair
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    tiny = ensure_demo_models(ROOT / "models")
    load0 = list(os.getloadavg())
    if args.resume and (root / "compare.json").exists():  # the load when the first of the runs started
        load0 = json.loads((root / "compare.json").read_text())["pairs"].get(args.pair, {}).get("load_start", load0)

    student_model = _model(pair.student_model, tiny)
    rl_spec = parse_spec(base_spec(pair, "probe", str(student_model), out, steps=1, seed=0, algorithm={"type": "grpo"}))
    questions = test_questions(rl_spec, pair.test_size)
    student = prepare_student(pair, out, student_model, questions)  # first: the likelier one to miss its band
    teacher = prepare_teacher(pair, out, _model(pair.teacher_model, tiny), rl_spec, questions)
    info = {
        "label": pair.label,
        "steps": args.steps,
        "seeds": args.seeds,
        "teacher_test_accuracy": teacher["test_accuracy"],
        "teacher_hint_rate": teacher.get("hint_rate"),
        "student_test_accuracy": student["test_accuracy"],
        "student_sft_step": student["step"],
        "prompts_per_step": rl_spec.rollout.prompts_per_step,
        "rl_lr": rl_spec.learner.lr,
        "task": TASK,
        "test_questions": len(questions),  # up to the pair's test_size: the unseen ones among the pool drawn
        "validation_questions": pair.val_size,
        "load_start": load0,
        "conditions": args.conditions,
    }

    runs = _previous_runs(root, args.pair) if args.resume else []
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
                            pair,
                            name,
                            student["model"],
                            out,
                            steps=args.steps,
                            seed=seed,
                            algorithm=ALGORITHMS[algo],
                            teacher=teacher["model"] if algo in NEEDS_TEACHER else None,
                            eval_every=args.eval_every,
                            over=SETTINGS[setting],
                        )
                    )
                    correct = test_accuracy(r["model"], r["spec"], questions)
                    run.update(
                        val_curve=r["evals"],
                        wall_s=r["wall"],
                        test_correct=correct,
                        eval=[*r["evals"][:-1], [args.steps, statistics.mean(correct)]],
                        **({"kepo": r["kepo"]} if r["kepo"] else {}),
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
                _write(root, args, info, runs, final=False)
    ray.shutdown()
    rep = _write(root, args, info, runs, final=True)
    print(render(rep))
    return 0


def _write(root: Path, args, info: dict, runs: list[dict], *, final: bool) -> dict:
    """Write this pair into compare.json beside the pairs already there (each pair is its own run)."""
    done = [r for r in runs if not r.get("error")]
    entry = {"runs": runs, "summary": summarise(done) if done else [], **info}
    entry.update(load_end=list(os.getloadavg()), complete=final, seeds=sorted({r["seed"] for r in runs}))
    rep = None
    for folder in [root] + ([Path(args.report)] if args.report else []):
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "compare.json"
        rep = json.loads(path.read_text()) if path.exists() else {"pairs": {}}
        rep["pairs"][args.pair] = entry
        path.write_text(json.dumps(rep, indent=1))
        if done:
            (folder / "compare.md").write_text(render(rep))
            plot(rep, folder / "compare.png")
    return rep


if __name__ == "__main__":
    sys.exit(main())
