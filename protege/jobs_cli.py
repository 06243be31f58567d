"""``protege submit`` and ``protege jobs ...``: Protégé jobs on a Ray cluster (cluster/jobs.py).

    protege submit SPEC [--address http://HEAD:8265] [--set K=V]   validate here, then submit; prints the id
    protege jobs list
    protege jobs status ID [--json]
    protege jobs logs ID [--follow]
    protege jobs stop ID
    protege jobs serve-api [--host H] [--port P]                  the REST job API (cluster/job_api.py)

The address defaults to $RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265. Ray's token (token
auth is on by default in Ray 2.60) is read from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token. Exit codes: 0 ok, 1 the cluster said no (or no such job), 2 invalid spec
(or a pre-flight check failed: one line naming the field).
``register(subparsers)`` adds the commands to the main ``protege`` parser.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_FAILED = 1


def register(subparsers) -> None:
    addr = argparse.ArgumentParser(add_help=False)
    addr.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="Ray dashboard / job server (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)",
    )

    s = subparsers.add_parser(
        "submit",
        parents=[addr],
        help="validate a job spec here, then submit it to a Ray cluster",
        description="Validates SPEC locally (an invalid spec prints every error and sends nothing), then submits "
        "it through the Ray Jobs API with this project as the job's working directory and prints the job id. "
        "The cluster runs the protege installed in its Python. Local model folders and data files the spec "
        "names travel with the job (past Ray's 500 MiB upload: through a bucket checkpoint.dir, else refused); "
        "hub ids, URIs and paths on shared storage are passed through. checkpoint.dir should be an absolute "
        "path on storage the cluster shares, or a bucket.",
    )
    s.add_argument("spec", help="job spec, YAML or JSON")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (repeatable)")
    s.add_argument("--id", default=None, help="job id to use (default: NAME-<random hex>)")
    s.add_argument(
        "--python", default=None, help="interpreter on the cluster (default: this one for a local head, else 'python')"
    )
    s.set_defaults(fn=cmd_submit)

    j = subparsers.add_parser("jobs", help="list, inspect, follow and stop submitted jobs; serve the REST job API")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True, metavar="WHAT")
    jsub.add_parser("list", parents=[addr], help="Protégé jobs on the cluster").set_defaults(fn=cmd_list)
    st = jsub.add_parser("status", parents=[addr], help="state, step, latest metrics and checkpoints of a job")
    st.add_argument("id")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(fn=cmd_status)
    lg = jsub.add_parser("logs", parents=[addr], help="the job's driver output")
    lg.add_argument("id")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    lg.set_defaults(fn=cmd_logs)
    sp = jsub.add_parser("stop", parents=[addr], help="stop a job")
    sp.add_argument("id")
    sp.set_defaults(fn=cmd_stop)
    api = jsub.add_parser(
        "serve-api",
        parents=[addr],
        help="run the REST job API (needs $PROTEGE_JOBS_TOKEN)",
        description="POST/GET /v1/jobs, GET/DELETE /v1/jobs/{id}, every route behind "
        "'Authorization: Bearer $PROTEGE_JOBS_TOKEN'.",
    )
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8080)
    api.set_defaults(fn=cmd_serve_api)


def _client(args):
    from protege.cluster.jobs import JobsClient

    return JobsClient(args.address)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_FAILED


def _guard(fn):
    """Cluster errors become one 'error:' line and exit 1 instead of a traceback."""

    def wrapped(*args) -> int:
        from ray.exceptions import RayError

        from protege.cluster.jobs import JobNotFound, shell_env_hint

        try:
            return fn(*args)
        except JobNotFound as exc:
            return _fail(f"no job '{exc.args[0]}'")
        except (ConnectionError, RayError, RuntimeError, OSError) as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            hint = f"\n  {shell_env_hint()}" if ("401" in text or "403" in text or "token" in text.lower()) else ""
            return _fail(f"{text}{hint}")

    wrapped.__name__ = fn.__name__
    return wrapped


def cmd_submit(args) -> int:
    # exit 2 with every field error, before any network call
    from protege.spec_args import EXIT_INVALID, _apply_overrides, _load
    from protege.cluster.preflight import UserError, for_submit

    from protege.cluster.jobs import default_address, plan_inputs, project_root

    spec = _apply_overrides(_load(args.spec), args.set)
    try:
        for_submit(spec)  # what can be checked here: the task, the KV cache, an uploaded data file
        # each model / data path: travels with the job, passed through, or refused (too big, missing)
        inputs = plan_inputs(spec, project_root(), args.address or default_address())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    return _submit(args, spec, inputs)


@_guard
def _submit(args, spec, inputs=None) -> int:
    from protege.cluster.job_inputs import describe
    from protege.cluster.jobs import spec_warnings

    client = _client(args)
    for w in spec_warnings(spec, client.project):
        print(f"warning: {w}", file=sys.stderr)
    for line in describe(inputs) if inputs is not None else ():
        print(f"note: {line}", file=sys.stderr)
    job_id = client.submit(spec, python=args.python, submission_id=args.id, inputs=inputs)
    print(job_id)
    print(
        f"submitted {spec.algorithm.type} job '{spec.name}' to {client.address}; "
        f"follow with: protege jobs logs {job_id} --follow",
        file=sys.stderr,
    )
    return 0


@_guard
def cmd_list(args) -> int:
    jobs = _client(args).list()
    if not jobs:
        print("no jobs", file=sys.stderr)
    for j in jobs:
        print(f"{j['id']}\t{j['state']}\t{j['algorithm']}\t{j['name']}")
    return 0


@_guard
def cmd_status(args) -> int:
    from protege.cluster.jobs import format_status

    s = _client(args).status(args.id)
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0


@_guard
def cmd_logs(args) -> int:
    client = _client(args)
    if not args.follow:
        sys.stdout.write(client.logs(args.id))
        return 0
    try:
        for chunk in client.follow(args.id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    state = client.state(args.id)
    print(f"job {args.id}: {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else EXIT_FAILED


@_guard
def cmd_stop(args) -> int:
    client = _client(args)
    stopped = client.stop(args.id)
    print(f"{args.id}: {'stopping' if stopped else 'already ended'} ({client.state(args.id)})")
    return 0


def cmd_serve_api(args) -> int:
    import os

    from protege.cluster.job_api import TOKEN_ENV, serve
    from protege.cluster.jobs import default_address

    if not os.environ.get(TOKEN_ENV):
        return _fail(f"set {TOKEN_ENV} to the bearer token clients must send; the API never runs without one")
    serve(args.address or default_address(), host=args.host, port=args.port)
    return 0
