"""``protege demo`` (``make demo``): the whole CPU walkthrough in one command.

1. build the tiny teacher/student models offline (models/tiny), unless present;
2. SFT warm start of the student (examples/sft_warmstart.yaml): a weak student;
3. GRPO on Ray with a vLLM rollout worker and 2 DeepSpeed ranks (examples/grpo_cpu.yaml);
4. print held-out accuracy before and after, where the metrics and plot are, and a few answers.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _spec(name: str, **overrides):
    from protege.core.spec import load_spec, parse_spec, set_dotted

    data = load_spec(ROOT / "examples" / name).model_dump(mode="json")
    for dotted, value in overrides.items():
        set_dotted(data, dotted, value)
    return parse_spec(data, name)


def main(out: Path = Path("runs/demo"), steps: int | None = None) -> int:
    from protege.core import models
    from protege.core import checkpoints
    from protege.cluster.driver import run

    out = Path(out)
    print("== 1/3 tiny models (offline byte-level BPE tokenizer, Qwen2 configs)")
    tiny = models.ensure_demo_models(ROOT / "models")
    print(f"   teacher={tiny['teacher']}  student={tiny['student']}")

    print("== 2/3 SFT warm start of the student (a deliberately weak starting point)")
    sft = _spec(
        "sft_warmstart.yaml", **{"models.student.path": str(tiny["student"]), "checkpoint.dir": str(out / "sft")}
    )
    run(sft, quiet=True)
    warm = checkpoints.latest(sft.run_dir) / "model"

    print("== 3/3 GRPO on Ray: 1 vLLM rollout worker, 2 DeepSpeed ranks (ZeRO-2 over gloo)")
    grpo_over = {"models.student.path": str(warm), "checkpoint.dir": str(out / "grpo")}
    if steps is not None:
        grpo_over["steps"] = steps
    grpo = _spec("grpo_cpu.yaml", **grpo_over)
    summary = run(grpo, quiet=True)

    print()
    print(
        f"held-out greedy accuracy ({grpo.eval.size} prompts): after SFT warm start "
        f"{summary['eval_accuracy_first']:.3f} -> after {summary['steps']} GRPO steps {summary['eval_accuracy_last']:.3f}"
    )
    print(f"metrics:    {grpo.run_dir / 'metrics.jsonl'}   (TensorBoard: {grpo.run_dir / 'tb'})")
    print(f"plot:       {summary['plot']}")
    print(f"checkpoint: {summary['checkpoint']}/model  (Hugging Face format; loads in transformers and vLLM)")
    samples = [json.loads(x) for x in (grpo.run_dir / "samples.jsonl").read_text().splitlines()[-4:]]
    for s in samples:
        print(
            f"   step {s['step']}: {s['question']!r} -> {s['response']!r} (answer {s['answer']}, reward {s['reward']})"
        )
    _serve_and_ask(grpo)
    return 0


def _serve_and_ask(spec) -> None:
    """Serve the trained run over the OpenAI API (Ray Serve), ask it once with curl, stop."""
    import subprocess

    from ray import serve

    from protege.serve.api import ServeArgs
    from protege.serve.app import APP_NAME
    from protege.serve.cli import serve_forever

    print("== serving the student (Ray Serve, OpenAI-compatible)")
    port = spec.serve.port
    serve_forever(ServeArgs(target=str(spec.run_dir), serve=spec.serve, dtype=spec.models.student.dtype), block=False)
    body = json.dumps(
        {
            "model": spec.run_dir.name,
            "max_tokens": 16,
            "temperature": 0,
            "messages": [
                {"role": "user", "content": "Calculate 4 + 3.\n\nGive only the final answer inside <answer></answer>."}
            ],
        }
    )
    cmd = [
        "curl",
        "-s",
        f"http://127.0.0.1:{port}/v1/chat/completions",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
    ]
    print("$ " + " ".join(c if " " not in c and "{" not in c else repr(c) for c in cmd))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
        reply = json.loads(out)
        print(f"-> {reply['choices'][0]['message']['content']!r}  (served version {reply.get('system_fingerprint')})")
    except Exception as err:  # the demo reports instead of failing: training already succeeded
        print(f"-> request failed: {err}")
    finally:
        serve.delete(APP_NAME)
    print(f"serve it yourself: protege serve {spec.run_dir}")
