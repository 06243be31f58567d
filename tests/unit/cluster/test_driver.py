"""cluster/driver.py's own helpers (the loop itself runs in tests/integration/)."""

from __future__ import annotations

from protege.cluster.driver import _engine_label
from protege.core.spec import parse_spec


def _spec(**over):
    d = {"models": {"student": {"path": "s"}}, "data": {"source": "reasoning_gym", "task": "chain_sum"}, **over}
    return parse_spec(d)


def test_start_up_line_names_the_engine_and_its_compile_mode():
    assert _engine_label(_spec(steps=10)) == "vllm, eager"
    assert _engine_label(_spec(steps=500)) == "vllm, compiled"  # rollout.compile: auto, a long run
    assert _engine_label(_spec(steps=500, rollout={"compile": "eager"})) == "vllm, eager"
    assert _engine_label(_spec(rollout={"engine": "hf"})) == "hf"
