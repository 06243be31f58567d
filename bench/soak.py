"""Soak the student endpoint on loopback: fixed concurrency for a bounded time, in windows.

    python bench/soak.py [--minutes 10] [--clients 8] [--window 30] [--out bench/results]

Starts the real Ray Serve app on the tiny student (as bench/serve_load.py does), then drives
``--clients`` concurrent completion requests in back-to-back windows. For every window it
records requests/s, p50/p95 latency, errors, and the resident memory (RSS) of the Serve
replica and proxy processes and of this client. At the end it reports memory at start and end
and the growth per minute, and fails (exit 1) if memory grew more than ``--max-growth-mb``
beyond the first window (the "memory must not grow without bound" check). Traffic goes to
127.0.0.1 only and every loop stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def serve_pids() -> dict[str, list[int]]:
    """PIDs of this soak's Serve replica and proxy. The local Ray this script started (raylet and its
    workers) descends from this process, so another Serve app on the same machine is never counted."""
    import psutil

    out: dict[str, list[int]] = {"replica": [], "proxy": []}
    for p in psutil.Process().children(recursive=True):
        cmd = " ".join(p.cmdline())
        if "ServeReplica" in cmd:
            out["replica"].append(p.pid)
        elif "ProxyActor" in cmd:
            out["proxy"].append(p.pid)
    return out


def serve_rss_mb(pids: dict[str, list[int]]) -> dict[str, float]:
    """RSS of the given replica and proxy processes and of this process (the load client)."""
    import psutil

    out = {"replica": 0.0, "proxy": 0.0, "client": psutil.Process().memory_info().rss / 2**20}
    for role, ids in pids.items():
        for pid in ids:
            try:
                out[role] += psutil.Process(pid).memory_info().rss / 2**20
            except psutil.Error:
                continue
    return {k: round(v, 1) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--window", type=float, default=30.0, help="seconds per measurement window")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-growth-mb", type=float, default=200.0)
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny" / "student"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    for k, v in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                 "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(k, v)
    import serve_load

    load_args = argparse.Namespace(model=args.model, clients=args.clients, seconds=args.window,
                                   max_tokens=args.max_tokens, max_model_len=512)
    url, name = serve_load.start_serve(load_args)
    pids = serve_pids()
    print(f"serve processes: {pids}", flush=True)
    windows = []
    deadline = time.time() + args.minutes * 60
    t_start = time.time()
    while time.time() < deadline:
        load_args.seconds = min(args.window, max(1.0, deadline - time.time()))
        res = asyncio.run(serve_load.load_serve(url, None, name, load_args))
        res.update(t_min=round((time.time() - t_start) / 60, 2), rss_mb=serve_rss_mb(pids), load=os.getloadavg()[0])
        windows.append(res)
        print(f"{res['t_min']:5.1f} min  {res['requests_per_s']:6.1f} req/s  p50 {res['p50_ms']} ms  "
              f"p95 {res['p95_ms']} ms  errors {res['errors']}  rss {res['rss_mb']}", flush=True)
    first, last = windows[0], windows[-1]
    served = lambda w: w["rss_mb"]["replica"] + w["rss_mb"]["proxy"]  # noqa: E731
    growth = served(last) - served(first)
    minutes = max(last["t_min"] - first["t_min"], 1e-9)
    total = sum(w["requests"] for w in windows)
    errors = sum(w["errors"] for w in windows)
    summary = {
        "minutes": round(last["t_min"], 2), "clients": args.clients, "requests": total, "errors": errors,
        "error_rate": round(errors / max(1, total + errors), 5),
        "p95_ms_first": first["p95_ms"], "p95_ms_last": last["p95_ms"],
        "p95_ms_max": max(w["p95_ms"] for w in windows if w["p95_ms"] is not None),
        "rss_mb_first": first["rss_mb"], "rss_mb_last": last["rss_mb"],
        "served_rss_growth_mb": round(growth, 1), "growth_mb_per_min": round(growth / minutes, 2),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"summary": summary, "windows": windows}, indent=2))
    print(json.dumps(summary, indent=2))
    import ray

    ray.shutdown()
    return 0 if growth <= args.max_growth_mb else 1


if __name__ == "__main__":
    sys.exit(main())
