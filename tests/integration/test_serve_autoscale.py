"""The student endpoint scales with load: Ray Serve adds a replica under sustained traffic and
removes it when traffic stops, with no failed request (real Serve app, vLLM engine, tiny student).

Timings are reported, never asserted: the test only bounds how long it waits.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from protege.core.spec import AutoscaleSpec, ServeSpec
from protege.serve.api import ServeArgs

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running_replicas() -> int:
    from ray import serve

    from protege.serve.app import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return 0
    states = app.deployments["StudentServer"].replica_states
    return int(states.get("RUNNING", 0))


def _wait_for(pred, timeout: float, poll: float = 0.5) -> float | None:
    """Seconds until ``pred()`` held, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(poll)
    return None


def test_endpoint_scales_up_under_load_and_back_down(tiny_models, tmp_path, ray_local):
    import httpx
    from ray import serve

    from protege.serve.app import run
    from tests.unit.serve.test_serve import publish

    run_dir = tmp_path / "student-run"
    publish(run_dir, 1, 1, tiny_models["student"])
    spec = ServeSpec(
        port=_free_port(),
        max_tokens=64,
        max_concurrent=16,
        autoscale=AutoscaleSpec(
            min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=4
        ),
    )
    url = run(
        ServeArgs(target=str(run_dir), serve=spec, max_model_len=512, poll_s=5, replica_cpus=0.5, kv_cache_gb=0.0625)
    )
    try:
        assert _running_replicas() == 1
        body = {"model": "student-run", "prompt": "count", "max_tokens": 32, "temperature": 1.0, "ignore_eos": True}
        stop, codes, lock = threading.Event(), [], threading.Lock()

        def client():
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    try:
                        code = c.post(url + "/v1/completions", json=body).status_code
                    except httpx.HTTPError as err:  # a dropped connection counts as a failure
                        code = type(err).__name__
                    with lock:
                        codes.append(code)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        t_load = time.monotonic()
        for t in threads:
            t.start()
        up = _wait_for(lambda: _running_replicas() == 2, timeout=240)
        if up is not None:
            time.sleep(5)  # serve a while on two replicas
        stop.set()
        for t in threads:
            t.join(70)
        served_under_load = len(codes)
        down = _wait_for(lambda: _running_replicas() == 1, timeout=240) if up is not None else None
        report = {
            "scale_up_s": up,
            "scale_down_s_after_load_stopped": down,
            "requests": served_under_load,
            "load_s": round(time.monotonic() - t_load, 1),
            "status_codes": sorted(set(map(str, codes))),
        }
        print("serve autoscaling:", json.dumps(report))
        assert up is not None, f"no second replica within 240 s of load: {report}"
        assert down is not None, f"still 2 replicas 240 s after the load stopped: {report}"
        assert codes and all(c == 200 for c in codes), report  # nothing failed while replicas came and went
    finally:
        serve.shutdown()
