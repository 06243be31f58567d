"""Soak the student endpoint on loopback: fixed concurrency for a bounded time, in windows.

    python bench/soak.py [--minutes 10] [--clients 8] [--window 30] [--out bench/results]

Starts the real Ray Serve app on the tiny student (as bench/serve_load.py does), then drives
``--clients`` concurrent completion requests in back-to-back windows. For every window it
records requests/s, p50/p95 latency, errors, the resident memory (RSS) of the Serve replica and
proxy processes and of this client, and the replica's Python heap (allocated blocks, counted
inside the replica: it grows with leaked Python objects whatever the allocator does).

Warm-up and growth look alike over a short run, so the report separates them:
- growth over the whole run (last window minus first), per minute;
- growth over the second half only, and the least-squares slope of the second-half windows: memory
  that has plateaued after warm-up has a slope near 0, a leak keeps its rate;
- RSS after a full ``gc.collect()`` and ``malloc_trim(0)`` inside each Serve process, before the
  first window and after the last: growth that survives these is memory still referenced (or
  fragmentation), not free memory the allocator merely kept.

Fails (exit 1) if the served memory (replica + proxy) grew more than ``--max-growth-mb`` from the
first window to the last, or if its second-half slope exceeds ``--max-slope-mb-per-min`` (the
"memory must not grow without bound" check). Traffic goes to 127.0.0.1 only and every loop stops
by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
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


def _inside(_actor, trim: bool) -> dict:
    """Runs inside a Serve actor (``__ray_call__``): its RSS and Python heap blocks; with ``trim``,
    after a full collection and glibc's ``malloc_trim(0)`` (free heap pages go back to the OS)."""
    import ctypes
    import gc
    import sys

    import psutil

    if trim:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
    return {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1), "py_blocks": sys.getallocatedblocks()}


def serve_actors() -> dict[str, list]:
    """Handles of this Ray instance's Serve replica and proxy actors (to measure from inside them)."""
    import ray

    out: dict[str, list] = {"replica": [], "proxy": []}
    for a in ray.util.list_named_actors(all_namespaces=True):
        role = (
            "replica"
            if a["name"].startswith("SERVE_REPLICA::")
            else "proxy"
            if a["name"].startswith("SERVE_PROXY_ACTOR")
            else None
        )
        if role and a["namespace"] == "serve":
            out[role].append(ray.get_actor(a["name"], namespace="serve"))
    return out


def inside(actors: dict[str, list], trim: bool, roles=("replica", "proxy")) -> dict | None:
    """Summed over each role's actors: {role: {"rss_mb", "py_blocks"}}; None if it cannot be measured."""
    import ray

    try:
        out = {}
        for role in roles:
            rows = ray.get([a.__ray_call__.remote(_inside, trim) for a in actors[role]], timeout=60)
            out[role] = {k: round(sum(r[k] for r in rows), 1) for k in ("rss_mb", "py_blocks")}
        return out
    except Exception as exc:  # noqa: BLE001 - an optional measurement; the RSS from outside still counts
        print(f"could not measure inside the Serve actors: {exc!r}", flush=True)
        return None


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None for fewer than 2 distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope


def summarize(windows: list[dict], clients: int, trimmed: dict) -> dict:
    first, last = windows[0], windows[-1]
    served = lambda w: w["rss_mb"]["replica"] + w["rss_mb"]["proxy"]  # noqa: E731
    growth = served(last) - served(first)
    minutes = max(last["t_min"] - first["t_min"], 1e-9)
    total = sum(w["requests"] for w in windows)
    errors = sum(w["errors"] for w in windows)
    # Second half: from the window nearest the run's midpoint to the last one.
    mid = min(windows, key=lambda w: abs(w["t_min"] - last["t_min"] / 2))
    half = windows[windows.index(mid) :]
    half_min = max(last["t_min"] - mid["t_min"], 1e-9)
    half_slope = slope([(w["t_min"], served(w)) for w in half])
    replica_half_slope = slope([(w["t_min"], w["rss_mb"]["replica"]) for w in half])
    half_requests = sum(w["requests"] for w in half[1:])
    blocks = [w.get("replica_py_blocks") for w in (first, mid, last)]

    def r(x):
        return None if x is None else round(x, 2)

    return {
        "minutes": round(last["t_min"], 2),
        "clients": clients,
        "requests": total,
        "errors": errors,
        "error_rate": round(errors / max(1, total + errors), 5),
        "p95_ms_first": first["p95_ms"],
        "p95_ms_last": last["p95_ms"],
        "p95_ms_max": max(w["p95_ms"] for w in windows if w["p95_ms"] is not None),
        "rss_mb_first": first["rss_mb"],
        "rss_mb_last": last["rss_mb"],
        "served_rss_growth_mb": round(growth, 1),
        "growth_mb_per_min": round(growth / minutes, 2),
        "replica_growth_mb_per_min": round((last["rss_mb"]["replica"] - first["rss_mb"]["replica"]) / minutes, 2),
        "second_half": {
            "from_min": mid["t_min"],
            "to_min": last["t_min"],
            "windows": len(half),
            "requests": half_requests,
            "served_rss_growth_mb": round(served(last) - served(mid), 1),
            "growth_mb_per_min": round((served(last) - served(mid)) / half_min, 2),
            "slope_mb_per_min": r(half_slope),
            "replica_slope_mb_per_min": r(replica_half_slope),
            "replica_growth_mb_per_1k_requests": round(
                (last["rss_mb"]["replica"] - mid["rss_mb"]["replica"]) / max(1, half_requests) * 1000, 3
            ),
            "replica_py_blocks_per_request": None
            if None in blocks[1:]
            else round((blocks[2] - blocks[1]) / max(1, half_requests), 3),
        },
        "replica_py_blocks_first": blocks[0],
        "replica_py_blocks_last": blocks[2],
        # After gc.collect() + malloc_trim(0) in each process, before the first window and after the last.
        "trimmed_rss_mb_start": trimmed.get("start"),
        "trimmed_rss_mb_end": trimmed.get("end"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--window", type=float, default=30.0, help="seconds per measurement window")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--max-growth-mb",
        type=float,
        default=200.0,
        help="most served (replica + proxy) RSS growth from the first window to the last",
    )
    ap.add_argument(
        "--max-slope-mb-per-min",
        type=float,
        default=2.0,
        help="most served RSS growth rate over the second half (least squares): a plateau is ~0",
    )
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny" / "student"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    for k, v in {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }.items():
        os.environ.setdefault(k, v)
    import serve_load

    load_args = argparse.Namespace(
        model=args.model, clients=args.clients, seconds=args.window, max_tokens=args.max_tokens, max_model_len=512
    )
    url, name = serve_load.start_serve(load_args)
    pids = serve_pids()
    print(f"serve processes: {pids}", flush=True)
    actors = serve_actors()
    trimmed = {}
    start = inside(actors, trim=True)
    if start:
        trimmed["start"] = {role: v["rss_mb"] for role, v in start.items()}
    windows = []
    deadline = time.time() + args.minutes * 60
    t_start = time.time()
    while time.time() < deadline:
        load_args.seconds = min(args.window, max(1.0, deadline - time.time()))
        res = asyncio.run(serve_load.load_serve(url, None, name, load_args))
        res.update(t_min=round((time.time() - t_start) / 60, 2), rss_mb=serve_rss_mb(pids), load=os.getloadavg()[0])
        heap = inside(actors, trim=False, roles=("replica",))  # no gc, no trim: the series stays untouched
        res["replica_py_blocks"] = heap["replica"]["py_blocks"] if heap else None
        windows.append(res)
        print(
            f"{res['t_min']:5.1f} min  {res['requests_per_s']:6.1f} req/s  p50 {res['p50_ms']} ms  "
            f"p95 {res['p95_ms']} ms  errors {res['errors']}  rss {res['rss_mb']}  "
            f"replica py blocks {res['replica_py_blocks']}",
            flush=True,
        )
    end = inside(actors, trim=True)  # after the last window's RSS was recorded
    if end:
        trimmed["end"] = {role: v["rss_mb"] for role, v in end.items()}
    summary = summarize(windows, args.clients, trimmed)
    half_slope = summary["second_half"]["slope_mb_per_min"]
    checks = {
        f"served_rss_growth_mb <= {args.max_growth_mb}": summary["served_rss_growth_mb"] <= args.max_growth_mb,
        # Needs >= 2 windows in the second half: a run that short cannot tell a plateau from a leak.
        f"second_half.slope_mb_per_min <= {args.max_slope_mb_per_min}": half_slope is not None
        and half_slope <= args.max_slope_mb_per_min,
    }
    summary.update(checks=checks, passed=all(checks.values()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"summary": summary, "windows": windows}, indent=2))
    print(json.dumps(summary, indent=2))
    import ray

    ray.shutdown()
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
