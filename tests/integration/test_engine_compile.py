"""rollout.compile: a compiled (torch.compile) vLLM rollout worker on CPU takes weight syncs.

Compiled graphs read the engine's parameters; a reload that replaced tensors instead of copying
into them would leave the graph on the old weights. After a sync, the compiled engine's
log-probs must be the new weights' (checked against transformers), not the old ones."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_compiled_rollout_worker_generates_from_synced_weights(tiny_models):
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    from protege.actors.engine import HFEngine
    from protege.actors.rollout import RolloutWorker
    from protege.core.records import WeightsVersion

    worker = RolloutWorker(
        tiny_models["student"], engine="vllm", max_model_len=128, kv_cache_bytes=64 << 20, compiled=True
    )
    try:
        assert not worker.engine.llm.llm_engine.vllm_config.model_config.enforce_eager
        prompt, resp = [5, 17, 42, 9, 100], [33, 7, 250, 11]
        before = worker.score(prompt, resp)
        hf = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
        torch.manual_seed(2)
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        state = {n: p.detach().contiguous() for n, p in hf.named_parameters()}
        ref = HFEngine(tiny_models["student"])
        ref.model.load_state_dict(state, strict=False)
        ref.model.tie_weights()
        expected = ref.score(prompt, resp)

        out = worker.load_weights(WeightsVersion(version=3, payload=save(state)))
        assert worker.version == 3 and out["seconds"] >= 0
        after = worker.score(prompt, resp)
        assert max(abs(a - b) for a, b in zip(before, expected)) > 1e-2
        assert max(abs(a - b) for a, b in zip(after, expected)) < 1e-3, (after, expected)
        groups = worker.generate([prompt], n=2, temperature=1.0, top_p=1.0, max_tokens=6, seed=0)
        assert groups["version"] == 3 and len(groups["rollouts"]) == 2
    finally:
        worker.engine.close()
