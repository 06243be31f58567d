"""Hand-worked tests for protege.learners.losses (CPU, tiny float64 tensors).

Each docstring carries the arithmetic the assertion checks.
"""

import math

import pytest
import torch

from protege.learners.losses import (
    LossInputs,
    aggregate,
    clipped_surrogate,
    dpo_loss,
    grpo_loss,
    grpo_opd_loss,
    kepo_loss,
    kl_penalty,
    opd_loss,
    rlad_loss,
    sequence_logprobs,
    sft_loss,
)

D = torch.float64
LN = math.log


def _t(x, grad=False):
    return torch.tensor(x, dtype=D, requires_grad=grad)


def _close(a, b, tol=1e-10):
    return torch.allclose(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=0)


# ---------------------------------------------------------------- aggregate


L = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
M = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_aggregate_modes_hand_values():
    """L = [[1,2,3],[4,5,6]], m = [[1,1,0],[1,0,0]].
    token-mean: (1+2+4)/3 = 7/3.
    seq-mean-token-mean: mean((1+2)/2, 4/1) = (1.5+4)/2 = 2.75.
    seq-mean-token-sum-norm: 7/(B·T) = 7/6; with max_len=7: 7/(2·7) = 0.5."""
    assert _close(aggregate(_t(L), _t(M), "token-mean"), 7 / 3)
    assert _close(aggregate(_t(L), _t(M), "seq-mean-token-mean"), 2.75)
    assert _close(aggregate(_t(L), _t(M), "seq-mean-token-sum-norm"), 7 / 6)
    assert _close(aggregate(_t(L), _t(M), "seq-mean-token-sum-norm", max_len=7), 0.5)


def test_aggregate_seq_mean_skips_fully_masked_row():
    """m = [[1,1,0],[0,0,0]]: row 1 has no tokens and is left out, so the result is
    (1+2)/2 = 1.5, not (1.5+0)/2 = 0.75 and not NaN."""
    out = aggregate(_t(L), _t([[1, 1, 0], [0, 0, 0]]), "seq-mean-token-mean")
    assert _close(out, 1.5)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_all_masked_is_zero_with_graph(mode):
    """All-masked batch: Σ L·0 / guarded denominator = 0 exactly; backward gives 0 grads, no NaN."""
    x = _t(L, grad=True)
    out = aggregate(x, torch.zeros(2, 3, dtype=D), mode)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 3, dtype=D))


def test_aggregate_unknown_mode_names_valid_ones():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"):
        aggregate(_t(L), _t(M), "seq-sum")
    with pytest.raises(ValueError, match="global_tokens"):
        aggregate(_t(L), _t(M), "seq-mean-token-mean", global_tokens=3)


def test_aggregate_sharded_equals_global():
    """Split a 4×5 batch into two 2-row shards with token counts n1, n2.
    token-mean: (a1·n1 + a2·n2)/(n1+n2) == a_global.
    With global_tokens = n1+n2 the shard losses sum to a_global; with dp_size=2 their mean
    (what DDP gradient averaging computes) equals a_global.
    seq-mean-token-mean with global_seqs = number of non-empty rows behaves the same."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(4, 5, generator=g, dtype=D)
    mask = _t([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    whole = aggregate(per_token, mask, "token-mean")
    shards = [(per_token[:2], mask[:2]), (per_token[2:], mask[2:])]
    n = [m.sum() for _, m in shards]
    a = [aggregate(p, m, "token-mean") for p, m in shards]
    assert _close((a[0] * n[0] + a[1] * n[1]) / (n[0] + n[1]), whole)
    total = float(mask.sum())
    assert _close(sum(aggregate(p, m, "token-mean", global_tokens=total) for p, m in shards), whole)
    dp = [aggregate(p, m, "token-mean", global_tokens=total, dp_size=2) for p, m in shards]
    assert _close((dp[0] + dp[1]) / 2, whole)
    whole_seq = aggregate(per_token, mask, "seq-mean-token-mean")
    seq = [aggregate(p, m, "seq-mean-token-mean", global_seqs=3, dp_size=2) for p, m in shards]
    assert _close((seq[0] + seq[1]) / 2, whole_seq)


# ---------------------------------------------------------------- KL estimators


def test_kl_penalty_estimators():
    """d = logp − ref = [0.5, −1, −30].
    k1 = d = [0.5, −1, −30].  k2 = d²/2 = [0.125, 0.5, 450].
    k3 = e^{−d} + d − 1 = [e^{−0.5} − 0.5, e − 2, clamp(e^{20} − 21) = 10]
    (the exponent is clamped to 20, then the value to [−10, 10] as verl)."""
    logp, ref = _t([0.5, -1.0, -30.0]), _t([0.0, 0.0, 0.0])
    assert _close(kl_penalty(logp, ref, "k1"), [0.5, -1.0, -30.0])
    assert _close(kl_penalty(logp, ref, "k2"), [0.125, 0.5, 450.0])
    assert _close(kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2, 10.0])
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")


# ---------------------------------------------------------------- GRPO

# 2×3 batch; the log-ratios are ln ρ with ρ = [[1.5, 0.9, 1.0], [1.5, 0.5, 1.1]].
RHO = [[1.5, 0.9, 1.0], [1.5, 0.5, 1.1]]
OLD = [[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]]
GRPO_MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def _grpo_inputs(**extra):
    old = _t(OLD)
    logp = (old + torch.log(_t(RHO))).detach().requires_grad_()
    return LossInputs(logprobs=logp, old_logprobs=old, mask=_t(GRPO_MASK), advantages=_t([1.0, -1.0]), **extra)


def test_clipped_surrogate_hand_values():
    """eps 0.2/0.28 -> clip range [0.8, 1.28].
    Row 0, A=+1: ρ=1.5: min(1.5, 1.28)=1.28 clipped -> −1.28; ρ=0.9 -> −0.9; ρ=1.0 -> −1.0.
    Row 1, A=−1: ρ=1.5: min(−1.5, −1.28) = −1.5 unclipped -> +1.5;
                 ρ=0.5: min(−0.5, −0.8) = −0.8 clipped -> +0.8; ρ=1.1 -> +1.1."""
    loss, clipped = clipped_surrogate(torch.log(_t(RHO)), _t([[1.0], [-1.0]]), 0.2, 0.28)
    assert _close(loss, [[-1.28, -0.9, -1.0], [1.5, 0.8, 1.1]])
    assert clipped.tolist() == [[True, False, False], [False, True, False]]


def test_grpo_loss_hand_values_and_grad():
    """Per-token losses as in test_clipped_surrogate_hand_values; token (1,2) is masked.
    token-mean: (−1.28 − 0.9 − 1.0 + 1.5 + 0.8)/5 = −0.88/5 = −0.176.
    clip_frac: 2 clipped of 5 = 0.4. ratio_mean: (1.5+0.9+1+1.5+0.5)/5 = 1.08.
    approx_kl_old = mean(old − logp) = −(ln1.5 + ln0.9 + 0 + ln1.5 + ln0.5)/5.
    Gradient: unclipped tokens get −A·ρ/5, clipped and masked ones 0:
      row 0: [0, −0.9/5, −1.0/5]; row 1: [+1.5/5, 0, 0]."""
    inp = _grpo_inputs()
    loss, m = grpo_loss(inp)
    assert _close(loss, -0.176)
    assert _close(m["loss/pg"], -0.176) and m["loss/kl"].item() == 0.0
    assert _close(m["loss/clip_frac"], 0.4)
    assert _close(m["loss/ratio_mean"], 1.08)
    assert _close(m["loss/approx_kl_old"], -(2 * LN(1.5) + LN(0.9) + LN(0.5)) / 5)
    assert all(not v.requires_grad for v in m.values())
    loss.backward()
    assert _close(inp.logprobs.grad, [[0.0, -0.18, -0.2], [0.3, 0.0, 0.0]])


def test_grpo_loss_other_aggregations():
    """Row sums: row 0 = −1.28−0.9−1.0 = −3.18 (3 tokens), row 1 = 1.5+0.8 = 2.3 (2 tokens).
    seq-mean-token-mean: (−3.18/3 + 2.3/2)/2 = (−1.06 + 1.15)/2 = 0.045.
    seq-mean-token-sum-norm: (−3.18 + 2.3)/(2·3) = −0.88/6."""
    assert _close(grpo_loss(_grpo_inputs(), loss_agg="seq-mean-token-mean")[0], 0.045)
    assert _close(grpo_loss(_grpo_inputs(), loss_agg="seq-mean-token-sum-norm")[0], -0.88 / 6)


def test_grpo_loss_kl_term():
    """ref = logp − 0.5 on every token, so k1 = 0.5 and k3 = e^{−0.5} + 0.5 − 1 per token.
    kl_coef=0.1, k1: loss = −0.176 + 0.1·0.5 = −0.126; metric loss/kl = 0.5.
    kl_coef=0 with ref given: loss unchanged (−0.176), loss/kl still reported (k3 value).
    kl_coef>0 without ref -> ValueError."""
    inp = _grpo_inputs()
    ref = (inp.logprobs - 0.5).detach()
    inp = _grpo_inputs(ref_logprobs=ref)
    loss, m = grpo_loss(inp, kl_coef=0.1, kl_estimator="k1")
    assert _close(loss, -0.126) and _close(m["loss/kl"], 0.5)
    loss, m = grpo_loss(inp)
    assert _close(loss, -0.176) and _close(m["loss/kl"], math.exp(-0.5) - 0.5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(_grpo_inputs(), kl_coef=0.1)


def test_loss_inputs_shape_checks():
    with pytest.raises(ValueError, match="advantages"):
        LossInputs(logprobs=_t(OLD), old_logprobs=_t(OLD), mask=_t(GRPO_MASK), advantages=_t([1.0]))
    with pytest.raises(ValueError, match="mask"):
        LossInputs(logprobs=_t(OLD), old_logprobs=_t(OLD), mask=_t([1.0]), advantages=_t([1.0, 1.0]))


# ---------------------------------------------------------------- RLAD


def test_rlad_alpha_one_equals_grpo_exactly():
    """α = 1: log ρ = logp − old, the teacher is never read, so the loss and gradients must be
    bitwise equal to grpo_loss (torch.equal), for every aggregation."""
    g = torch.Generator().manual_seed(1)
    old = torch.randn(3, 4, generator=g, dtype=D)
    base = old + 0.3 * torch.randn(3, 4, generator=g, dtype=D)
    teacher = torch.randn(3, 4, generator=g, dtype=D)
    mask = _t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.randn(3, generator=g, dtype=D)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        out = []
        for fn, kw in ((grpo_loss, {}), (rlad_loss, {"alpha": 1.0})):
            logp = base.clone().requires_grad_()
            inp = LossInputs(logprobs=logp, old_logprobs=old, mask=mask, advantages=adv, teacher_logprobs=teacher)
            loss, _ = fn(inp, loss_agg=agg, **kw)
            loss.backward()
            out.append((loss.detach(), logp.grad))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_rlad_teacher_anchor_and_clamp():
    """On policy (logp = old), α = 0.5, c = 1, gap = logp − teacher = [0.4, 3.0] on both rows.
    log ρ = 0.5·0 + 0.5·clamp(gap) = [0.2, 0.5] -> ρ = [e^0.2 = 1.2214, e^0.5 = 1.6487].
    Row 0, A=+1: e^0.2 < 1.28 -> −e^0.2; e^0.5 > 1.28 -> clipped, −1.28.
    Row 1, A=−1: e^0.2 in [0.8,1.28] -> +e^0.2; min(−e^0.5, −1.28) = −e^0.5 unclipped -> +e^0.5.
    token-mean: (e^0.5 − 1.28)/4. clip_frac 1/4; clamp_frac 2/4; teacher_logratio_mean 1.7.
    Gradients (/4 tokens): d log ρ/d logp = α + (1−α) = 1 where |gap| ≤ c, but α = 0.5 where the
    clamp is active (the teacher term passes no gradient):
      row 0: [−e^0.2/4, 0 (clipped)];  row 1: [e^0.2/4, 0.5·e^0.5/4]."""
    old = _t([[-1.0, -2.0], [-1.0, -2.0]])
    logp = old.clone().requires_grad_()
    teacher = old - _t([0.4, 3.0])
    inp = LossInputs(
        logprobs=logp,
        old_logprobs=old,
        mask=torch.ones(2, 2, dtype=D),
        advantages=_t([1.0, -1.0]),
        teacher_logprobs=teacher,
    )
    loss, m = rlad_loss(inp, alpha=0.5, clamp=1.0)
    e2, e5 = math.exp(0.2), math.exp(0.5)
    assert _close(loss, (e5 - 1.28) / 4)
    assert _close(m["loss/clip_frac"], 0.25) and _close(m["rlad/clamp_frac"], 0.5)
    assert _close(m["rlad/teacher_logratio_mean"], 1.7)
    assert _close(m["loss/ratio_mean"], (2 * e2 + 2 * e5) / 4)
    loss.backward()
    assert _close(logp.grad, [[-e2 / 4, 0.0], [e2 / 4, 0.5 * e5 / 4]])


def test_rlad_gate_variant_clips_by_trrd_but_steps_by_grpo():
    """trust_region="gate", on policy (logp = old, GRPO ratio 1), α = 0.5, c = 1.
    Row 0, A=+1, gap = logp − teacher = [0.4, 3.0]: gate log ρ = 0.5·clamp(gap) = [0.2, 0.5],
      ρ = [1.2214, 1.6487]; the second exceeds 1.28 -> gated (no gradient).
    Row 1, A=−1, gap = [−0.4, −3.0]: gate log ρ = [−0.2, −0.5], ρ = [0.8187, 0.6065]; the second is
      below 0.8 and A < 0 -> gated.
    Per-token loss −ρ_GRPO·A = [−1, −1], [+1, +1] (gated ones keep their value): token-mean 0.
    Gradients (/4 tokens) are GRPO's, −A/4, where not gated: [[−1/4, 0], [1/4, 0]].
    gated_frac = clip_frac = 2/4. The paper's ratio on the same tokens re-weights instead:
    its row-0 first-token gradient is −e^0.2/4."""
    old = _t([[-1.0, -2.0], [-1.0, -2.0]])
    teacher = old - _t([[0.4, 3.0], [-0.4, -3.0]])

    def run(**kw):
        logp = old.clone().requires_grad_()
        inp = LossInputs(
            logprobs=logp,
            old_logprobs=old,
            mask=torch.ones(2, 2, dtype=D),
            advantages=_t([1.0, -1.0]),
            teacher_logprobs=teacher,
        )
        loss, m = rlad_loss(inp, **kw)
        loss.backward()
        return loss, m, logp.grad

    loss, m, grad = run(alpha=0.5, clamp=1.0, trust_region="gate")
    assert _close(loss, 0.0)
    assert _close(grad, [[-0.25, 0.0], [0.25, 0.0]])
    assert _close(m["loss/gated_frac"], 0.5) and _close(m["loss/clip_frac"], 0.5)
    assert _close(m["rlad/clamp_frac"], 0.5)
    _, _, paper = run(alpha=0.5, clamp=1.0)
    assert _close(paper[0, 0], -math.exp(0.2) / 4)
    # α = 1 has no teacher term to gate with: GRPO exactly
    _, _, at_one = run(alpha=1.0, trust_region="gate")
    _, _, grpo = run(alpha=1.0)
    assert torch.equal(at_one, grpo)


def test_rlad_argument_errors():
    inp = _grpo_inputs()
    with pytest.raises(ValueError, match="alpha"):
        rlad_loss(inp, alpha=1.5)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        rlad_loss(inp, alpha=0.5)
    with pytest.raises(ValueError, match="trust_region"):
        rlad_loss(inp, alpha=0.5, trust_region="both")


# ---------------------------------------------------------------- KEPO


def _topk_inputs(gate, s_topk, t_topk, adv=0.0):
    """One response, one token, K=2 top-k rows; on policy with A=0 so the GRPO term is 0."""
    z = _t([[-1.0]])
    return LossInputs(
        logprobs=z.clone().requires_grad_(),
        old_logprobs=z,
        mask=_t([[1.0]]),
        advantages=_t([adv]),
        student_topk_logprobs=s_topk,
        teacher_topk_logprobs=t_topk,
        gate=_t([gate]),
    )


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_kepo_empty_gate_is_exactly_grpo(divergence):
    """gate = 0 for every response: the distillation term is Σ D·0 / 1 = 0.0 exactly, so the
    total loss and gradients equal grpo_loss (torch.equal) and nothing is NaN."""
    g = torch.Generator().manual_seed(2)
    extra = dict(
        teacher_logprobs=torch.randn(2, 3, generator=g, dtype=D),
        student_topk_logprobs=torch.randn(2, 3, 4, generator=g, dtype=D, requires_grad=True),
        teacher_topk_logprobs=torch.randn(2, 3, 4, generator=g, dtype=D),
        gate=_t([0.0, 0.0]),
    )
    inp = _grpo_inputs(**extra)
    loss, m = kepo_loss(inp, divergence=divergence)
    loss.backward()
    grad_kepo = inp.logprobs.grad.clone()
    inp_g = _grpo_inputs(**extra)
    loss_g, _ = grpo_loss(inp_g)
    loss_g.backward()
    assert torch.equal(loss, loss_g) and torch.equal(grad_kepo, inp_g.logprobs.grad)
    assert m["kepo/distill"].item() == 0.0 and m["kepo/gate_frac"].item() == 0.0
    if divergence != "reverse_kl":  # the top-k rows get zero (not NaN) gradient
        assert torch.equal(extra["student_topk_logprobs"].grad, torch.zeros(2, 3, 4, dtype=D))


def test_kepo_reverse_kl_gated_hand_value():
    """On policy, A=0 (GRPO term 0). gate = [1, 0]; d = logp − teacher = [[0.5, −0.1], [2, 2]].
    Only row 0 counts: token-mean of ρ·d = (0.5 − 0.1)/2 = 0.2; distill_coef=2 -> loss 0.4.
    gate_frac = 0.5. Gradient = coef·d/2 on row 0 = [0.5, −0.1], and 0 on row 1."""
    old = _t([[-1.0, -2.0], [-1.0, -2.0]])
    logp = old.clone().requires_grad_()
    inp = LossInputs(
        logprobs=logp,
        old_logprobs=old,
        mask=torch.ones(2, 2, dtype=D),
        advantages=_t([0.0, 0.0]),
        teacher_logprobs=old - _t([[0.5, -0.1], [2.0, 2.0]]),
        gate=_t([1.0, 0.0]),
    )
    loss, m = kepo_loss(inp, distill_coef=2.0)
    assert _close(loss, 0.4) and _close(m["kepo/distill"], 0.2) and _close(m["kepo/gate_frac"], 0.5)
    loss.backward()
    assert _close(logp.grad, [[0.5, -0.1], [0.0, 0.0]])


def test_kepo_topk_divergences_hand_values_k2():
    """Student top-k logprobs [ln .25, ln .25] renormalise to p_S = [.5, .5]; teacher
    [ln .45, ln .05] to p_T = [.9, .1].
    forward KL(T||S) = .9 ln(.9/.5) + .1 ln(.1/.5).
    JSD β=.5: m = [.7, .3]; .5[.9 ln(.9/.7) + .1 ln(.1/.3)] + .5[.5 ln(.5/.7) + .5 ln(.5/.3)].
    JSD β=.25: m = .25 p_T + .75 p_S = [.6, .4];
               .25[.9 ln(.9/.6) + .1 ln(.1/.4)] + .75[.5 ln(.5/.6) + .5 ln(.5/.4)].
    Endpoints (TRL): β=0 -> forward KL; β=1 -> KL(S||T) = .5 ln(.5/.9) + .5 ln(.5/.1)."""
    s = torch.log(_t([[[0.25, 0.25]]]))
    t = torch.log(_t([[[0.45, 0.05]]]))
    fkl = 0.9 * LN(0.9 / 0.5) + 0.1 * LN(0.1 / 0.5)
    jsd5 = 0.5 * (0.9 * LN(0.9 / 0.7) + 0.1 * LN(0.1 / 0.3)) + 0.5 * (0.5 * LN(0.5 / 0.7) + 0.5 * LN(0.5 / 0.3))
    jsd25 = 0.25 * (0.9 * LN(0.9 / 0.6) + 0.1 * LN(0.1 / 0.4)) + 0.75 * (0.5 * LN(0.5 / 0.6) + 0.5 * LN(0.5 / 0.4))
    rkl = 0.5 * LN(0.5 / 0.9) + 0.5 * LN(0.5 / 0.1)
    cases = [("forward_kl", 0.5, fkl), ("jsd", 0.5, jsd5), ("jsd", 0.25, jsd25), ("jsd", 0.0, fkl), ("jsd", 1.0, rkl)]
    for div, beta, want in cases:
        loss, m = kepo_loss(_topk_inputs(1.0, s, t), divergence=div, jsd_beta=beta)
        assert _close(loss, want) and _close(m["kepo/distill"], want), (div, beta)


def test_kepo_jsd_sanity():
    """JSD(β=.5) is symmetric in (p_S, p_T), zero when they match, and at most ln 2."""
    a, b = torch.log(_t([[[0.7, 0.2, 0.1]]])), torch.log(_t([[[0.1, 0.3, 0.6]]]))
    ab = kepo_loss(_topk_inputs(1.0, a, b), divergence="jsd")[0]
    ba = kepo_loss(_topk_inputs(1.0, b, a), divergence="jsd")[0]
    aa = kepo_loss(_topk_inputs(1.0, a, a), divergence="jsd")[0]
    assert _close(ab, ba) and _close(aa, 0.0) and 0 < ab.item() <= LN(2)
    with pytest.raises(ValueError, match="gate"):
        kepo_loss(_grpo_inputs())


def _enumerated_grad(loss_fn, pi_sample):
    """Exact E_{y~pi_sample}[∇ loss(y)] over a 3-token vocabulary at one position, against the
    exact ∇ KL(πθ||πT) = ∇ Σ_y πθ(y)(log πθ(y) − log πT(y)), by full enumeration (no sampling)."""
    theta = _t([0.3, -0.2, 0.5], grad=True)
    log_t = torch.log(_t([0.2, 0.5, 0.3]))
    logp = torch.log_softmax(theta, -1)
    log_old = logp.detach() if pi_sample is None else torch.log(_t(pi_sample))
    expected = sum(
        log_old[y].exp()
        * loss_fn(
            LossInputs(
                logprobs=logp[y].view(1, 1),
                old_logprobs=log_old[y].view(1, 1),
                mask=_t([[1.0]]),
                advantages=_t([0.0]),
                teacher_logprobs=log_t[y].view(1, 1),
                gate=_t([1.0]),
            )
        )[0]
        for y in range(3)
    )
    (estimated,) = torch.autograd.grad(expected, theta, retain_graph=True)
    (exact,) = torch.autograd.grad((logp.exp() * (logp - log_t)).sum(), theta)
    return estimated, exact


def test_reverse_kl_estimator_gradient_is_unbiased():
    """KEPO reverse_kl: Σ_y π_old(y)·∇[ρ(y)·sg(log πθ(y) − log πT(y))] = ∇KL(πθ||πT), on policy
    (π_old = πθ) and off policy (π_old = [.6, .3, .1], where ρ = πθ/π_old corrects the sampling)."""
    for pi_sample in (None, [0.6, 0.3, 0.1]):
        est, exact = _enumerated_grad(lambda inp: kepo_loss(inp, divergence="reverse_kl"), pi_sample)
        assert _close(est, exact), (pi_sample, est, exact)


def test_opd_estimator_gradient_is_unbiased_on_policy():
    """OPD on policy: Σ_y πθ(y)·∇[−ρ·sg(log πT − log π_old)]
    = Σ_y πθ(y)(log πθ − log πT)·∇log πθ = ∇KL(πθ||πT)."""
    est, exact = _enumerated_grad(opd_loss, None)
    assert _close(est, exact)


# ---------------------------------------------------------------- OPD


def test_opd_loss_hand_values():
    """On policy, old = [−1, −2], teacher = [−1.5, −1] -> A_t = teacher − old = [−0.5, 1].
    loss = coef · mean(−ρ·A_t) = 2 · (0.5 − 1)/2 = −0.5. reverse_kl = mean(old − teacher)
    = (0.5 − 1)/2 = −0.25. Gradient = coef·(−A_t)/2 = [0.5, −1]."""
    old = _t([[-1.0, -2.0]])
    logp = old.clone().requires_grad_()
    inp = LossInputs(
        logprobs=logp,
        old_logprobs=old,
        mask=_t([[1.0, 1.0]]),
        advantages=_t([0.0]),
        teacher_logprobs=_t([[-1.5, -1.0]]),
    )
    loss, m = opd_loss(inp, coef=2.0)
    assert _close(loss, -0.5) and _close(m["opd/reverse_kl"], -0.25)
    loss.backward()
    assert _close(logp.grad, [[0.5, -1.0]])


def test_grpo_opd_loss_sums_and_merges():
    """grpo_opd = grpo_loss + opd_loss(coef=opd_coef); metrics hold both namespaces."""
    inp = _grpo_inputs(teacher_logprobs=_t([[-1.2, -1.9, -0.4], [-1.0, -1.0, -1.0]]))
    loss, m = grpo_opd_loss(inp, opd_coef=0.5)
    want = grpo_loss(inp)[0] + opd_loss(inp, coef=0.5)[0]
    assert _close(loss, want) and {"loss/pg", "opd/reverse_kl"} <= set(m)


# ---------------------------------------------------------------- DPO / SFT


def test_dpo_loss_hand_values():
    """β = 0.1.
    Pair 0: chosen reward 0.1(−10 + 12) = 0.2, rejected 0.1(−11 + 10) = −0.1, margin 0.3.
    Pair 1: chosen 0.1(−5 + 4) = −0.1, rejected 0.1(−6 + 7) = 0.1, margin −0.2.
    loss = mean(−log σ(m)) = (log(1 + e^{−0.3}) + log(1 + e^{0.2}))/2.
    reward_margin 0.05, accuracy 0.5, chosen_reward 0.05, rejected_reward 0.
    ∂loss/∂policy_chosen_i = −β·σ(−m_i)/2 = −0.05·σ(−m_i)."""
    pc = _t([-10.0, -5.0], grad=True)
    loss, m = dpo_loss(pc, _t([-11.0, -6.0]), _t([-12.0, -4.0]), _t([-10.0, -7.0]), beta=0.1)
    assert _close(loss, (LN(1 + math.exp(-0.3)) + LN(1 + math.exp(0.2))) / 2)
    assert _close(m["dpo/reward_margin"], 0.05) and _close(m["dpo/accuracy"], 0.5)
    assert _close(m["dpo/chosen_reward"], 0.05) and _close(m["dpo/rejected_reward"], 0.0)
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert _close(pc.grad, [-0.05 * sig(-0.3), -0.05 * sig(0.2)])


def test_dpo_loss_is_stable_at_large_margins():
    """β=1, margin −1000: −log σ(−1000) = 1000 (a naive log(sigmoid) would give inf)."""
    loss, _ = dpo_loss(_t([-1000.0]), _t([0.0]), _t([0.0]), _t([0.0]), beta=1.0)
    assert _close(loss, 1000.0)


def test_sft_loss_and_sequence_logprobs():
    """logprobs [[−1, −2], [−3, 99]], mask [[1, 1], [1, 0]] (99 is padding).
    sft: (1 + 2 + 3)/3 = 2. sequence_logprobs: [−1 − 2, −3] = [−3, −3]."""
    lp, mask = _t([[-1.0, -2.0], [-3.0, 99.0]]), _t([[1.0, 1.0], [1.0, 0.0]])
    loss, m = sft_loss(lp, mask)
    assert _close(loss, 2.0) and _close(m["sft/nll"], 2.0)
    assert _close(sequence_logprobs(lp, mask), [-3.0, -3.0])


# ---------------------------------------------------------------- dense teacher signal


def _dense_inputs(**kw):
    z = _t([[-1.0]])
    return LossInputs(logprobs=z.clone().requires_grad_(), old_logprobs=z, mask=_t([[1.0]]), advantages=_t([0.0]), **kw)


def test_tail_logprob_hand_value():
    """log-probs [ln .5, ln .25] hold .75 of the mass: the tail is ln .25."""
    from protege.learners.losses import tail_logprob

    assert _close(tail_logprob(_t([LN(0.5), LN(0.25)])), LN(0.25))
    # All the mass on the support: a finite, very small tail (not -inf / NaN).
    t = tail_logprob(_t([LN(0.5), LN(0.5)]))
    assert torch.isfinite(t) and t < -10


def test_topk_reverse_kl_with_tail_bucket_hand_value():
    """Student at the teacher's top-2 ids: [.5, .25] (tail .25); teacher [.7, .2] (tail .1).
    KL(S||T) over 3 buckets = .5 ln(.5/.7) + .25 ln(.25/.2) + .25 ln(.25/.1).
    topk_renorm instead compares [2/3, 1/3] with [7/9, 2/9]."""
    from protege.learners.losses import dense_divergence

    s = _t([[[LN(0.5), LN(0.25)]]], grad=True)
    inp = _dense_inputs(
        student_topk_logprobs=s, teacher_topk_logprobs=_t([[[LN(0.7), LN(0.2)]]]), teacher_tail_logprobs=_t([[LN(0.1)]])
    )
    kl = dense_divergence(inp, "reverse_kl", "topk")
    assert _close(kl, [[0.5 * LN(0.5 / 0.7) + 0.25 * LN(0.25 / 0.2) + 0.25 * LN(0.25 / 0.1)]])
    renorm = dense_divergence(inp, "reverse_kl", "topk_renorm")
    assert _close(renorm, [[2 / 3 * LN((2 / 3) / (7 / 9)) + 1 / 3 * LN((1 / 3) / (2 / 9))]])
    fwd = dense_divergence(inp, "forward_kl", "topk")
    assert _close(fwd, [[0.7 * LN(0.7 / 0.5) + 0.2 * LN(0.2 / 0.25) + 0.1 * LN(0.1 / 0.25)]])
    # Without a tail sent, the teacher's is computed from its top-k (same value here).
    inp2 = _dense_inputs(student_topk_logprobs=s, teacher_topk_logprobs=_t([[[LN(0.7), LN(0.2)]]]))
    assert _close(dense_divergence(inp2, "reverse_kl", "topk"), kl)


def test_full_reverse_kl_equals_an_independent_kl_and_bounds_topk():
    """Full rows: equals torch's kl_div (an independent implementation), value and gradient with
    respect to the student's logits; the top-k + tail version is a lower bound of it (merging
    buckets can only lose divergence) and equals it when k = V."""
    import torch.nn.functional as F

    from protege.learners.losses import dense_divergence

    g = torch.Generator().manual_seed(4)
    V = 7
    zs = torch.randn(2, 3, V, generator=g, dtype=D, requires_grad=True)
    t = (2 * torch.randn(2, 3, V, generator=g, dtype=D)).log_softmax(-1)
    s = zs.log_softmax(-1)
    inp = LossInputs(
        logprobs=torch.zeros(2, 3, dtype=D),
        old_logprobs=torch.zeros(2, 3, dtype=D),
        mask=torch.ones(2, 3, dtype=D),
        advantages=torch.zeros(2, dtype=D),
        student_full_logprobs=s,
        teacher_full_logprobs=t,
    )
    ours = dense_divergence(inp, "reverse_kl", "full")
    ref = F.kl_div(t, s, log_target=True, reduction="none").sum(-1)  # Σ e^s (s − t)
    assert _close(ours, ref, 1e-12)
    (g1,) = torch.autograd.grad(ours.sum(), zs, retain_graph=True)
    (g2,) = torch.autograd.grad(ref.sum(), zs)
    assert _close(g1, g2, 1e-12)
    for k in (2, 4, V):
        ids = t.topk(k, dim=-1).indices
        inp_k = LossInputs(
            logprobs=torch.zeros(2, 3, dtype=D),
            old_logprobs=torch.zeros(2, 3, dtype=D),
            mask=torch.ones(2, 3, dtype=D),
            advantages=torch.zeros(2, dtype=D),
            student_topk_logprobs=s.gather(-1, ids),
            teacher_topk_logprobs=t.gather(-1, ids),
        )
        topk = dense_divergence(inp_k, "reverse_kl", "topk")
        assert bool((topk <= ours + 1e-9).all())
        if k == V:
            assert _close(topk, ours, 1e-5)


def test_opd_full_estimator_is_the_expectation_of_the_sampled_one():
    """On policy, one state, V = 5: the sampled estimator's gradient averaged over y ~ πθ (exactly,
    by enumeration) equals the full estimator's gradient (the exact ∇KL(πθ||πT)); the full one has
    no sampling variance. Both with respect to the student's logits."""
    g = torch.Generator().manual_seed(6)
    V = 5
    z = torch.randn(V, generator=g, dtype=D, requires_grad=True)
    t = (3 * torch.randn(V, generator=g, dtype=D)).log_softmax(-1)
    s = z.log_softmax(-1)
    full = opd_loss(
        LossInputs(
            logprobs=torch.zeros(1, 1, dtype=D),
            old_logprobs=torch.zeros(1, 1, dtype=D),
            mask=torch.ones(1, 1, dtype=D),
            advantages=torch.zeros(1, dtype=D),
            student_full_logprobs=s.view(1, 1, V),
            teacher_full_logprobs=t.view(1, 1, V),
        ),
        estimator="full",
    )[0]
    (g_full,) = torch.autograd.grad(full, z, retain_graph=True)
    expected = torch.zeros(V, dtype=D)
    for y in range(V):
        lp = s[y].view(1, 1)
        loss, _ = opd_loss(
            LossInputs(
                logprobs=lp,
                old_logprobs=lp.detach(),
                mask=torch.ones(1, 1, dtype=D),
                advantages=torch.zeros(1, dtype=D),
                teacher_logprobs=t[y].view(1, 1),
            )
        )
        (gy,) = torch.autograd.grad(loss, z, retain_graph=True)
        expected += s[y].exp().detach() * gy
    assert _close(g_full, expected, 1e-12)
    m = opd_loss(
        LossInputs(
            logprobs=torch.zeros(1, 1, dtype=D),
            old_logprobs=torch.zeros(1, 1, dtype=D),
            mask=torch.ones(1, 1, dtype=D),
            advantages=torch.zeros(1, dtype=D),
            student_full_logprobs=s.view(1, 1, V).detach(),
            teacher_full_logprobs=t.view(1, 1, V),
        ),
        estimator="full",
    ).metrics
    assert _close(m["opd/reverse_kl"], (s.exp() * (s - t)).sum().detach())


def test_dense_estimators_name_what_is_missing():
    from protege.learners.losses import dense_divergence

    inp = _dense_inputs()
    with pytest.raises(ValueError, match="student_full_logprobs"):
        dense_divergence(inp, "reverse_kl", "full")
    with pytest.raises(ValueError, match="student_topk_logprobs"):
        opd_loss(inp, estimator="topk")
    with pytest.raises(ValueError, match="sampled-token estimator gives reverse_kl only"):
        kepo_loss(_dense_inputs(gate=_t([1.0]), teacher_logprobs=_t([[-1.0]])), divergence="jsd", estimator="sampled")


def test_truncated_importance_weights_hand_values():
    """On policy (logp = old = −1), A = +1; the rollout engine sampled at [−1.5, −0.2]:
    raw ratio π_old/π_b = [e^0.5, e^−0.8] = [1.6487, 0.4493]; cap 1.5 -> w = [1.5, 0.4493].
    Per-token loss −ρA·w = [−1.5, −0.4493] -> token-mean −0.97466; truncated 1 of 2;
    ratio_mean (1.6487 + 0.4493)/2. Gradient −w/2 = [−0.75, −0.22466]. Without a cap: plain GRPO."""
    old = _t([[-1.0, -1.0]])
    logp = old.clone().requires_grad_()
    inp = LossInputs(
        logprobs=logp,
        old_logprobs=old,
        mask=_t([[1.0, 1.0]]),
        advantages=_t([1.0]),
        behaviour_logprobs=_t([[-1.5, -0.2]]),
    )
    loss, m = grpo_loss(inp, tis_cap=1.5)
    w = [1.5, math.exp(-0.8)]
    assert _close(loss, -(w[0] + w[1]) / 2)
    assert _close(m["tis/truncated_frac"], 0.5) and _close(m["tis/ratio_mean"], (math.exp(0.5) + math.exp(-0.8)) / 2)
    loss.backward()
    assert _close(logp.grad, [[-w[0] / 2, -w[1] / 2]])
    plain, m0 = grpo_loss(inp)
    assert _close(plain, -1.0) and "tis/ratio_mean" not in m0
    with pytest.raises(ValueError, match="tis cap"):
        grpo_loss(inp, tis_cap=0.0)


def test_tis_is_on_by_default_with_stale_rollouts_only():
    from protege.core import spec as S

    assert S.GRPOSpec().effective_tis_cap() is None
    assert S.GRPOSpec(max_staleness=1).effective_tis_cap() == 2.0
    assert S.RLADSpec(max_staleness=1, tis_cap=5.0).effective_tis_cap() == 5.0
    assert S.OPDSpec(max_staleness=1).effective_tis_cap() == 2.0


def test_distill_loss_by_hand():
    """Forward KL over the teacher's top-2 plus the tail bucket, token-mean over 2 tokens.
    Token 1: teacher (0.5, 0.25 | tail 0.25), student (0.25, 0.25 | tail 0.5):
    KL(T‖S) = 0.5 ln 2 + 0.25 ln 1 + 0.25 ln 0.5 = 0.25 ln 2. Token 2: equal rows, KL = 0.
    Mean 0.125 ln 2. Gradient w.r.t. the student's top-k log-probs at token 1: d/ds_k of
    −Σ_k p_T,k s_k − p_T,tail log(1 − Σ_k e^{s_k}) = −p_T,k + p_T,tail · e^{s_k} / q_tail
    = −0.5 + 0.25·0.25/0.5 = −0.375 and −0.25 + 0.125 = −0.125, halved by the token mean."""
    from protege.learners.losses import LossInputs, distill_loss

    ln = math.log
    s_top = torch.tensor([[[ln(0.25), ln(0.25)], [ln(0.5), ln(0.25)]]], dtype=torch.float64, requires_grad=True)
    t_top = torch.tensor([[[ln(0.5), ln(0.25)], [ln(0.5), ln(0.25)]]], dtype=torch.float64)
    t_tail = torch.tensor([[ln(0.25), ln(0.25)]], dtype=torch.float64)
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    inp = LossInputs(
        logprobs=zeros,
        old_logprobs=zeros,
        mask=torch.ones(1, 2, dtype=torch.float64),
        advantages=torch.zeros(1, dtype=torch.float64),
        student_topk_logprobs=s_top,
        teacher_topk_logprobs=t_top,
        teacher_tail_logprobs=t_tail,
    )
    out = distill_loss(inp, divergence="forward_kl", estimator="topk")
    assert float(out.value) == pytest.approx(0.125 * ln(2), abs=1e-12)
    out.value.backward()
    assert s_top.grad[0, 0].tolist() == pytest.approx([-0.375 / 2, -0.125 / 2], abs=1e-12)
    assert s_top.grad[0, 1].abs().max() < 1e-12  # equal rows: no gradient
