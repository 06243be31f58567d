"""The learner's train step without DeepSpeed: micro-batch exactness, π_old reuse, devices.

The step is driven through ``Learner.attach`` with ``DeepSpeedLike``, a plain module with
DeepSpeed's three calls and their semantics: ``backward`` scales the loss by 1/grad_accum
(``scale_wrt_gas``), ``step`` applies the optimizer only at the accumulation boundary, and data
parallelism averages the ranks' gradients (done here by the test). The same step runs under real
DeepSpeed in the pipeline tests.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from protege.core import spec as S
from protege.core.records import TrainBatch, TrainRow
from protege.learners.batching import collate, shard_rows, to_device
from protege.learners.learner import Learner, has_active_dropout

V, H, K = 32, 16, 4


class TinyLM(torch.nn.Module):
    """A causal LM small enough to compare gradients exactly: logits_t depend on tokens ≤ t."""

    def __init__(self, seed: int = 0, dropout: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, H, generator=g, dtype=torch.float32) * 0.5)
        self.out = torch.nn.Parameter(torch.randn(H, V, generator=g, dtype=torch.float32) * 0.5)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, input_ids, attention_mask):
        x = self.emb[input_ids] * attention_mask[..., None]
        ctx = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return type("Out", (), {"logits": self.drop(torch.tanh(ctx)) @ self.out})()


class _Body(torch.nn.Module):
    def __init__(self, emb, drop):
        super().__init__()
        self.emb, self.drop = emb, drop

    def forward(self, input_ids, attention_mask):
        x = self.emb[input_ids] * attention_mask[..., None]
        ctx = x.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return type("Out", (), {"last_hidden_state": self.drop(torch.tanh(ctx))})()


class _Head(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, h):
        return h @ self.w


class TinySplitLM(torch.nn.Module):
    """TinyLM (the same parameters, in the same order) with the decoder/lm_head split of a
    Hugging Face causal LM: ``get_decoder``, ``get_output_embeddings`` and ``logits_to_keep``,
    which is what the chunked log-prob path (learner.logprob_chunk) uses."""

    def __init__(self, seed: int = 0, dropout: float = 0.0):
        super().__init__()
        ref = TinyLM(seed, dropout)
        self.body, self.head = _Body(ref.emb, ref.drop), _Head(ref.out)

    def get_decoder(self):
        return self.body

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask, logits_to_keep: int = 0):
        h = self.body(input_ids, attention_mask).last_hidden_state
        return type("Out", (), {"logits": self.head(h[:, -logits_to_keep:] if logits_to_keep else h)})()


class DeepSpeedLike(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, grad_accum: int, lr: float = 0.0):
        super().__init__()
        self.module, self.gas, self.lr, self.micro = model, grad_accum, lr, 0

    def forward(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        (loss / self.gas).backward()

    def step(self):
        self.micro += 1
        if self.lr and self.micro % self.gas == 0:
            with torch.no_grad():
                for p in self.module.parameters():
                    p -= self.lr * p.grad
                    p.grad = None

    def get_global_grad_norm(self):
        return None


def _rows(n: int, seed: int, *, teacher: bool, pairs: bool = False) -> list[TrainRow]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        P, R = rnd.randint(2, 5), rnd.randint(1, 7)  # uneven lengths: micro-batches pad differently
        kw = {}
        if teacher:
            kw = dict(
                teacher_logprobs=[-rnd.uniform(0.1, 4) for _ in range(R)],
                teacher_topk_ids=[rnd.sample(range(V), K) for _ in range(R)],
                teacher_topk_logprobs=[
                    sorted((-rnd.uniform(1.5, 5) for _ in range(K)), reverse=True) for _ in range(R)
                ],
                teacher_tail_logprobs=[-rnd.uniform(0.1, 1) for _ in range(R)],
                teacher_full_logprobs=torch.randn(
                    R, V, generator=torch.Generator().manual_seed(seed * 100 + i), dtype=torch.float32
                ).log_softmax(-1),
            )
        rows.append(
            TrainRow(
                prompt_ids=[rnd.randrange(1, V) for _ in range(P)],
                response_ids=[rnd.randrange(1, V) for _ in range(R)],
                advantage=0.0 if pairs else rnd.uniform(-1.5, 1.5),
                gate=float(i % 3 == 0),
                rollout_logprobs=[-rnd.uniform(0.1, 3) for _ in range(R)],
                ref_seq_logprob=-rnd.uniform(5, 20) if pairs else None,
                **kw,
            )
        )
    return rows


ALGOS = {
    "grpo-token-mean": S.GRPOSpec(),
    "grpo-seq-mean": S.GRPOSpec(loss_agg="seq-mean-token-mean"),
    "grpo-sum-norm": S.GRPOSpec(loss_agg="seq-mean-token-sum-norm"),
    "grpo-stale-tis": S.GRPOSpec(max_staleness=1),
    "rlad": S.RLADSpec(alpha=0.5),
    "rlad-gate": S.RLADSpec(alpha=0.5, trust_region="gate"),
    "kepo-reverse-kl": S.KEPOSpec(),
    "kepo-jsd": S.KEPOSpec(divergence="jsd"),
    "opd": S.OPDSpec(),
    "opd+grpo": S.OPDSpec(grpo_coef=0.5),
    "opd-topk": S.OPDSpec(estimator="topk"),
    "opd-full+grpo": S.OPDSpec(estimator="full", grpo_coef=0.5),
    "kepo-forward-kl-topk-tail": S.KEPOSpec(divergence="forward_kl", estimator="topk"),
    "kepo-full": S.KEPOSpec(estimator="full"),
    "dpo": S.DPOSpec(reference="teacher"),
    "sft": S.SFTSpec(),
    "distill-topk": S.DistillSpec(top_k=K),
    "distill-full-jsd": S.DistillSpec(estimator="full", divergence="jsd"),
}


def _learner(
    algo,
    *,
    model,
    grad_accum: int,
    rank: int = 0,
    world: int = 1,
    updates: int = 1,
    lr: float = 0.0,
    device="cpu",
    mini: int = 1,
    chunk: int | None = None,
    tokens: int | None = None,
) -> Learner:
    spec = S.LearnerSpec(updates_per_step=updates, mini_batches=mini, logprob_chunk=chunk, micro_batch_tokens=tokens)
    ln = Learner(
        rank=rank,
        world_size=world,
        model_path="",
        learner_spec=spec,
        algo=algo,
        temperature=1.0,
        grad_accum=grad_accum,
        max_response_tokens=8,
    )
    ln.attach(DeepSpeedLike(model, grad_accum, lr), device=device, pad_id=0)
    return ln


def _run(algo, rows, *, micro: int, ranks: int, pairs: bool, chunk: int | None = None, tokens: int | None = None):
    """One train step split over ``ranks`` simulated ranks × ``micro`` micro-batches each. Returns
    the global loss and the gradient data parallelism would apply (the ranks' mean). ``chunk``:
    chunked log-probs on TinySplitLM (the same weights); ``tokens``: a micro-batch token budget."""
    base = TinySplitLM() if chunk else TinyLM()
    shards = shard_rows(rows, ranks, group=2 if pairs else 1)
    learners = [
        _learner(algo, model=copy.deepcopy(base), grad_accum=micro, rank=r, world=ranks, chunk=chunk, tokens=tokens)
        for r in range(ranks)
    ]
    for ln in learners:
        ln.all_reduce_sum = lambda t: t  # the simulated ranks' all-reduces are done by hand below
    mbs = [ln.prepare(TrainBatch(rows=s, policy_version=0, pairs=pairs)) for ln, s in zip(learners, shards)]
    local = [ln.global_counts(m) for ln, m in zip(learners, mbs)]
    counts = [{k: sum(c[j][k] for c in local) for k in local[0][j]} for j in range(len(local[0]))]
    out = [ln.run_updates(m, counts) for ln, m in zip(learners, mbs)]
    loss = sum(o["loss/total"] for o in out)
    grads = [torch.cat([p.grad.flatten() for p in ln.engine.module.parameters()]) for ln in learners]
    return loss, sum(grads) / ranks


@pytest.mark.parametrize("name", list(ALGOS))
def test_micro_batch_split_gives_the_same_loss_and_gradients(name):
    """The same 12 rows (uneven lengths, gates, teacher top-k) in 1, 2 and 4 micro-batches on one
    rank, and 2 ranks × 2 micro-batches: loss and gradients equal to float32 rounding. Before
    the (sum, count) terms KEPO's distillation term was a mean per micro-batch re-weighted by
    token share, and two micro-batches gave half the whole-batch value."""
    algo = ALGOS[name]
    pairs = algo.type == "dpo"
    rows = _rows(12, seed=3, teacher=True, pairs=pairs)
    ref_loss, ref_grad = _run(algo, rows, micro=1, ranks=1, pairs=pairs)
    assert ref_grad.abs().sum() > 0
    # (micro-batches per rank, ranks, logprob_chunk, micro_batch_tokens): the chunked log-probs
    # (5 positions a chunk, so rows span chunks) and the token-budget packing (sorted rows,
    # uneven micro-batches) must give the same loss and gradients as the whole batch at once.
    for micro, ranks, chunk, tokens in (
        (2, 1, None, None),
        (4, 1, None, None),
        (2, 2, None, None),
        (1, 2, None, None),
        (1, 1, 5, None),
        (3, 1, None, 40),
        (4, 1, 5, 24),
        (2, 2, 3, 30),
    ):
        loss, grad = _run(algo, rows, micro=micro, ranks=ranks, pairs=pairs, chunk=chunk, tokens=tokens)
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-7), (
            micro,
            ranks,
            chunk,
            tokens,
            float(loss),
            float(ref_loss),
        )
        tol = 1e-5 * float(ref_grad.abs().max())
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=tol), (
            micro,
            ranks,
            chunk,
            tokens,
            (grad - ref_grad).abs().max(),
        )


def test_kepo_distill_term_is_normalised_by_the_global_gated_count():
    """Hand check of the KEPO fix: with gates open on rows 0 and 3 only, split into 2 micro-batches
    of 3 rows, the distill metric of the whole batch equals Σ D·m·g / Σ m·g over both, which is
    what the summed micro-batch terms give (and not the mean of the two micro-batch means)."""
    rows = _rows(6, seed=5, teacher=True)
    algo = S.KEPOSpec(distill_coef=1.0)
    whole, _ = _run(algo, rows, micro=1, ranks=1, pairs=False)
    split, _ = _run(algo, rows, micro=2, ranks=1, pairs=False)
    assert torch.allclose(whole, split, rtol=1e-5)


@pytest.mark.parametrize("name", ["grpo-token-mean", "rlad", "kepo-jsd", "opd+grpo"])
def test_old_logprobs_from_the_training_forward_change_nothing(name):
    """π_old taken from the first training forward (detached) instead of a separate eval-mode
    forward: same loss/metrics and the same weights after two updates per batch (SGD), so π_old
    stays the step's starting weights on the second pass too."""
    rows = _rows(8, seed=7, teacher=True)
    results = []
    for reuse in (True, False):
        ln = _learner(ALGOS[name], model=TinyLM(), grad_accum=2, updates=2, lr=0.5)
        ln.old_from_training_forward = reuse
        mbs = ln.prepare(TrainBatch(rows=rows, policy_version=0))
        assert all(("old_logprobs" in b) != reuse for b in mbs)  # no separate forward when reused
        m = ln.run_updates(mbs, ln.global_counts(mbs))
        results.append((m, torch.cat([p.detach().flatten() for p in ln.engine.module.parameters()])))
    (m1, w1), (m2, w2) = results
    assert torch.allclose(w1, w2, atol=1e-6)
    assert set(m1) == set(m2) and all(torch.allclose(m1[k], m2[k], atol=1e-6) for k in m1)


def test_dropout_turns_the_reuse_off():
    assert not has_active_dropout(TinyLM())
    assert has_active_dropout(TinyLM(dropout=0.1))
    ln = _learner(ALGOS["grpo-token-mean"], model=TinyLM(dropout=0.1), grad_accum=1)
    assert ln.old_from_training_forward is False


def test_to_device_moves_every_field():
    b = collate(_rows(3, seed=1, teacher=True), pad_id=0)
    moved = to_device(b, "meta")
    assert set(moved) == set(b) and all(t.device.type == "meta" for t in moved.values())


@pytest.mark.parametrize("name", list(ALGOS))
def test_train_step_keeps_every_tensor_on_the_learner_device(name):
    """The whole step (collate, π_old, counts, loss, backward, metrics) with the model on the
    ``meta`` device: any tensor left on the CPU raises "Tensor on device cpu is not on the
    expected device meta", as it would with CUDA. This is what caught rollout_logprobs and mask
    left on the CPU beside old_logprobs on the device (the first GPU step of every GRPO job)."""
    algo = ALGOS[name]
    pairs = algo.type == "dpo"
    model = TinyLM().to("meta")
    ln = _learner(algo, model=model, grad_accum=2, updates=2, device="meta")
    if getattr(algo, "kl_coef", 0) > 0 or (pairs and algo.reference == "initial"):
        ln.ref = copy.deepcopy(model)
    mbs = ln.prepare(TrainBatch(rows=_rows(6, seed=2, teacher=True, pairs=pairs), policy_version=0, pairs=pairs))
    metrics = ln.run_updates(mbs, ln.global_counts(mbs))
    assert metrics and all(v.device.type == "meta" for v in metrics.values())
    if not pairs and algo.type != "sft":
        assert "rollout/logprob_mismatch" in metrics


def test_losses_detach_their_constant_inputs():
    """A caller passing old/teacher/ref log-probs that still require grad gets no gradient into
    them (the losses detach every input but the student's log-probs)."""
    from protege.learners import losses

    lp = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    old, teacher, ref = (torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    adv = torch.randn(2, dtype=torch.float64, requires_grad=True)
    inp = losses.LossInputs(
        logprobs=lp,
        old_logprobs=old,
        mask=torch.ones(2, 3, dtype=torch.float64),
        advantages=adv,
        teacher_logprobs=teacher,
        ref_logprobs=ref,
        gate=torch.ones(2, dtype=torch.float64),
    )
    for fn in (
        lambda i: losses.grpo_loss(i, kl_coef=0.1),
        lambda i: losses.rlad_loss(i, alpha=0.3),
        losses.opd_loss,
        losses.kepo_loss,
    ):
        loss, _ = fn(inp)
        loss.backward()
    assert lp.grad is not None and lp.grad.abs().sum() > 0
    assert all(t.grad is None for t in (old, teacher, ref, adv))


def _weights(ln) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in ln.engine.module.parameters()])


@pytest.mark.parametrize("name", ["rlad", "grpo-token-mean", "kepo-jsd"])
def test_mini_batches_are_sequential_optimizer_steps_with_a_fixed_pi_old(name):
    """mini_batches=2 on rows A+B (2 micro-batches each) equals, step for step: one optimizer step
    on A, then one on B whose π_old is still the starting weights (the rollout policy), as PPO's
    mini-batch epochs do; each mini-batch normalised by its own counts."""
    algo = ALGOS[name]
    rows = _rows(8, seed=11, teacher=True)
    base = TinyLM(seed=2)
    ln = _learner(algo, model=copy.deepcopy(base), grad_accum=2, lr=0.3, mini=2)
    mbs = ln.prepare(TrainBatch(rows=rows, policy_version=0))
    assert ["old_logprobs" in b for b in mbs] == [False, False, True, True]  # mini-batch 2 needs its own
    ln.run_updates(mbs, ln.global_counts(mbs))
    assert ln.engine.micro == 4 and ln.steps_done == 2
    start = copy.deepcopy(base)
    starter = _learner(algo, model=start, grad_accum=2)
    for b in mbs:  # every mini-batch trained against the starting policy, also after a step
        with torch.no_grad():
            assert torch.allclose(b["old_logprobs"], starter._token_logprobs(start, b)[0], atol=1e-6)

    ref = _learner(algo, model=copy.deepcopy(base), grad_accum=2, lr=0.3)
    first = ref.prepare(TrainBatch(rows=rows[:4], policy_version=0))
    ref.run_updates(first, ref.global_counts(first))
    second = ref.prepare(TrainBatch(rows=rows[4:], policy_version=0))
    for b in second:
        with torch.no_grad():
            b["old_logprobs"] = starter._token_logprobs(start, b)[0]
    ref.run_updates(second, ref.global_counts(second))
    assert torch.allclose(_weights(ln), _weights(ref), atol=1e-6)
    assert not torch.allclose(_weights(ln), torch.cat([p.flatten() for p in base.parameters()]))


def test_mini_batches_need_rows():
    with pytest.raises(Exception, match="learner.mini_batches"):
        S.parse_spec(
            {
                "models": {"student": {"path": "x"}},
                "data": {"task": "basic_arithmetic"},
                "rollout": {"prompts_per_step": 1, "samples_per_prompt": 2},
                "learner": {"mini_batches": 4},
            }
        )


@pytest.mark.parametrize("name", ["kepo-forward-kl-topk-tail", "opd-full+grpo", "grpo-token-mean"])
def test_chunked_logprobs_run_on_the_split_model_and_match(name, monkeypatch):
    """learner.logprob_chunk on a model with the split takes the chunked path (counted), and its
    sampled log-probs, entropy and dense rows equal the logits path's in float64."""
    import protege.learners.learner as L

    calls = []
    real = L.chunked_response_logprobs
    monkeypatch.setattr(L, "chunked_response_logprobs", lambda *a, **k: calls.append(k["chunk"]) or real(*a, **k))
    b = collate(_rows(5, seed=4, teacher=True), pad_id=0)
    plain = _learner(ALGOS[name], model=TinyLM().double(), grad_accum=1)
    split = _learner(ALGOS[name], model=TinySplitLM().double(), grad_accum=1, chunk=4)
    a = plain._token_logprobs(plain.engine, b, want_topk=True)
    c = split._token_logprobs(split.engine, b, want_topk=True)
    assert calls == [4]
    assert torch.allclose(a[0], c[0], atol=1e-12) and torch.allclose(a[1], c[1], atol=1e-12)
    assert set(a[2]) == set(c[2]) == {"topk", "full"}
    assert all(torch.allclose(a[2][k], c[2][k], atol=1e-12) for k in a[2])


@pytest.mark.parametrize("name", ["kepo-forward-kl-topk-tail", "opd-full+grpo", "dpo"])
def test_chunked_step_keeps_every_tensor_on_the_learner_device(name):
    algo = ALGOS[name]
    pairs = algo.type == "dpo"
    ln = _learner(algo, model=TinySplitLM().to("meta"), grad_accum=2, updates=2, device="meta", chunk=3, tokens=20)
    mbs = ln.prepare(TrainBatch(rows=_rows(6, seed=2, teacher=True, pairs=pairs), policy_version=0, pairs=pairs))
    metrics = ln.run_updates(mbs, ln.global_counts(mbs))
    assert metrics and all(v.device.type == "meta" for v in metrics.values())


@pytest.mark.parametrize("name", ["grpo-token-mean", "kepo-full", "distill-topk"])
def test_bf16_autocast_is_close_to_float32(name):
    """learner.autocast: bfloat16 runs the forward's matmuls in bfloat16 (the gradients differ
    from float32 in their low bits, so autocast did act) while the weights, the log-softmax rows
    and the loss stay float32, and loss and gradients stay within bfloat16's precision of float32.
    (GRPO's first-pass loss is −mean(A) at ratio 1 whatever the log-probs: equal in both.)"""
    rows = _rows(8, seed=11, teacher=True)
    results = []
    for mode in ("off", "bfloat16"):
        ln = _learner(ALGOS[name], model=TinyLM(), grad_accum=2)
        ln.autocast = mode == "bfloat16"
        mbs = ln.prepare(TrainBatch(rows=rows, policy_version=0))
        m = ln.run_updates(mbs, ln.global_counts(mbs))
        assert all(p.dtype == torch.float32 for p in ln.engine.module.parameters())
        results.append((m["loss/total"], torch.cat([p.grad.flatten() for p in ln.engine.module.parameters()])))
    (l32, g32), (l16, g16) = results
    assert l16.dtype == torch.float32 and not torch.equal(g16, g32)
    assert torch.allclose(l16, l32, rtol=3e-2, atol=1e-3), (float(l16), float(l32))
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_autocast_is_a_learner_option():
    assert S.LearnerSpec().autocast == "off"
    ln = _learner(ALGOS["sft"], model=TinyLM(), grad_accum=1)
    assert ln.autocast is False
    spec = S.LearnerSpec(autocast="bfloat16")
    ln = Learner(
        rank=0,
        world_size=1,
        model_path="",
        learner_spec=spec,
        algo=S.SFTSpec(),
        temperature=1.0,
        grad_accum=1,
        max_response_tokens=8,
    )
    ln.attach(DeepSpeedLike(TinyLM(), 1), device="cpu", pad_id=0)
    assert ln.autocast is True
