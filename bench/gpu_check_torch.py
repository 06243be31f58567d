"""GPU check, part 1: the learner's GPU path on a bare Python + torch machine.

Needs only torch, transformers, tokenizers and safetensors (what a stock PyTorch GPU image has)
plus DeepSpeed, pydantic and hjson, which ``bench/gpu_wheels.sh`` downloads as wheels to carry
(under 64 MiB). No vLLM, no Ray, no network. Checks, each recorded with its numbers:

1. ``train_steps``: the real ``Learner`` (DeepSpeed, in-process, world size 1) runs GRPO, OPD
   (sampled and top-k), RLAD and KEPO-top-k train steps on rows that carry rollout, teacher and top-k log-probs, for
   ZeRO-0 and ZeRO-2 in fp32 and bf16: every tensor must be on the device (the first GPU step of
   every GRPO job used to fail on rollout_logprobs left on the CPU), the loss finite, the weights
   moved; step seconds, tokens/s and peak memory are recorded.
2. ``dense_losses``: the distillation losses over teacher top-k rows on the device in fp32 and bf16
   against a float64 CPU reference (values and gradients).
3. ``bucketing``: the weight-sync bucket plan and walk (learners/weight_sender.py) over the engine's
   parameters on the device, packed into flat buffers and unpacked again (bit-exact), with GB/s.

    python bench/gpu_check_torch.py --out DIR            # on a CUDA GPU
    python bench/gpu_check_torch.py --device cpu --quick # the same code on a CPU (CI-free check)

Writes DIR/gpu_check_part1.json and prints one line per check; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_protege() -> None:
    """Make ``protege.*`` importable from a bare checkout (no pip install on the GPU machine):
    the subpackages live at the top of the repository, so build the package from symlinks."""
    try:
        import protege.learners  # noqa: F401

        return
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="protege-shim-")) / "protege"
    shim.mkdir()
    for f in (ROOT / "protege").iterdir():
        (shim / f.name).symlink_to(f)
    for sub in ("cluster", "actors", "learners", "rewards", "serve"):
        (shim / sub).symlink_to(ROOT / sub)
    sys.path.insert(0, str(shim.parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _rows(n: int, resp: int, vocab: int, k: int, seed: int):
    import random

    from protege.core.records import TrainRow

    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        R = rnd.randint(resp // 2, resp)
        rows.append(
            TrainRow(
                prompt_ids=[rnd.randrange(3, vocab) for _ in range(16)],
                response_ids=[rnd.randrange(3, vocab) for _ in range(R)],
                advantage=rnd.uniform(-1, 1),
                gate=float(i % 2 == 0),
                rollout_logprobs=[-rnd.uniform(0.5, 6) for _ in range(R)],
                teacher_logprobs=[-rnd.uniform(0.1, 6) for _ in range(R)],
                teacher_topk_ids=[rnd.sample(range(vocab), k) for _ in range(R)],
                teacher_topk_logprobs=[sorted((-rnd.uniform(3, 8) for _ in range(k)), reverse=True) for _ in range(R)],
                teacher_tail_logprobs=[-rnd.uniform(0.05, 0.5) for _ in range(R)],
            )
        )
    return rows


def _model_dir(work: Path, big: bool) -> Path:
    """The tiny offline student; with ``big``, the same tokenizer under a ~0.2B-parameter Qwen2
    (random weights: the check is about devices, dtypes and speed, not about what it says)."""
    from protege.core.models import build_tiny

    paths = build_tiny(work / "tiny", seed=0)
    if not big:
        return Path(paths["student"])
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(paths["student"])
    cfg.update(
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
        )
    )
    out = work / "medium"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(paths["student"]).save_pretrained(out)
    return out


def check_train_steps(model_dir: Path, device, quick: bool) -> list[dict]:
    import torch

    from protege.core import spec as S
    from protege.core.records import TrainBatch
    from protege.learners.learner import Learner

    algos = {
        "grpo": S.GRPOSpec(),
        "opd": S.OPDSpec(),
        "opd_topk": S.OPDSpec(estimator="topk"),
        "rlad": S.RLADSpec(alpha=0.5),
        "kepo_topk_jsd": S.KEPOSpec(divergence="jsd"),
    }
    steps = 2 if quick else 6
    n_rows, resp = (8, 24) if quick else (32, 256)
    out = []
    for zero in (0, 2):
        for bf16 in (False, True):
            for name, algo in algos.items():
                rec = {"algorithm": name, "zero_stage": zero, "bf16": bf16, "ok": False}
                try:
                    spec = S.LearnerSpec(zero_stage=zero, bf16=bf16, micro_batch=max(1, n_rows // 2), lr=1e-4)
                    ln = Learner(
                        rank=0,
                        world_size=1,
                        model_path=str(model_dir),
                        learner_spec=spec,
                        algo=algo,
                        temperature=1.0,
                        grad_accum=2,
                        max_response_tokens=resp,
                    )
                    info = ln.setup("127.0.0.1", _free_port())
                    assert ln.device.type == device.type, f"learner picked {ln.device}, expected {device}"
                    before = torch.cat([p.detach().float().flatten()[:4096] for p in ln.engine.module.parameters()])
                    rows = _rows(n_rows, resp, len(ln.tokenizer), 8, seed=zero)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    times, m = [], {}
                    for i in range(steps):
                        _sync(device)
                        t0 = time.perf_counter()
                        m = ln.train_step(TrainBatch(rows=rows, policy_version=i))
                        _sync(device)
                        times.append(time.perf_counter() - t0)
                    after = torch.cat([p.detach().float().flatten()[:4096] for p in ln.engine.module.parameters()])
                    tokens = sum(len(r.response_ids) for r in rows)
                    steady = sorted(times[1:] or times)[len(times[1:] or times) // 2]
                    rec.update(
                        ok=bool(
                            torch.isfinite(torch.tensor(m["loss/total"]))
                            and (after - before).abs().max() > 0
                            and "rollout/logprob_mismatch" in m
                        ),
                        params=info["params"],
                        first_step_s=times[0],
                        step_s=steady,
                        tokens_per_s=tokens / steady,
                        loss=m["loss/total"],
                        grad_norm=m["learner/grad_norm"],
                        peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                    )
                    ln.engine.destroy() if hasattr(ln.engine, "destroy") else None
                    del ln
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                except Exception as e:  # recorded, the other configurations still run
                    rec["error"] = f"{type(e).__name__}: {e}"
                    rec["traceback"] = traceback.format_exc(limit=6)
                out.append(rec)
                _say("train_step", rec)
    return out


def check_dense_losses(device) -> list[dict]:
    """The distillation losses over the teacher's dense signal on the device, in fp32 and bf16,
    against float64 on the CPU: KEPO (sampled reverse KL, top-k renormalised forward KL, top-k +
    tail JSD) and OPD (top-k + tail, full rows)."""
    import torch

    from protege.learners import losses

    out = []
    g = torch.Generator().manual_seed(0)
    B, T, K, V = 8, 64, 32, 256
    base = dict(
        lp=torch.randn(B, T, generator=g, dtype=torch.float64) - 2,
        s_topk=torch.randn(B, T, K, generator=g, dtype=torch.float64) - 5,
        t_topk=torch.randn(B, T, K, generator=g, dtype=torch.float64) - 5,
        s_full=torch.randn(B, T, V, generator=g, dtype=torch.float64),
        t_full=(2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).log_softmax(-1),
        teacher=torch.randn(B, T, generator=g, dtype=torch.float64) - 2,
        adv=torch.randn(B, generator=g, dtype=torch.float64),
    )

    def leaf(x, dev, dtype):
        return x.detach().to(dev, dtype, copy=True).requires_grad_()

    def run(dev, dtype, algo, divergence, estimator):
        lp, st, sf = leaf(base["lp"], dev, dtype), leaf(base["s_topk"], dev, dtype), leaf(base["s_full"], dev, dtype)
        inp = losses.LossInputs(
            logprobs=lp,
            old_logprobs=base["lp"].to(dev, dtype),
            mask=torch.ones(B, T, device=dev, dtype=dtype),
            advantages=base["adv"].to(dev, dtype),
            teacher_logprobs=base["teacher"].to(dev, dtype),
            student_topk_logprobs=st,
            teacher_topk_logprobs=base["t_topk"].to(dev, dtype),
            student_full_logprobs=sf.log_softmax(-1),
            teacher_full_logprobs=base["t_full"].to(dev, dtype),
            gate=(torch.arange(B, device=dev) % 2 == 0).to(dtype),
        )
        if algo == "kepo":
            loss, _ = losses.kepo_loss(inp, divergence=divergence, estimator=estimator)
        else:
            loss, _ = losses.opd_loss(inp, estimator=estimator)
        loss.backward()
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (lp, st, sf)]
        return [loss.detach().double().cpu()] + [x.double().cpu() for x in grads]

    cases = [
        ("kepo", "reverse_kl", "sampled"),
        ("kepo", "forward_kl", "topk_renorm"),
        ("kepo", "jsd", "topk"),
        ("opd", "reverse_kl", "topk"),
        ("opd", "reverse_kl", "full"),
    ]
    for algo, divergence, estimator in cases:
        ref = run(torch.device("cpu"), torch.float64, algo, divergence, estimator)
        for dtype in (torch.float32, torch.bfloat16):
            rec = {"loss": f"{algo}/{divergence}/{estimator}", "dtype": str(dtype).removeprefix("torch."), "ok": False}
            try:
                got = run(device, dtype, algo, divergence, estimator)
                tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16 keeps 8 bits of mantissa
                errs = [
                    float((a - b).abs().max() / b.abs().max()) if b.abs().max() > 0 else float((a - b).abs().max())
                    for a, b in zip(got, ref)
                ]
                rec.update(ok=max(errs) < tol, rel_err_loss=errs[0], rel_err_grad=max(errs[1:]), tolerance=tol)
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
            out.append(rec)
            _say("dense_loss", rec)
    return out


def check_bucketing(model_dir: Path, device, quick: bool) -> list[dict]:
    import torch

    from protege.core import spec as S
    from protege.core.weights import plan_buckets, wire_meta
    from protege.learners.learner import Learner

    out = []
    for zero in (0, 2):
        ln = Learner(
            rank=0,
            world_size=1,
            model_path=str(model_dir),
            learner_spec=S.LearnerSpec(zero_stage=zero),
            algo=S.GRPOSpec(),
            temperature=1.0,
            grad_accum=1,
        )
        ln.setup("127.0.0.1", _free_port())
        meta = wire_meta(ln.engine.module, "bfloat16")
        total = sum(torch.Size(s).numel() * 2 for _, s, _ in meta)
        for bucket_mb in (1, 64) if not quick else (0.05, 64):
            rec = {"zero_stage": zero, "wire_dtype": "bfloat16", "bucket_mb": bucket_mb, "ok": False}
            try:
                plan = plan_buckets(meta, int(bucket_mb * 2**20))
                _sync(device)
                t0 = time.perf_counter()
                packed, names = [], []
                for bucket in _grouped(ln.sender._bucket_pairs(plan, "bfloat16", materialize=True), plan):
                    names.append([n for n, _ in bucket])
                    packed.append(torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in bucket]))
                _sync(device)
                seconds = time.perf_counter() - t0
                params = dict(ln.engine.module.named_parameters())
                exact = True
                for buf, bucket_names in zip(packed, names):
                    offset = 0
                    for n in bucket_names:
                        p = params[n].detach().to(torch.bfloat16)
                        size = p.numel() * 2
                        got = buf[offset : offset + size].view(torch.bfloat16).view(p.shape)
                        exact &= bool(torch.equal(got, p))
                        offset += size
                rec.update(
                    ok=exact and all(b.device.type == device.type for b in packed),
                    buckets=len(plan),
                    mbytes=total / 1e6,
                    seconds=seconds,
                    gb_per_s=total / seconds / 1e9,
                )
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
            out.append(rec)
            _say("bucketing", rec)
        del ln
    return out


def _grouped(pairs, plan):
    it = iter(pairs)
    for names in plan:
        yield [next(it) for _ in names]


def _say(kind: str, rec: dict) -> None:
    keys = [k for k in rec if k not in ("ok", "traceback")]
    print(
        f"[{'ok' if rec.get('ok') else 'FAIL'}] {kind}: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ((k, rec[k]) for k in keys)),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/gpu_check")
    ap.add_argument("--quick", action="store_true", help="tiny model and batches only")
    args = ap.parse_args(argv)
    _import_protege()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check_torch: torch sees no CUDA GPU; use --device cpu to run the same checks on the CPU",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        # The learner picks CUDA whenever torch sees one; hide it so --device cpu means the CPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
    }
    for mod in ("transformers", "deepspeed", "pydantic"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:
            env[mod] = f"missing ({type(e).__name__})"
    print("gpu_check_torch:", json.dumps(env), flush=True)
    with tempfile.TemporaryDirectory(prefix="protege-gpucheck-") as work:
        tiny = _model_dir(Path(work), big=False)
        models = {"tiny": tiny} if args.quick else {"tiny": tiny, "medium": _model_dir(Path(work), big=True)}
        report = {"env": env, "train_steps": {}, "bucketing": {}}
        for label, path in models.items():
            report["train_steps"][label] = check_train_steps(path, device, args.quick)
            report["bucketing"][label] = check_bucketing(path, device, args.quick)
        report["dense_losses"] = check_dense_losses(device)
    recs = [r for group in ("train_steps", "bucketing") for rs in report[group].values() for r in rs]
    recs += report["dense_losses"]
    report["passed"], report["failed"] = sum(r["ok"] for r in recs), sum(not r["ok"] for r in recs)
    (out_dir / "gpu_check_part1.json").write_text(json.dumps(report, indent=1))
    print(
        f"gpu_check_torch: {report['passed']} passed, {report['failed']} failed -> {out_dir / 'gpu_check_part1.json'}"
    )
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
