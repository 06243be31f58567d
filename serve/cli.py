"""``protege serve``: serve a trained student, pin or roll back the served version.

    protege serve RUN_DIR [--version N|latest]    serve a run, following its newest published version
    protege serve CHECKPOINT | MODEL_DIR           serve one fixed checkpoint or Hugging Face folder
    protege serve rollback RUN_DIR [--to N]        serve the version before the current one (or N)
    protege serve pin RUN_DIR N|latest             serve version N from now on / follow the newest again
    protege serve versions RUN_DIR                 list published versions and the one served

Pins live in RUN_DIR/published.json; running servers poll it and switch within ``--poll-s``.
``register(subparsers)`` adds the command to the main CLI; Ray is imported only when serving.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from protege.core import storage
from protege.serve import versions

ACTIONS = ("rollback", "pin", "versions")
EXIT_INVALID = 2


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the trained student over an OpenAI-compatible HTTP API (Ray Serve)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[1],
        epilog="The API key is read from serve.api_key_env (default PROTEGE_API_KEY); it is required when "
        "--host is not a loopback address.\nServe settings (host, port, engine, max_tokens, max_n, "
        "max_concurrent, autoscale) come from --spec, else RUN_DIR/resolved_spec.json, else the defaults.",
    )
    p.add_argument(
        "target",
        metavar="RUN_DIR|CHECKPOINT|MODEL_DIR|ACTION",
        help=f"what to serve, or one of {', '.join(ACTIONS)} followed by RUN_DIR",
    )
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--version", help="pin version N (or 'latest' to follow the newest) before serving")
    p.add_argument("--to", type=int, help="rollback: the version to go back to (default: the one before)")
    p.add_argument("--spec", help="job spec whose serve: section to use")
    p.add_argument("--host", help="listen address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default serve.port, 8000)")
    p.add_argument("--engine", choices=["vllm", "hf"], help="serving engine (default serve.engine, vllm)")
    p.add_argument("--name", help="model name in /v1/models (default: the run dir's name)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--poll-s", type=float, default=2.0, help="how often replicas look for a newer version")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs per replica (default: %(default)s)")
    p.add_argument(
        "--replica-gpus", type=float, default=None, help="Ray GPUs per replica (default: 1 if a GPU is seen, else 0)"
    )
    p.set_defaults(fn=cmd_serve)


def cmd_serve(args) -> int:
    try:
        if args.target in ACTIONS:
            return _action(args)
        return _serve(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID


def _action(args) -> int:
    if len(args.rest) != (2 if args.target == "pin" else 1):
        usage = {"rollback": "rollback RUN_DIR [--to N]", "pin": "pin RUN_DIR N|latest", "versions": "versions RUN_DIR"}
        raise ValueError(f"usage: protege serve {usage[args.target]}")
    run_dir = args.rest[0] if storage.is_uri(args.rest[0]) else Path(args.rest[0])
    if args.target == "rollback":
        before, now = versions.rollback(run_dir, args.to)
        print(f"{run_dir}: serving version {now} (was {before}); running servers switch within their poll interval")
    elif args.target == "pin":
        _pin(run_dir, args.rest[1])
        print(
            f"{run_dir}: serving version {versions.current(run_dir).number} "
            f"({'pinned' if versions.read_pin(run_dir) is not None else 'following the newest'})"
        )
    else:
        current, pin = versions.current(run_dir), versions.read_pin(run_dir)
        for v in versions.list_versions(run_dir):
            mark = " <- served" + (" (pinned)" if pin is not None else "") if current and v == current else ""
            print(f"version {v.number:>6}  step {v.step:>6}  {v.model_path}{mark}")
    return 0


def _pin(run_dir: Path, value: str) -> None:
    if value == "latest":
        versions.write_pin(run_dir, None)
        return
    published = [v.number for v in versions.list_versions(run_dir)]
    if not value.isdigit() or int(value) not in published:
        raise ValueError(f"{run_dir}: version {value} is not published (published: {published})")
    versions.write_pin(run_dir, int(value))


def serve_spec_for(target: Path, spec_path: str | None):
    """The serve: section of --spec, else of the run's resolved_spec.json, else the defaults."""
    from protege.core.spec import ServeSpec, load_spec

    if spec_path:
        return load_spec(spec_path).serve
    if storage.is_uri(target):  # a run in a bucket: its resolved_spec.json sits at the run's root
        parts = str(target).rstrip("/").split("/")
        for cut in range(4):
            uri = storage.join("/".join(parts[: len(parts) - cut]), "resolved_spec.json")
            if storage.exists(uri):
                return ServeSpec.model_validate(json.loads(storage.read_text(uri)).get("serve", {}))
        return ServeSpec()
    # RUN_DIR, RUN_DIR/checkpoints/step_N or .../step_N/model: the run's spec is up to 3 levels up.
    for d in [target, *list(target.resolve().parents)[:3]]:
        if (d / "resolved_spec.json").is_file():
            return ServeSpec.model_validate(json.loads((d / "resolved_spec.json").read_text()).get("serve", {}))
    return ServeSpec()


def _serve(args) -> int:
    from protege.core.env import configure_defaults, has_cuda
    from protege.serve.api import ServeArgs

    target = args.target if storage.is_uri(args.target) else Path(args.target)
    if args.version is not None:
        has_ckpts = (
            storage.exists(storage.join(target, "checkpoints"))
            if storage.is_uri(target)
            else (target / "checkpoints").is_dir()
        )
        if not has_ckpts:
            raise ValueError(f"--version needs a run dir; {target} has no checkpoints/")
        _pin(target, args.version)
    spec = serve_spec_for(target, args.spec)
    overrides = {
        k: v for k, v in {"host": args.host, "port": args.port, "engine": args.engine}.items() if v is not None
    }
    spec = spec.model_copy(update=overrides)
    serve_args = ServeArgs(
        target=str(target),
        serve=spec,
        model_name=args.name,
        max_model_len=args.max_model_len,
        poll_s=args.poll_s,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus if args.replica_gpus is not None else float(has_cuda()),
    )
    configure_defaults()
    return serve_forever(serve_args)


def _quiet_serve_logger() -> None:
    """Serve's own INFO lines (started, deployed, deleting) stay off the console unless -v."""
    import logging

    from protege.core.console import verbose

    if not verbose():
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def _serve_logs() -> str:
    """Where Ray Serve writes replica, proxy and controller logs on this node."""
    import ray

    try:
        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve")
    except Exception:  # a remote cluster: the head node's session folder
        return "the Ray session's logs/serve folder"


def serve_forever(serve_args, *, block: bool = True) -> int:
    """Start the app on $RAY_ADDRESS's cluster (or a local Ray) and block until Ctrl-C.

    Also the entry point for ``serve.enabled`` in a job spec: call it when training ends with
    ``ServeArgs(target=spec.run_location, serve=spec.serve, dtype=spec.models.student.dtype)``.
    """
    import ray
    from ray import serve

    from protege.core.env import worker_env
    from protege.serve.app import APP_NAME, api_key_hash, run

    versions.resolve(serve_args.target)  # clear errors before Ray starts
    api_key_hash(serve_args.serve)
    if not ray.is_initialized():
        import logging

        from protege.core.console import verbose

        # Replicas' output (vLLM, Serve's access log) stays in Ray's session logs unless -v.
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            runtime_env={"env_vars": worker_env()},
            log_to_driver=verbose(),
            logging_level=logging.INFO if verbose() else logging.WARNING,
        )
    _quiet_serve_logger()
    url = run(serve_args)
    served = versions.resolve(serve_args.target).version
    print(
        f"serving version {served.number} of {serve_args.target} at {url}/v1 "
        f"(OpenAI API; Ctrl-C to stop; replica logs: {_serve_logs()})",
        file=sys.stderr,
    )
    if not block:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
        return 0
