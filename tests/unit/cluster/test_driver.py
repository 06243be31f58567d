"""cluster/driver.py's own helpers (the loop itself runs in tests/integration/)."""

from __future__ import annotations

from protege.cluster.driver import _engine_label
from protege.core.spec import parse_spec


def _spec(**over):
    d = {"models": {"student": {"path": "s"}}, "data": {"source": "reasoning_gym", "task": "chain_sum"}, **over}
    return parse_spec(d)


def test_start_up_line_names_the_engine_and_its_compile_mode():
    assert _engine_label(_spec(steps=500)) == "vllm, eager"  # rollout.compile: auto, on CPU
    assert _engine_label(_spec(rollout={"compile": "compiled"})) == "vllm, compiled"
    assert _engine_label(_spec(resources={"rollout": {"gpus": 1}})) == "vllm, compiled"
    assert _engine_label(_spec(rollout={"engine": "hf"})) == "hf"
