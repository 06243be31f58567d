"""GPU weight sync on the real stack, on CPU: the learner's bucket walk and the object store's packed
buffers through real DeepSpeed ZeRO-3 (one rank, gloo). The bucketing plan, the wire metadata, the
routes, the orchestration and the GPU data plane (``--gpu``) are in tests/unit/cluster/test_nccl_sync.py.
"""

from __future__ import annotations

import socket

import pytest
import torch

from protege.core.weights import param_bytes, plan_buckets, tensor_views

# Well below the tiny student (107,072 float32 parameters, ~0.41 MiB; its largest parameter, the
# tied embedding, is 0.125 MiB), so the object store packs it into several buffers.
SMALL_BUCKET_MB = 0.1


@pytest.mark.slow
def test_zero3_bucket_walk_on_real_deepspeed(tiny_models):
    """Real DeepSpeed ZeRO-3 (one rank, gloo): the bucketed gathers give exactly the weights the CPU
    path exports, and so do the object store's packed buffers (several, one gather each); both
    leave every parameter partitioned again. (One test: a second ZeRO-3 learner in this process
    would find the first one's process group gone.)"""
    from protege.core.spec import parse_spec
    from protege.learners.learner import Learner

    spec = parse_spec(
        {
            "models": {"student": {"path": tiny_models["student"]}},
            "data": {"task": "basic_arithmetic", "size": 20, "eval_size": 2},
            "learner": {"ranks": 1, "zero_stage": 3, "micro_batch": 2},
            "eval": {"size": 2},
        }
    )
    ln = Learner(
        rank=0,
        world_size=1,
        model_path=tiny_models["student"],
        learner_spec=spec.learner,
        algo=spec.algorithm,
        temperature=1.0,
        grad_accum=1,
    )
    ln.setup("127.0.0.1", _free_port())
    try:
        meta = ln.nccl_meta("float32")
        full = ln._full_state()
        assert [n for n, _, _ in meta] == list(full)
        assert all(list(full[n].shape) == s for n, s, _ in meta)
        total = sum(param_bytes(s, d) for _, s, d in meta)
        plan = plan_buckets(meta, max(1, total // 5))
        assert len(plan) >= 4
        seen = 0
        for name, t in ln.sender._bucket_pairs(plan, "float32", materialize=True):
            assert torch.equal(t, full[name]), name
            seen += 1
        assert seen == len(full)
        assert all(p.numel() == 0 or p.ds_status.name == "NOT_AVAILABLE" for p in ln.engine.module.parameters())
        summary, packed = ln.pack_weights(None, SMALL_BUCKET_MB)
        assert len(packed.buffers) >= 4 and summary["wire_bytes"] == packed.nbytes()
        views = dict(tensor_views(packed.layout, [torch.from_numpy(b) for b in packed.buffers]))
        assert list(views) == list(full) and all(torch.equal(views[n], full[n]) for n in full)
        assert all(p.numel() == 0 or p.ds_status.name == "NOT_AVAILABLE" for p in ln.engine.module.parameters())
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        ln.close()
        unset_hf_deepspeed_config()  # later from_pretrained calls in this process must not see ZeRO-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
