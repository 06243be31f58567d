"""GPU weight sync (cluster/weight_sync.py, learners/weight_sender.py, actors/weight_receiver.py, core/weights.py).

On CPU: the bucketing plan, the wire metadata, the routes, the learner's bucket walk through vLLM's
own consistency check and packing (real DeepSpeed ZeRO-3: tests/integration/test_nccl_sync.py), and
the driver-side orchestration against stand-in actors. With ``--gpu``: the real data plane (CUDA IPC
colocated on one GPU; NCCL when there are two) checked the way tests/integration/test_pipeline.py
checks the CPU path, the engine's log-probs after a sync equal the learner's. Set
PROTEGE_BENCH_OUT=DIR to keep the push timings (DIR/gpu_sync.jsonl).
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from protege.cluster.weight_sync import NcclWeightSync, NoGpuTransfer, ObjectStoreSync, pick_weight_sync, plan_routes
from protege.core.records import SyncResult
from protege.core.weights import ALIGN, param_bytes, plan_buckets, plan_packed, tensor_views, wire_meta
from protege.learners.weight_sender import WeightSender

MB = 1 << 20
# Well below the tiny student (107,072 float32 parameters, ~0.41 MiB; its largest parameter, the
# tied embedding, is 0.125 MiB), so a sync of it takes several buckets and several packed buffers.
# test_small_bucket_splits_the_tiny_student checks that on CPU for the GPU tests below.
SMALL_BUCKET_MB = 0.1


# ------------------------------------------------------------------------------------ bucketing
def _check_plan(params, bucket, plan):
    names = [n for n, _, _ in params]
    assert [n for b in plan for n in b] == names  # every parameter exactly once, in order
    size = {n: param_bytes(s, d) for n, s, d in params}
    for b in plan:
        assert b, "empty bucket"
        if len(b) > 1:
            assert sum(size[n] for n in b) <= bucket
    # greedy: a bucket is only closed when the next parameter would not fit
    for a, b in zip(plan, plan[1:]):
        assert sum(size[n] for n in a) + size[b[0]] > bucket


def test_plan_buckets_basic():
    params = [("a", [256], "float32"), ("b", [256], "float32"), ("c", [512], "float32"), ("d", [10], "bfloat16")]
    # sizes: a, b 1024 B; c 2048 B; d 20 B
    assert plan_buckets(params, 2100) == [["a", "b"], ["c", "d"]]
    assert plan_buckets(params, 4096) == [["a", "b", "c"], ["d"]]
    assert plan_buckets(params, 8192) == [["a", "b", "c", "d"]]
    assert plan_buckets(params, 1) == [["a"], ["b"], ["c"], ["d"]]
    for bucket in (1, 2100, 4096, 8192):
        _check_plan(params, bucket, plan_buckets(params, bucket))


def test_plan_buckets_oversized_parameter_travels_alone():
    params = [("small", [10], "float32"), ("huge", [1000], "float32"), ("tail", [10], "float32")]
    assert plan_buckets(params, 400) == [["small"], ["huge"], ["tail"]]
    params = [("huge", [1000], "float32"), ("a", [10], "float32"), ("b", [10], "float32")]
    assert plan_buckets(params, 400) == [["huge"], ["a", "b"]]


def test_plan_buckets_exact_fit_and_empty():
    params = [("a", [2, 128], "float16"), ("b", [256], "float16")]  # 512 B each
    assert plan_buckets(params, 1024) == [["a", "b"]]
    assert plan_buckets([], 1024) == []
    assert plan_buckets([("z", [0], "float32"), ("a", [4], "float32")], 16) == [["z", "a"]]


def test_plan_buckets_rejects_bad_input():
    with pytest.raises(ValueError):
        plan_buckets([("a", [1], "float32")], 0)
    with pytest.raises(ValueError, match="twice"):
        plan_buckets([("a", [1], "float32"), ("a", [1], "float32")], 16)
    with pytest.raises(ValueError, match="dtype"):
        plan_buckets([("a", [1], "float99")], 16)


@pytest.mark.parametrize("seed", range(20))
def test_plan_buckets_random(seed):
    rng = random.Random(seed)
    params = [
        (f"p{i}", [rng.randint(0, 64), rng.randint(1, 64)], rng.choice(["float32", "bfloat16", "float16"]))
        for i in range(rng.randint(1, 60))
    ]
    bucket = rng.choice([1, 100, 4096, 20_000, 10**9])
    _check_plan(params, bucket, plan_buckets(params, bucket))


# ------------------------------------------------------------------------------------ metadata
def _tiny_tied_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def test_wire_meta_names_shapes_dtypes():
    model = _tiny_tied_lm()
    meta = wire_meta(model, "bfloat16")
    names = [n for n, _, _ in meta]
    assert names == [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: sent once
    assert all(d == "bfloat16" for _, _, d in meta)
    assert dict((n, s) for n, s, _ in meta)["model.embed_tokens.weight"] == [64, 16]
    # ZeRO-3 partitions a parameter; the full shape is ds_shape
    p = model.model.norm.weight
    p.ds_shape = torch.Size([16])
    p.data = torch.empty(0)
    assert dict((n, s) for n, s, _ in wire_meta(model, "float32"))["model.norm.weight"] == [16]
    assert wire_meta(model, torch.float16)[0][2] == "float16"


class _Sender(WeightSender):
    """The sender over a plain module, ZeRO-3 gathers recorded instead of performed."""

    def __init__(self, module, zero_stage=2):
        super().__init__(lambda: module, rank=0, zero_stage=zero_stage)
        self.gathers: list[list[int]] = []

    def _gathered(self, params):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            self.gathers.append([id(p) for p in params])
            yield

        return ctx()


@pytest.mark.parametrize("zero", [2, 3])
def test_bucket_walk_passes_vllm_checks_and_packs(zero):
    """The learner's walk matches its metadata element for element (vLLM's own check), gathers
    once per bucket under ZeRO-3, and survives vLLM's pack/unpack unchanged."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor

    from protege.learners.weight_sender import bucket_source

    model = _tiny_tied_lm()
    sender = _Sender(model, zero_stage=zero)
    meta = wire_meta(model, "bfloat16")
    plan = plan_buckets(meta, 2048)
    assert len(plan) > 2
    src = bucket_source(meta, lambda: sender._bucket_pairs(plan, "bfloat16", materialize=True))
    pairs = list(NCCLTrainerWeightTransferEngine._checked_iter(src, src.metadata()))
    assert len(sender.gathers) == (len(plan) if zero == 3 else 0)
    list(src)  # a fresh pass each time, as vLLM's WeightSource contract requires
    assert len(sender.gathers) == (2 * len(plan) if zero == 3 else 0)
    chunk = pack_tensors(iter(pairs), lambda item: item[1], buffer_size_bytes=1 << 30)
    out = dict(unpack_tensor(chunk.packed_tensor, chunk.names, chunk.shapes, chunk.dtypes, chunk.tensor_sizes))
    for name, p in model.named_parameters():
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], p.detach().to(torch.bfloat16))


def test_bucket_walk_without_materialising_yields_parameters():
    model = _tiny_tied_lm()
    sender = _Sender(model, zero_stage=3)
    meta = wire_meta(model, "bfloat16")
    plan = plan_buckets(meta, 4096)
    got = dict(sender._bucket_pairs(plan, "bfloat16", materialize=False))
    params = dict(model.named_parameters())
    assert all(got[n].data_ptr() == params[n].data_ptr() for n in params)  # no copies on gather-only ranks


@pytest.mark.parametrize("zero", [2, 3])
def test_small_bucket_splits_the_tiny_student(tiny_models, monkeypatch, zero):
    """The premise of the GPU tests' SMALL_BUCKET_MB cases, checked on CPU: the learner's send
    (WeightSender.send over the CUDA IPC route, vLLM's side stubbed) cuts the tiny student into >= 2
    buckets (its ``buckets`` is ``sync/buckets``), gathers once per bucket under ZeRO-3, and hands
    vLLM's packed producer more bytes than one buffer holds, so IPC ships several chunks."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    import protege.learners.weight_sender as ws

    walked: dict = {}

    def send_ipc(workers, source, *, rank, version, buffer_bytes):
        walked.update(buffer_bytes=buffer_bytes, pairs=[(n, t.numel() * t.element_size()) for n, t in source])
        return SimpleNamespace(failed=[], results={i: {"version": version, "seconds": 0.0} for i in workers})

    monkeypatch.setattr(ws, "send_ipc", send_ipc)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    sender = _Sender(model, zero_stage=zero)
    sender.init(
        workers=["w"], routes=[{"kind": "ipc", "ranks": [0]}], connect=[], dtype="float32", bucket_mb=SMALL_BUCKET_MB
    )
    out = sender.send(1, [0])
    assert out["failed"] == [] and out["workers"] == {0: {"version": 1, "seconds": 0.0}}
    assert out["buckets"] >= 2
    assert len(sender.gathers) == (out["buckets"] if zero == 3 else 0)
    assert [n for n, _ in walked["pairs"]] == [n for n, _ in model.named_parameters()]
    total = sum(b for _, b in walked["pairs"])
    assert total == out["bytes"] and total > walked["buffer_bytes"] >= SMALL_BUCKET_MB * MB


# ------------------------------------------------------------------------------------ packed (object store)
def test_plan_packed_one_dtype_per_buffer_aligned_and_bounded():
    meta = [
        ("a", [3, 5], "float32"),
        ("b", [7], "bfloat16"),
        ("c", [100], "float32"),
        ("d", [2, 2], "bfloat16"),
        ("e", [1000], "float32"),
    ]
    layout, sizes = plan_packed(meta, bucket_bytes=600)
    assert sorted(n for n, *_ in layout) == sorted(n for n, _, _ in meta)
    by_buf: dict[int, set] = {}
    for _name, shape, dtype, b, off in layout:
        by_buf.setdefault(b, set()).add(dtype)
        assert off % ALIGN == 0 and off + param_bytes(shape, dtype) <= sizes[b]
    assert all(len(d) == 1 for d in by_buf.values())  # one dtype per buffer
    (e_buf,) = [b for n, _, _, b, _ in layout if n == "e"]
    assert sizes[e_buf] == 4000 and [n for n, _, _, b, _ in layout if b == e_buf] == ["e"]  # too big: alone
    for b, size in enumerate(sizes):
        if b != e_buf:
            assert size <= 600 + ALIGN * (sum(1 for x in layout if x[3] == b) - 1)  # data + padding
    # no two tensors overlap in a buffer
    spans = sorted((b, off, off + param_bytes(s, d)) for _, s, d, b, off in layout)
    assert all(x[0] != y[0] or x[2] <= y[1] for x, y in zip(spans, spans[1:]))


def test_pack_and_views_round_trip_in_the_wire_dtype():
    """WeightSender.pack → numpy buffers → tensor_views: the learner's values, no copy on the way in."""
    import numpy as np

    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5))
    sender = WeightSender(lambda: model, rank=0, zero_stage=0)
    for wire in (None, "bfloat16"):
        summary, packed = sender.pack(wire, bucket_mb=100 / MB)  # ~100-byte buffers: several of them
        assert len(packed.buffers) >= 2 and all(
            isinstance(b, np.ndarray) and b.dtype == np.uint8 for b in packed.buffers
        )
        assert summary["wire_bytes"] == packed.nbytes() and summary["numel"] == sum(
            p.numel() for p in model.parameters()
        )
        buffers = [torch.from_numpy(b) for b in packed.buffers]
        views = dict(tensor_views(packed.layout, buffers))
        assert list(views) == [n for n, _ in model.named_parameters()]
        for n, p in model.named_parameters():
            want = p.detach().to(getattr(torch, wire) if wire else p.dtype)
            assert views[n].dtype == want.dtype and torch.equal(views[n], want), n
            base = views[n].untyped_storage().data_ptr()
            assert any(base == b.untyped_storage().data_ptr() for b in buffers)  # a view, not a copy
    assert WeightSender(lambda: model, rank=1, zero_stage=2).pack() == ({}, None)


# ------------------------------------------------------------------------------------ routes
def test_plan_routes_colocated_ipc_else_nccl():
    learners = ["GPU-aaaa", "GPU-bbbb"]
    routes = plan_routes(learners, [["aaaa"], ["cccc"], ["BBBB"], ["cccc", "dddd"]])
    assert routes == [
        {"kind": "ipc", "ranks": [0]},
        {"kind": "nccl", "world_size": 2},
        {"kind": "ipc", "ranks": [1]},
        {"kind": "nccl", "world_size": 3},
    ]


def test_plan_routes_refuses_what_neither_transport_reaches():
    with pytest.raises(NoGpuTransfer, match="rank 0 has no CUDA"):
        plan_routes([None], [["a"]])
    with pytest.raises(NoGpuTransfer, match="worker 1 has no CUDA"):
        plan_routes(["a"], [["b"], [None]])
    with pytest.raises(NoGpuTransfer, match="part of its engine"):
        plan_routes(["a"], [["a", "z"]])  # tensor-parallel engine half on rank 0's GPU


def test_pick_weight_sync_falls_back_on_cpu(tiny_models):
    from protege.cluster.launch import Roles
    from protege.core.spec import parse_spec

    base = {"models": {"student": {"path": tiny_models["student"]}}, "data": {"task": "basic_arithmetic"}}
    spec = parse_spec(base)
    roles = Roles()
    assert isinstance(pick_weight_sync(spec, roles), ObjectStoreSync)
    assert isinstance(pick_weight_sync(spec, roles, mode="object_store"), ObjectStoreSync)
    with pytest.raises(NoGpuTransfer, match="no GPU"):
        pick_weight_sync(spec, roles, mode="nccl")
    with pytest.raises(ValueError):
        pick_weight_sync(spec, roles, mode="rdma")
    hf = parse_spec(
        {**base, "rollout": {"engine": "hf"}, "resources": {"rollout": {"gpus": 1}, "learner": {"gpus": 1}}}
    )
    with pytest.raises(NoGpuTransfer, match="engine"):
        pick_weight_sync(hf, roles, mode="nccl")


def test_modules_import_and_name_the_vllm_api():
    """The vLLM 0.32 names this path relies on exist (CPU build has the same modules)."""
    from vllm import LLM
    from vllm.distributed.weight_transfer.base import WeightSource, WeightTransferEngine

    from protege.actors import weight_receiver
    from protege.learners import weight_sender

    for m in (
        "init_weight_transfer_engine",
        "start_weight_update",
        "update_weights",
        "finish_weight_update",
        "shutdown_weight_transfer_engine",
        "reset_prefix_cache",
        "collective_rpc",
    ):
        assert hasattr(LLM, m), m
    assert {"start_weight_update", "finish_weight_update", "update_weights"} <= set(dir(WeightTransferEngine))
    assert set(weight_receiver._BY_NAME) == {
        m for m in dir(weight_receiver.TransferWorkerExtension) if m.startswith("protege_")
    }
    assert issubclass(weight_sender._bucket_source_cls(), WeightSource)


# ------------------------------------------------------------------------------------ receiver on CPU
_LOOPBACK = "protege_loopback_test"


def _register_loopback() -> None:
    """A test-only vLLM weight-transfer backend: same lifecycle as vLLM's NCCL/IPC engines
    (layerwise reload started, ``model.load_weights`` per chunk, layerwise reload finished), but
    the chunk arrives as safetensors bytes in the update info instead of over NCCL/IPC."""
    from dataclasses import dataclass

    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if _LOOPBACK in WeightTransferEngineFactory._registry:
        return

    @dataclass
    class Init(WeightTransferInitInfo):
        packed: bool = False

    @dataclass
    class Update(WeightTransferUpdateInfo):
        payload: bytes

    class Loopback(WeightTransferEngine):
        init_info_cls, update_info_cls = Init, Update

        def init_transfer_engine(self, init_info):
            self.inits = getattr(self, "inits", 0) + 1

        def start_weight_update(self):
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def finish_weight_update(self):
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info):  # the base class synchronises an accelerator
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, update_info):
            from safetensors.torch import load

            self.model.load_weights(list(load(update_info.payload).items()))

        def shutdown(self):
            pass

    WeightTransferEngineFactory.register_engine(_LOOPBACK, Loopback)


def test_receiver_lifecycle_on_cpu_vllm(tiny_models):
    """The rollout side for real on CPU vLLM (in-process engine): the transfer engine created in the
    worker through collective_rpc, start/update (two chunks)/finish through LLM's RL methods, tied
    lm_head re-tied, prefix cache reset, version stamped. Only the transport is a stand-in."""
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    from protege.actors.engine import HFEngine
    from protege.actors.rollout import RolloutWorker

    _register_loopback()
    worker = RolloutWorker(tiny_models["student"], engine="vllm", max_model_len=128, kv_cache_bytes=64 << 20)
    try:
        prompt, resp = [5, 17, 42, 9, 100], [33, 7, 250, 11]
        before = worker.score(prompt, resp)  # also fills the prefix cache
        hf = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
        assert hf.config.tie_word_embeddings
        torch.manual_seed(1)
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        state = {n: p.detach().contiguous() for n, p in hf.named_parameters()}  # tied: embedding only
        names = list(state)
        chunks = [
            save({n: state[n] for n in names[: len(names) // 2]}),
            save({n: state[n] for n in names[len(names) // 2 :]}),
        ]
        ref = HFEngine(tiny_models["student"])
        ref.model.load_state_dict(state, strict=False)
        ref.model.tie_weights()
        expected = ref.score(prompt, resp)

        info = worker.wt_probe()
        assert info["uuids"] == [None] and info["engine"] == "vllm"  # no CUDA here: the driver would not pick this path
        worker.wt_init(_LOOPBACK, {})
        worker.wt_start()
        for c in chunks:
            worker.wt_update({"payload": c})
        out = worker.wt_finish(7)
        assert out["version"] == 7 and worker.version == 7 and out["seconds"] >= 0
        after = worker.score(prompt, resp)
        assert max(abs(a - b) for a, b in zip(before, expected)) > 1e-2
        assert max(abs(a - b) for a, b in zip(after, expected)) < 1e-3, (after, expected)
        assert worker.engine.llm.get_weight_version() == "7"
        # a second round, and a second init (a re-connect) keeps working
        worker.wt_init(_LOOPBACK, {})
        worker.wt_start()
        worker.wt_update({"payload": save(state)})
        worker.wt_finish(8)
        assert worker.version == 8
        assert max(abs(a - b) for a, b in zip(worker.score(prompt, resp), expected)) < 1e-3
    finally:
        worker.close()


# ------------------------------------------------------------------------------------ orchestration
class FakeLearner:
    def __init__(self, rank, uuid):
        self.rank, self.uuid, self.calls, self.fail, self.lie = rank, uuid, [], [], False

    def nccl_device_uuid(self):
        return self.uuid

    def nccl_rendezvous(self, count):
        self.calls.append(("rendezvous", count))
        return "127.0.0.1", [20000 + i for i in range(count)]

    def nccl_init(self, *, workers, routes, connect, dtype, bucket_mb):
        self.calls.append(("init", [c[0] for c in connect], workers is not None))
        return {}

    def nccl_send(self, version, targets):
        self.calls.append(("send", version, list(targets)))
        if self.rank:
            return None
        failed = [i for i in targets if i in self.fail]
        ok = {i: {"version": version - self.lie, "seconds": 0.01} for i in targets if i not in failed}
        return {"version": version, "failed": failed, "workers": ok, "bytes": 5_000_000, "buckets": 3, "send_s": 0.02}

    def set(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def take_calls(self):
        out, self.calls = self.calls, []
        return out


class FakeWorker:
    def __init__(self, uuid):
        self.uuid, self._pid = uuid, 1000

    def pid(self):
        return self._pid

    def restart(self, uuid=None):
        """A new process, on ``uuid``'s GPU when given (Ray may place it elsewhere)."""
        self._pid += 1
        self.uuid = uuid or self.uuid

    def wt_init(self, backend, init_info):
        return {"backend": backend, "seconds": 0.0}

    def wt_probe(self):
        return {"pid": self._pid, "uuids": [self.uuid], "engine": "vllm"}


class ConnectingLearner(FakeLearner):
    """A FakeLearner whose nccl_init is the real one (WeightSender.init: connect_nccl, vLLM's
    trainer_init; only the CUDA endpoint is stubbed), and that can kill a worker after the push
    checked it."""

    def __init__(self, rank, uuid):
        super().__init__(rank, uuid)
        import vllm.distributed.weight_transfer.nccl_engine as ne

        ne.open_trainer_endpoint = lambda info: ("group", info.master_port)  # in this actor's process only
        self.doomed = None
        self.sender = WeightSender(_tiny_tied_lm, rank=rank, zero_stage=2)

    def nccl_rendezvous(self, count):
        if self.doomed is not None:
            import ray

            _kill(ray, self.doomed)  # after the push's liveness check, before its group opens
            self.doomed = None
        return super().nccl_rendezvous(count)

    def nccl_init(self, **kw):
        super().nccl_init(**kw)
        return self.sender.init(**kw)


@pytest.fixture(scope="module")
def ray_cpu():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # stand-in actors live in this file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _kill(ray, actor) -> None:
    """ray.kill returns before the actor is gone: wait until calls to it fail."""
    ray.kill(actor, no_restart=True)
    for _ in range(200):
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            return
        time.sleep(0.05)
    raise AssertionError("actor still answers after ray.kill")


def test_fanout_client_skips_dead_workers(ray_cpu):
    ray = ray_cpu
    from protege.learners.weight_sender import FanOutGroup, RolloutClient

    @ray.remote(num_cpus=0)
    class W:
        def __init__(self):
            self.log = []

        def wt_init(self, backend, info):
            self.log.append(("init", backend))

        def wt_start(self):
            self.log.append("start")

        def wt_update(self, info):
            self.log.append("update")

        def wt_finish(self, version):
            return {"version": version, "seconds": 0.1}

    ws = [W.remote() for _ in range(3)]
    _kill(ray, ws[1])
    client = RolloutClient(dict(enumerate(ws)), backend="nccl", version=7)
    client.init_weight_transfer_engine({"packed": True})
    client.start_weight_update()
    assert client.failed == [1] and client.live == [0, 2]
    sent = []

    class Comm:
        def __init__(self, i):
            self.i = i

        def broadcast(self, t, src=0, stream=None):
            sent.append(self.i)

    FanOutGroup({i: Comm(i) for i in range(3)}, client).broadcast(torch.zeros(1), src=0)
    assert sent == [0, 2]
    client.update_weights({"names": []})
    client.finish_weight_update()
    assert client.results == {0: {"version": 7, "seconds": 0.1}, 2: {"version": 7, "seconds": 0.1}}


class RecordingWorker:
    """A rollout worker that records the weight-transfer calls it gets."""

    def __init__(self):
        self.calls = []

    def wt_init(self, backend, init_info):
        self.calls.append(("init", backend, init_info))
        return {}

    def wt_start(self):
        self.calls.append(("start",))

    def wt_update(self, info):
        self.calls.append(("update", info))

    def wt_finish(self, version):
        self.calls.append(("finish", version))
        return {"version": version, "seconds": 0.5}

    def get_calls(self):
        return self.calls


class DyingWorker(RecordingWorker):
    """Alive when asked, dies inside its NCCL rendezvous."""

    def wt_init(self, backend, init_info):
        os._exit(1)


def test_send_nccl_drives_vllm_send_weights(ray_cpu, monkeypatch):
    """vLLM's NCCLTrainerWeightTransferEngine.send_weights over the fan-out group and the
    RolloutClient, with the CUDA-stream producer replaced by its CPU equivalent: every live engine
    gets start → update (full metadata) → finish(version), and every packed buffer in turn."""
    ray = ray_cpu
    import vllm.distributed.weight_transfer.nccl_engine as ne
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    from protege.learners.weight_sender import bucket_source, send_nccl

    def producer(iterator, group, src, post_iter_func, buffer_size_bytes, num_buffers):
        while (chunk := pack_tensors(iterator, post_iter_func, buffer_size_bytes)) is not None:
            group.broadcast(chunk.packed_tensor, src=src)

    monkeypatch.setattr(ne, "packed_nccl_broadcast_producer", producer)
    got: dict[int, list] = {0: [], 1: [], 2: []}

    class Comm:
        def __init__(self, i):
            self.i = i

        def broadcast(self, t, src=0, stream=None):
            assert src == 0
            got[self.i].append(t.clone())

    class Eng:
        def __init__(self, i):
            self.model_update_group = Comm(i)

    W = ray.remote(num_cpus=0)(RecordingWorker)
    ws = {i: W.remote() for i in range(3)}
    _kill(ray, ws[1])
    model = _tiny_tied_lm()
    sender = _Sender(model, zero_stage=3)
    meta = wire_meta(model, "bfloat16")
    plan = plan_buckets(meta, 2048)
    src = bucket_source(meta, lambda: sender._bucket_pairs(plan, "bfloat16", materialize=True))
    client = send_nccl({i: Eng(i) for i in ws}, ws, src, is_sender=True, version=9, bucket_bytes=4096)
    assert client.failed == [1] and client.results == {
        0: {"version": 9, "seconds": 0.5},
        2: {"version": 9, "seconds": 0.5},
    }
    assert len(sender.gathers) == len(plan)
    calls = ray.get(ws[0].get_calls.remote())
    assert [c[0] for c in calls] == ["start", "update", "finish"] and calls[2] == ("finish", 9)
    info = calls[1][1]
    assert info["names"] == [n for n, _, _ in meta] and set(info["dtype_names"]) == {"bfloat16"}
    assert info["shapes"] == [s for _, s, _ in meta]
    assert got[1] == [] and len(got[0]) > 1 and all(torch.equal(a, b) for a, b in zip(got[0], got[2]))
    wire = torch.cat([p.detach().to(torch.bfloat16).reshape(-1).view(torch.uint8) for _, p in model.named_parameters()])
    assert torch.equal(torch.cat(got[0]), wire)
    # other ranks only walk the source (their ZeRO-3 gathers), no client, no group
    assert send_nccl({}, {}, src, is_sender=False, version=9, bucket_bytes=4096) is None
    assert len(sender.gathers) == 2 * len(plan)


def test_connect_nccl_ships_the_wire_parameters(ray_cpu, monkeypatch):
    """What the rollout worker receives at the handshake (rank offset, world size, packed buffer
    size) comes from vLLM's NCCLTrainerInitInfo; the CUDA endpoint itself is stubbed."""
    ray = ray_cpu
    import vllm.distributed.weight_transfer.nccl_engine as ne

    from protege.learners.weight_sender import connect_nccl

    monkeypatch.setattr(ne, "open_trainer_endpoint", lambda info: ("group", info.master_port, info.world_size))
    w = ray.remote(num_cpus=0)(RecordingWorker).remote()
    eng = connect_nccl(w, address="10.0.0.5", port=29555, world_size=2, bucket_bytes=64 * MB)
    assert eng.model_update_group == ("group", 29555, 2) and eng.packed_buffer_size_bytes == 64 * MB
    ((kind, backend, info),) = ray.get(w.get_calls.remote())
    assert (kind, backend) == ("init", "nccl")
    assert info == {
        "master_address": "10.0.0.5",
        "master_port": 29555,
        "rank_offset": 1,
        "world_size": 2,
        "packed": True,
        "packed_buffer_size_bytes": 64 * MB,
        "packed_num_buffers": 2,
    }


def test_connect_nccl_refuses_a_dead_worker_at_once(ray_cpu, monkeypatch):
    """A worker already dead when its group would open: WorkerGone at once, and rank 0 never enters
    the rendezvous (where it would wait out vLLM's 300 s store timeout for the missing peer)."""
    ray = ray_cpu
    import vllm.distributed.weight_transfer.nccl_engine as ne

    from protege.learners.weight_sender import WorkerGone, connect_nccl

    opened = []
    monkeypatch.setattr(ne, "open_trainer_endpoint", lambda info: opened.append(info.master_port) or "group")
    w = ray.remote(num_cpus=0)(RecordingWorker).remote()
    _kill(ray, w)
    t0 = time.monotonic()
    with pytest.raises(WorkerGone, match="dead"):
        connect_nccl(w, address="10.0.0.5", port=29555, world_size=2, bucket_bytes=64 * MB)
    assert opened == [] and time.monotonic() - t0 < 30


def test_connect_nccl_reports_a_worker_that_dies_while_joining(ray_cpu, monkeypatch):
    """Alive at the check, dead in the rendezvous: rank 0's store timeout becomes WorkerGone (the
    push lists the worker in ``failed``) instead of an error that fails the push for everyone."""
    ray = ray_cpu
    import vllm.distributed.weight_transfer.nccl_engine as ne

    from protege.learners.weight_sender import WorkerGone, connect_nccl

    def store_timeout(info):
        raise RuntimeError("Timed out after 300 seconds waiting for clients. 1/2 clients joined.")

    monkeypatch.setattr(ne, "open_trainer_endpoint", store_timeout)
    w = ray.remote(num_cpus=0)(DyingWorker).remote()
    with pytest.raises(WorkerGone, match="while joining"):
        connect_nccl(w, address="10.0.0.5", port=29555, world_size=2, bucket_bytes=64 * MB)
    # without a dead peer the store's error is the learner's own problem, and is not hidden
    live = ray.remote(num_cpus=0)(RecordingWorker).remote()
    with pytest.raises(RuntimeError, match="Timed out") as err:
        connect_nccl(live, address="10.0.0.5", port=29556, world_size=2, bucket_bytes=64 * MB)
    assert not isinstance(err.value, WorkerGone)


def test_nccl_init_connects_the_live_workers_and_lists_the_dead(ray_cpu, monkeypatch):
    """Rank 0 opens a group with every live worker and lists a dead one in ``failed``; a worker
    that comes back colocated (IPC) loses its old NCCL group."""
    ray = ray_cpu
    import vllm.distributed.weight_transfer.nccl_engine as ne

    monkeypatch.setattr(ne, "open_trainer_endpoint", lambda info: ("group", info.master_port))
    W = ray.remote(num_cpus=0)(RecordingWorker)
    ws = [W.remote(), W.remote()]
    _kill(ray, ws[0])
    sender = _Sender(_tiny_tied_lm())
    routes = [{"kind": "nccl", "world_size": 2}] * 2
    out = sender.init(
        workers=ws, routes=routes, connect=[(0, "h", 29601), (1, "h", 29602)], dtype="float32", bucket_mb=1
    )
    assert out["failed"] == [0] and out["connected"] == [1]
    assert list(sender.engines) == [1] and sender.engines[1].model_update_group == ("group", 29602)
    sender.init(
        workers=None, routes=[routes[0], {"kind": "ipc", "ranks": [0]}], connect=[], dtype="float32", bucket_mb=1
    )
    assert sender.engines == {}


def test_push_reports_a_worker_that_dies_before_its_group_opens(ray_cpu):
    """A worker alive when the push starts but dead when rank 0 opens its NCCL group is listed in
    ``failed``, fast; the other workers get the weights and keep their groups."""
    ray = ray_cpu
    L, W = ray.remote(num_cpus=0)(ConnectingLearner), ray.remote(num_cpus=0)(FakeWorker)
    learner = L.remote(0, "GPU-a")
    workers = [W.remote("x"), W.remote("y"), W.remote("a")]  # 0, 1 over NCCL; 2 colocated (IPC)
    sync = NcclWeightSync([learner], workers, zero_stage=2, dtype="float32", timeout_s=60)
    ray.get(learner.set.remote(doomed=workers[0]))
    t0 = time.monotonic()
    res = sync.push(1)
    m = res.metrics
    assert time.monotonic() - t0 < 30
    assert res.failed == [0]
    calls = ray.get(learner.take_calls.remote())
    assert ("init", [0, 1], True) in calls and calls[-1] == ("send", 1, [1, 2])
    assert (m["sync/ipc_workers"], m["sync/nccl_workers"]) == (1, 1)
    assert sync.push(2).failed == [0]
    assert ray.get(learner.take_calls.remote()) == [("send", 2, [1, 2])]  # worker 1's group kept


def test_restarted_worker_is_probed_for_its_new_route(ray_cpu):
    """A worker that restarts on another GPU gets the route of its new GPU, whether or not a push
    lost it first (a lost worker leaves the pid table; it used to keep its old route)."""
    ray = ray_cpu
    L, W = ray.remote(num_cpus=0)(FakeLearner), ray.remote(num_cpus=0)(FakeWorker)
    learner = L.remote(0, "GPU-a")
    workers = [W.remote("x"), W.remote("y")]
    sync = NcclWeightSync([learner], workers, zero_stage=2, dtype="float32", timeout_s=60)
    sync.push(1)
    assert [r["kind"] for r in sync.routes] == ["nccl", "nccl"]

    ray.get(learner.set.remote(fail=[1]))
    assert sync.push(2).failed == [1]
    ray.get(learner.set.remote(fail=[]))
    ray.get(workers[1].restart.remote("a"))  # back on learner rank 0's GPU
    ray.get(learner.take_calls.remote())
    res = sync.push(2, targets=[1])
    m = res.metrics
    assert res.failed == [] and sync.routes[1] == {"kind": "ipc", "ranks": [0]}
    assert (m["sync/ipc_workers"], m["sync/nccl_workers"]) == (1, 0)
    calls = ray.get(learner.take_calls.remote())
    assert ("init", [], True) in calls and ("rendezvous", 1) not in calls  # new routes, no NCCL group

    ray.get(workers[1].restart.remote("z"))  # restarted between pushes, never lost: off the learner's GPU
    res = sync.push(3)
    m = res.metrics
    assert res.failed == [] and sync.routes[1] == {"kind": "nccl", "world_size": 2}
    assert (m["sync/ipc_workers"], m["sync/nccl_workers"]) == (0, 2)
    assert ("init", [1], True) in ray.get(learner.take_calls.remote())


def test_push_orchestration(ray_cpu):
    """First push opens NCCL groups for the NCCL-routed workers only; later pushes reuse them; a
    restarted worker gets its group again; failures map to indices into ``targets``; every push
    returns a SyncResult."""
    ray = ray_cpu
    L, W = ray.remote(num_cpus=0)(FakeLearner), ray.remote(num_cpus=0)(FakeWorker)
    learners = [L.remote(0, "GPU-a"), L.remote(1, "GPU-b")]
    workers = [W.remote("a"), W.remote("x"), W.remote("y")]  # 0 colocated with rank 0; 1, 2 elsewhere
    sync = NcclWeightSync(learners, workers, zero_stage=3, dtype="bfloat16", bucket_mb=64)
    assert [r["kind"] for r in sync.probe()] == ["ipc", "nccl", "nccl"]

    res = sync.push(1)
    assert isinstance(res, SyncResult) and res.version == 1 and res.bytes == 5_000_000
    assert res.seconds >= 0 and res.metrics["sync/seconds"] == res.seconds
    m = res.metrics
    calls0, calls1 = (ray.get(ln.take_calls.remote()) for ln in learners)
    assert ("rendezvous", 2) in calls0
    assert ("init", [1, 2], True) in calls0 and (
        "init",
        [],
        False,
    ) in calls1  # rank 0 connects, all ranks learn the routes
    assert calls0[-1] == ("send", 1, [0, 1, 2]) and calls1[-1] == ("send", 1, [0, 1, 2])
    assert res.failed == [] and m["sync/mbytes"] == 5.0 and m["sync/buckets"] == 3
    assert (m["sync/ipc_workers"], m["sync/nccl_workers"]) == (1, 2) and m["sync/seconds"] > 0

    sync.push(2)
    assert [c[0] for c in ray.get(learners[0].take_calls.remote())] == ["send"]  # groups reused

    ray.get(workers[2].restart.remote())
    sync.push(3)
    calls0 = ray.get(learners[0].take_calls.remote())
    assert ("init", [2], True) in calls0 and ("rendezvous", 1) in calls0

    ray.get(learners[0].set.remote(fail=[1]))
    assert sync.push(4).failed == [1]
    ray.get(learners[0].set.remote(fail=[]))
    res = sync.push(4, targets=[1])  # the driver's re-sync of one worker
    calls0 = ray.get(learners[0].take_calls.remote())
    assert ("init", [1], True) in calls0 and calls0[-1] == ("send", 4, [1])
    assert res.failed == []

    _kill(ray, workers[0])
    res = sync.push(5, targets=[2, 0])
    assert res.failed == [1]  # index into the targets passed
    assert res.bytes > 0 and res.seconds >= 0
    assert ray.get(learners[0].take_calls.remote())[-1] == ("send", 5, [2])

    ray.get(learners[0].set.remote(lie=True))
    with pytest.raises(RuntimeError, match="other versions"):
        sync.push(6, targets=[1])
    with pytest.raises(ValueError, match="not indices"):
        sync.push(6, targets=[3])


def test_first_push_with_a_dead_worker(ray_cpu):
    """A worker that is down at the first push is reported, and the others are served."""
    ray = ray_cpu
    L, W = ray.remote(num_cpus=0)(FakeLearner), ray.remote(num_cpus=0)(FakeWorker)
    learner = L.remote(0, "GPU-a")
    workers = [W.remote("x"), W.remote("y")]
    _kill(ray, workers[0])
    sync = NcclWeightSync([learner], workers, zero_stage=2, dtype="float32")
    assert sync.push(1).failed == [0]
    calls = ray.get(learner.take_calls.remote())
    assert ("init", [1], True) in calls and calls[-1] == ("send", 1, [1])
    assert sync.routes[0] is None and sync.routes[1]["kind"] == "nccl"
    with pytest.raises(RuntimeError, match="did not answer"):
        NcclWeightSync([learner], workers, zero_stage=2, dtype="float32").probe()


class ExportingLearner:
    """Learner rank 0's pack_weights, over two fixed float32 tensors (the real WeightSender.pack)."""

    def __init__(self):
        from protege.learners.weight_sender import WeightSender

        self.model = torch.nn.Linear(4, 8)
        self.sender = WeightSender(lambda: self.model, rank=0, zero_stage=0)
        self.calls = []

    def pack_weights(self, wire_dtype=None, bucket_mb=512.0):
        self.calls.append((wire_dtype, bucket_mb))
        return self.sender.pack(wire_dtype, bucket_mb)

    def take_calls(self):
        return self.calls


class LoadingWorker:
    """A rollout worker's receiver over an engine stand-in that keeps what it was given (float32)."""

    def __init__(self):
        from protege.actors.weight_receiver import WeightReceiver

        class Engine:
            dtype = "float32"
            loaded = None

            def load_tensors(self, named):
                self.loaded = {n: t.clone() for n, t in named}
                return 0.01

        self.receiver = WeightReceiver(Engine(), "hf")

    @property
    def version(self):
        return self.receiver.version

    def load_weights(self, weights, packed=None):
        return self.receiver.load(weights, packed)

    def loaded(self):
        return self.receiver.engine.loaded

    def get_version(self):
        return self.version


def test_object_store_push_returns_a_sync_result(ray_cpu):
    """ObjectStoreSync.push against stand-in actors: a SyncResult with the bytes the workers hold
    (the tensors in the receivers' dtype, float32 here, whatever the wire dtype: bfloat16), the
    sync/* split, the values as the learner had them, and a target that is dead listed in
    ``failed`` by its index into ``targets``."""
    ray = ray_cpu
    learner = ray.remote(num_cpus=0)(ExportingLearner).remote()
    workers = [ray.remote(num_cpus=0)(LoadingWorker).remote() for _ in range(3)]
    sync = ObjectStoreSync([learner], workers, zero_stage=2, dtype="float32", wire_dtype="bfloat16", bucket_mb=1.0)
    res = sync.push(1)
    assert isinstance(res, SyncResult) and res.version == 1 and res.failed == []
    assert res.bytes == (4 * 8 + 8) * 4 and res.seconds >= 0 and res.metrics["sync/seconds"] == res.seconds
    assert set(res.metrics) == {
        "sync/seconds",
        "sync/export_s",
        "sync/pack_s",
        "sync/transfer_s",
        "sync/unpack_s",
        "sync/load_s",
        "sync/mbytes",
        "sync/mb_per_s",
    }
    assert 0 < res.metrics["sync/mbytes"] * 1e6 < res.bytes  # bfloat16 on the wire (aligned buffers)
    assert ray.get(learner.take_calls.remote()) == [("bfloat16", 1.0)]
    got = ray.get(workers[0].loaded.remote())
    assert {n: t.dtype for n, t in got.items()} == {"weight": torch.bfloat16, "bias": torch.bfloat16}
    assert [tuple(got["weight"].shape), tuple(got["bias"].shape)] == [(8, 4), (8,)]
    assert ray.get([w.get_version.remote() for w in workers]) == [1, 1, 1]
    _kill(ray, workers[1])
    res = sync.push(2, targets=[2, 1])
    assert res.failed == [1] and res.bytes > 0 and res.seconds >= 0  # index into the targets passed
    assert ray.get([workers[0].get_version.remote(), workers[2].get_version.remote()]) == [1, 2]
    with pytest.raises(ValueError, match="not indices"):
        sync.push(3, targets=[3])


# ------------------------------------------------------------------------------------ GPU
STUDENT_SPEC = {
    "data": {"task": "basic_arithmetic", "size": 20, "eval_size": 2},
    "algorithm": {"type": "grpo"},
    "eval": {"size": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_classes():
    import ray

    from protege.actors.rollout import RolloutWorker
    from protege.learners.learner import Learner

    return ray.remote(Learner), ray.remote(RolloutWorker)


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {
        "DS_ACCELERATOR": "cuda",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "4",
        "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
    }
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


def _record(name: str, metrics: dict) -> None:
    out = os.environ.get("PROTEGE_BENCH_OUT")
    print(f"[{name}] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "gpu_sync.jsonl", "a") as f:
            f.write(json.dumps({"test": name, "time": time.time(), **metrics}) + "\n")


def _sync_roundtrip(ray, tiny_models, *, zero: int, gpus: float, kind: str, bucket_mb: float, name: str):
    from protege.core.records import TrainBatch, TrainRow
    from protege.core.spec import parse_spec

    spec = parse_spec(
        {
            **STUDENT_SPEC,
            "models": {"student": {"path": tiny_models["student"]}},
            "learner": {"ranks": 1, "zero_stage": zero, "lr": 1e-3, "micro_batch": 4},
        }
    )
    LA, RA = _gpu_classes()
    worker = RA.options(num_gpus=gpus, num_cpus=1).remote(
        tiny_models["student"], engine="vllm", dtype="float32", seed=0, max_model_len=256
    )
    ray.get(worker.get_version.remote())  # vLLM sizes its memory before the learner takes any
    learner = LA.options(num_gpus=gpus, num_cpus=1).remote(
        rank=0,
        world_size=1,
        model_path=tiny_models["student"],
        learner_spec=spec.learner,
        algo=spec.algorithm,
        temperature=1.0,
        grad_accum=1,
    )
    ray.get(learner.setup.remote("127.0.0.1", _free_port()))
    sync = NcclWeightSync([learner], [worker], zero_stage=zero, dtype="float32", bucket_mb=bucket_mb)
    try:
        assert [r["kind"] for r in sync.probe()] == [kind]
        prompt, resp = [5, 17, 42, 9, 100], [33, 7, 250, 11]
        before = ray.get(worker.score.remote(prompt, resp))
        rows = [
            TrainRow(prompt_ids=prompt, response_ids=resp, advantage=1.0),
            TrainRow(prompt_ids=prompt, response_ids=[8, 8, 8, 8], advantage=-1.0),
        ]
        timings = []
        for version in (1, 2):
            for _ in range(3):
                ray.get(learner.train_step.remote(TrainBatch(rows, 0)))
            ours = ray.get(learner.logprobs.remote(prompt, resp))
            res = sync.push(version)
            m = res.metrics
            theirs = ray.get(worker.score.remote(prompt, resp))
            assert ray.get(worker.get_version.remote()) == version
            assert res.failed == [] and res.bytes > 0
            if version == 1:
                assert max(abs(a - b) for a, b in zip(ours, before)) > 1e-2  # training moved the policy
            assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3, (ours, theirs)
            assert m["sync/mbytes"] > 0 and m["sync/buckets"] >= (2 if bucket_mb <= SMALL_BUCKET_MB else 1)
            assert m[f"sync/{kind}_workers"] == 1
            timings.append(m)
        _record(
            name,
            {**{f"first/{k}": v for k, v in timings[0].items()}, **{f"steady/{k}": v for k, v in timings[1].items()}},
        )
    finally:
        sync.close()
        for actor in (worker, learner):
            try:
                ray.get(actor.close.remote(), timeout=120)  # stops vLLM's engine core (else /dev/shm leaks)
            except Exception:
                pass
            ray.kill(actor)


@pytest.mark.gpu
@pytest.mark.parametrize("zero,bucket_mb", [(2, SMALL_BUCKET_MB), (3, SMALL_BUCKET_MB), (2, 512)])
def test_ipc_sync_colocated_matches_learner_logprobs(tiny_models, ray_gpu, zero, bucket_mb):
    """1 learner rank + 1 vLLM engine on one GPU: CUDA IPC, several packed buffers when the bucket
    is SMALL_BUCKET_MB (the tiny student is ~0.41 MiB), one at 512 MB; tied embeddings re-tied,
    prefix cache reset."""
    _sync_roundtrip(
        ray_gpu,
        tiny_models,
        zero=zero,
        gpus=0.4,
        kind="ipc",
        bucket_mb=bucket_mb,
        name=f"ipc_zero{zero}_bucket{bucket_mb}mb",
    )


@pytest.mark.gpu
@pytest.mark.parametrize("zero", [2, 3])
def test_nccl_sync_two_gpus_matches_learner_logprobs(tiny_models, ray_gpu, zero):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs the learner and the engine on different GPUs (one GPU here)")
    _sync_roundtrip(
        ray_gpu, tiny_models, zero=zero, gpus=1, kind="nccl", bucket_mb=SMALL_BUCKET_MB, name=f"nccl_zero{zero}"
    )


@pytest.mark.gpu
def test_pipeline_on_gpu_uses_the_gpu_sync(tmp_path, tiny_models, ray_gpu):
    """The whole loop on one GPU (colocated), once the driver uses pick_weight_sync."""
    from protege.cluster.driver import run
    from protege.core.spec import parse_spec

    spec = parse_spec(
        {
            **STUDENT_SPEC,
            "name": "gpu",
            "steps": 3,
            "models": {"student": {"path": tiny_models["student"]}},
            "data": {
                "task": "basic_arithmetic",
                "size": 200,
                "eval_size": 8,
                "task_config": {
                    "min_terms": 2,
                    "max_terms": 2,
                    "min_digits": 1,
                    "max_digits": 1,
                    "operators": ["+"],
                    "allow_negation": False,
                    "allow_parentheses": False,
                },
            },
            "rollout": {"samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 8},
            "learner": {"ranks": 1, "zero_stage": 2, "lr": 1e-3, "micro_batch": 4},
            "resources": {"rollout": {"gpus": 0.4}, "learner": {"gpus": 0.4}},
            "checkpoint": {"dir": str(tmp_path / "gpu"), "interval": 10},
            "eval": {"interval": 10, "size": 8},
        }
    )
    run(spec, progress=False)
    rows = [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    if "sync/ipc_workers" not in rows[1]:
        pytest.skip("the driver still builds ObjectStoreSync (wire pick_weight_sync into cluster/driver.py)")
    assert all(r["rollout/logprob_mismatch"] < 1e-3 for r in rows[1:])
    _record(
        "pipeline_gpu",
        {
            k: float(v)
            for k, v in rows[-1].items()
            if k.startswith(("sync/", "time/")) and isinstance(v, (int, float)) and math.isfinite(v)
        },
    )
