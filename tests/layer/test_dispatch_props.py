"""Property-based tests of plan_dispatch / dispatch / combine against a direct sum over slots.

Shape legend: T tokens, D model width, E experts, K slots per token, S = T*K slots, R rows.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.layer.dispatch import combine, dispatch, plan_dispatch


@st.composite
def routings(draw):
    """Random T, K <= E, experts_TK (distinct experts per token, some slots empty = E), weights_TK, x_TD."""
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    T = draw(st.integers(1, 12))
    D = draw(st.integers(1, 5))
    rows = [draw(st.permutations(range(E)))[:K] for _ in range(T)]
    empty = [[draw(st.booleans()) for _ in range(K)] for _ in range(T)] if draw(st.booleans()) else [[False] * K] * T
    experts_TK = torch.tensor(
        [[E if empty[t][k] else rows[t][k] for k in range(K)] for t in range(T)], dtype=torch.int64
    )
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    weights_TK = torch.randn(T, K, generator=g, dtype=torch.float64)
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    return E, experts_TK, weights_TK, x_TD


def direct_sum(x_TD, experts_TK, weights_TK, E, scale_E=None):
    """out[t] = sum over non-empty slots k of weight[t, k] * scale[e] * x[t]."""
    T, K = experts_TK.shape
    out_TD = torch.zeros_like(x_TD)
    for t in range(T):
        for k in range(K):
            e = int(experts_TK[t, k])
            if e < E:
                out_TD[t] += weights_TK[t, k] * (1.0 if scale_E is None else scale_E[e]) * x_TD[t]
    return out_TD


def check_plan(plan, experts_TK, E, R):
    """order_R holds each non-empty slot exactly once in its first sum(counts_E) rows, sorted by expert."""
    T, K = experts_TK.shape
    experts_S = experts_TK.reshape(-1)
    n = int((experts_S < E).sum())
    assert plan.order_R.shape == (R,)
    assert plan.counts_E.dtype == torch.int64 and plan.counts_E.shape == (E,)
    assert torch.equal(plan.counts_E, torch.bincount(experts_S[experts_S < E], minlength=E))
    assert int(plan.counts_E.sum()) == n
    head = plan.order_R[:n]
    assert sorted(head.tolist()) == sorted(torch.nonzero(experts_S < E).flatten().tolist())
    head_experts = experts_S[head]
    assert torch.all(head_experts[1:] >= head_experts[:-1]), "rows must be sorted by expert"
    # contiguous blocks: rows [sum(counts[:e]), sum(counts[:e+1])) belong to expert e
    assert torch.equal(head_experts, torch.repeat_interleave(torch.arange(E), plan.counts_E))
    assert plan.num_tokens == T and plan.top_k == K
    assert len(set(plan.order_R.tolist())) == R, "no slot may appear twice"


def run(x_TD, experts_TK, weights_TK, E, max_rows=None, scale_E=None):
    has_empty = bool((experts_TK == E).any())
    plan = plan_dispatch(experts_TK, E, max_rows=max_rows, has_empty=has_empty)
    x_RD = dispatch(x_TD, plan)
    n = int(plan.counts_E.sum())
    # rows of real slots carry their token's row; rows past sum(counts_E) are zero when empties exist
    torch.testing.assert_close(x_RD[:n], x_TD[plan.token_R[:n]], rtol=0, atol=0)
    if plan.has_empty:
        assert torch.all(x_RD[n:] == 0)
    y_RD = x_RD.clone()
    if scale_E is not None:  # an expert-dependent "FFN": expert e multiplies by scale_E[e]
        e_R = torch.repeat_interleave(torch.arange(E), plan.counts_E)
        y_RD[:n] = y_RD[:n] * scale_E[e_R][:, None]
        y_RD[n:] = 123.0  # padding rows' outputs are unspecified and must be ignored
    return plan, combine(y_RD, plan, weights_TK)


@settings(max_examples=40, deadline=None)
@given(routings())
def test_identity_experts_roundtrip(case):
    """With identity experts combine(dispatch(x)) = sum over non-empty slots of weight * x_t."""
    E, experts_TK, weights_TK, x_TD = case
    T, K = experts_TK.shape
    plan, out_TD = run(x_TD, experts_TK, weights_TK, E)
    check_plan(plan, experts_TK, E, T * K)
    assert out_TD.shape == x_TD.shape
    torch.testing.assert_close(out_TD, direct_sum(x_TD, experts_TK, weights_TK, E), rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(routings(), st.integers(0, 100))
def test_capacity_bound_max_rows(case, extra):
    """With max_rows = E*C (C >= the largest count) the plan keeps every non-empty slot and the sum still holds."""
    E, experts_TK, weights_TK, x_TD = case
    T, K = experts_TK.shape
    counts_E = torch.bincount(experts_TK[experts_TK < E], minlength=E)
    C = int(counts_E.max()) + extra % 3
    max_rows = E * C
    plan, out_TD = run(x_TD, experts_TK, weights_TK, E, max_rows=max_rows)
    check_plan(plan, experts_TK, E, min(T * K, max_rows))
    torch.testing.assert_close(out_TD, direct_sum(x_TD, experts_TK, weights_TK, E), rtol=1e-12, atol=1e-12)
    # also any bound between the number of real slots and S
    n = int(counts_E.sum())
    bound = n + extra % (T * K - n + 1)
    plan, out_TD = run(x_TD, experts_TK, weights_TK, E, max_rows=bound)
    check_plan(plan, experts_TK, E, min(T * K, bound))
    torch.testing.assert_close(out_TD, direct_sum(x_TD, experts_TK, weights_TK, E), rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(routings(), st.booleans())
def test_expert_dependent_outputs_land_on_their_slots(case, bounded):
    """Each expert's output (here scale_e * x) is combined into exactly the slot routed to that expert."""
    E, experts_TK, weights_TK, x_TD = case
    T, K = experts_TK.shape
    scale_E = torch.arange(2.0, 2.0 + E, dtype=torch.float64) ** 1.5
    n = int((experts_TK < E).sum())
    _, out_TD = run(x_TD, experts_TK, weights_TK, E, max_rows=n if bounded else None, scale_E=scale_E)
    torch.testing.assert_close(out_TD, direct_sum(x_TD, experts_TK, weights_TK, E, scale_E), rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(routings())
def test_combine_gradients(case):
    """Gradients: d out / d x_t = sum of its non-empty weights; d out / d w_tk = <g_t, x_t> for
    non-empty slots, 0 for empty."""
    E, experts_TK, weights_TK, x_TD = case
    x_TD = x_TD.clone().requires_grad_(True)
    weights_TK = weights_TK.clone().requires_grad_(True)
    has_empty = bool((experts_TK == E).any())
    plan = plan_dispatch(experts_TK, E, has_empty=has_empty)
    out_TD = combine(dispatch(x_TD, plan), plan, weights_TK)
    g_TD = torch.ones_like(out_TD)
    out_TD.backward(g_TD)
    real_TK = experts_TK < E
    w_sum_T = (weights_TK.detach() * real_TK).sum(-1)
    torch.testing.assert_close(x_TD.grad, w_sum_T[:, None].expand_as(x_TD), rtol=1e-12, atol=1e-12)
    want_TK = (g_TD * x_TD.detach()).sum(-1)[:, None] * real_TK
    torch.testing.assert_close(weights_TK.grad, want_TK, rtol=1e-12, atol=1e-12)


def test_all_slots_empty():
    """Every slot empty: counts are 0 and the output is exactly zero."""
    E, T, K = 3, 4, 2
    experts_TK = torch.full((T, K), E)
    x_TD = torch.randn(T, 5)
    plan, out_TD = run(x_TD, experts_TK, torch.randn(T, K), E)
    assert plan.counts_E.tolist() == [0, 0, 0]
    assert torch.all(out_TD == 0)
    plan, out_TD = run(x_TD, experts_TK, torch.randn(T, K), E, max_rows=0)
    assert plan.order_R.numel() == 0 and torch.all(out_TD == 0)


def test_zero_tokens():
    """T = 0 plans, dispatches and combines to an empty (0, D) output."""
    E, K, D = 3, 2, 5
    experts_TK = torch.zeros(0, K, dtype=torch.int64)
    x_TD = torch.zeros(0, D)
    plan = plan_dispatch(experts_TK, E)
    assert plan.counts_E.tolist() == [0, 0, 0]
    x_RD = dispatch(x_TD, plan)
    assert x_RD.shape == (0, D)
    out_TD = combine(x_RD, plan, torch.zeros(0, K))
    assert out_TD.shape == (0, D)


@settings(max_examples=25, deadline=None)
@given(routings(), st.integers(0, 12), st.booleans())
def test_dispatch_combine_gradcheck(case, cap, expanded):
    """Both custom backwards (the gather's index_add_, the weighted sum's bmm) pass gradcheck in
    float64, with and without a capacity bound on the rows, for any incoming gradient layout."""
    E, experts_TK, weights_TK, x_TD = case
    has_empty = bool((experts_TK == E).any())
    plan = plan_dispatch(experts_TK, E, max_rows=cap * E, has_empty=has_empty)
    scale_R = torch.linspace(0.5, 2.0, plan.order_R.numel(), dtype=torch.float64)

    def f(x, w):
        out = combine(dispatch(x, plan) * scale_R[:, None], plan, w)
        return out.sum() if expanded else out  # .sum()'s gradient reaches the backwards expanded

    assert torch.autograd.gradcheck(f, (x_TD.requires_grad_(), weights_TK.requires_grad_()))


def test_dispatch_combine_bf16_gradients_round_once():
    """In bf16 the gather's backward (an index_add_ on the CPU) rounds each token's sum of K row
    gradients once: it equals the float64 sum rounded, as a bf16 ``sum(dim)`` would; and the bf16
    combine stays within bf16 error of float64."""
    g = torch.Generator().manual_seed(0)
    T, K, D, E = 64, 8, 32, 8
    experts_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    x64 = torch.randn(T, D, generator=g, dtype=torch.float64)
    w64 = torch.rand(T, K, generator=g, dtype=torch.float64)
    g_RD = torch.randn(T * K, D, generator=g, dtype=torch.float64).bfloat16()
    plan = plan_dispatch(experts_TK, E)
    grads = []
    for dt in (torch.float64, torch.bfloat16):
        x = x64.to(dt).detach().requires_grad_()
        dispatch(x, plan).backward(g_RD.to(dt))
        grads.append(x.grad)
    assert grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(grads[1], grads[0].bfloat16(), rtol=0, atol=0)
    y = torch.randn(T * K, D, generator=g, dtype=torch.float64)
    out64 = combine(y, plan, w64)
    out16 = combine(y.bfloat16(), plan, w64.bfloat16())
    torch.testing.assert_close(out16.double(), out64, rtol=3e-2, atol=3e-2)


def test_cpu_autocast_training_any_top_k():
    """Under CPU bf16 autocast the combine runs in the experts' output dtype and its backward works,
    for the bmm form (K > 2) and the addcmul form (K <= 2); gradients stay within bf16 error of
    float32 without autocast. (The bmm form once produced bf16 from fp32 inputs under autocast and
    its backward then failed on mixed dtypes.)"""
    from moekit import MoE, MoEConfig

    for k in (2, 3, 4):  # every expert chosen (K = E), so bf16 cannot flip the routing
        torch.manual_seed(0)
        moe = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=k, top_k=k, router="topk")).train()
        x = torch.randn(12, 16)
        grads = []
        for amp in (False, True):
            moe.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = moe(x)
            (out.out.float().square().sum() + out.aux_loss).backward()
            grads.append([p.grad.clone() for p in moe.parameters()])
        for g32, g16 in zip(*grads):
            assert torch.isfinite(g16).all()
            torch.testing.assert_close(g16, g32, rtol=0.1, atol=0.1 * g32.abs().max().item())
