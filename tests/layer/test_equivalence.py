"""The equivalence ladder (MegaBlocks-style): dense FFN == 1-expert top-1 MoE == the plain
reference loop == the grouped backend, forward and every gradient."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from moekit import FeedForward, MoE, MoEConfig
from moekit.kernels import grouped_mm_supported
from reference import dense_ffn, moe_reference

KINDS = ["swiglu", "geglu", "gelu", "relu"]
NO_AUX = dict(balance_loss_weight=0.0, z_loss_weight=0.0)


def _grads(module, x, out, g):
    module.zero_grad(set_to_none=True)
    x.grad = None
    out.backward(g)
    return x.grad.clone(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_one_expert_top1_moe_equals_dense_ffn(kind, backend):
    """A 1-expert top-1 MoE must be exactly its dense FFN, forward and backward."""
    moe = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=1, top_k=1, expert=kind, backend=backend, **NO_AUX))
    ffn = FeedForward(16, 32, kind)
    with torch.no_grad():
        ffn.load_fused_up_(moe.experts.w_up[0])
        ffn.w_down.copy_(moe.experts.w_down[0])
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 16)
    out = moe(x).out
    ref = ffn(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ref, dense_ffn(x, ffn.fused_up, ffn.w_down, kind))
    gx, gp = _grads(moe, x, out, g)
    gx_ref, gp_ref = _grads(ffn, x, ffn(x), g)
    torch.testing.assert_close(gx, gx_ref)
    fused_ref = torch.cat([gp_ref["w_gate"], gp_ref["w_up"]], 1) if "w_gate" in gp_ref else gp_ref["w_up"]
    torch.testing.assert_close(gp["experts.w_up"][0], fused_ref)
    torch.testing.assert_close(gp["experts.w_down"][0], gp_ref["w_down"])


def _skewed(moe: MoE, dead: int) -> MoE:
    """Give the last ``dead`` experts a huge negative router bias so they receive no token."""
    with torch.no_grad():
        moe.router.linear.bias.zero_()
        moe.router.linear.bias[moe.num_experts - dead :] = -1e4
    return moe


SHAPES = [  # T, D, F, E, K, dead experts
    (37, 16, 24, 4, 2, 1),
    (64, 32, 16, 8, 1, 3),
    (50, 24, 40, 16, 4, 8),
    (7, 8, 8, 5, 3, 0),
    (128, 64, 32, 32, 8, 10),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_loop_equals_grouped(shape, dtype):
    """The grouped backend must match the plain loop, forward and all gradients, empty experts included."""
    T, D, F, E, K, dead = shape
    cfg = MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, backend="loop", router_bias=True)
    loop = _skewed(MoE(cfg), dead).to(dtype)
    grouped = copy.deepcopy(loop)
    grouped.cfg = dataclasses.replace(cfg, backend="grouped")
    x = torch.randn(T, D, dtype=dtype)
    g = torch.randn(T, D, dtype=dtype)
    results = []
    for m in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        res = m(xi)
        gx, gp = _grads(m, xi, res.out + 0 * res.aux_loss, g)
        results.append((res.out.detach(), gx, gp, res.stats["tokens_per_expert"]))
    (o1, gx1, gp1, c1), (o2, gx2, gp2, c2) = results
    if dead:
        assert (c1[E - dead :] == 0).all()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(o2, o1, **tol)
    torch.testing.assert_close(gx2, gx1, **tol)
    assert gp1.keys() == gp2.keys()
    for n in gp1:
        torch.testing.assert_close(gp2[n], gp1[n], **tol)


def test_grouped_backend_really_uses_grouped_mm():
    """The aligned shapes in SHAPES must take the grouped_mm path (else the comparison is loop vs loop)."""
    w = torch.empty(4, 32, 64)
    assert grouped_mm_supported(torch.empty(3, 32), w)
    assert grouped_mm_supported(torch.empty(3, 32, dtype=torch.bfloat16), w.bfloat16())
    assert not grouped_mm_supported(torch.empty(3, 32, dtype=torch.float64), w.double())


ROUTERS = [
    ("topk", 2),
    ("topk", 1),
    ("switch", 1),
    ("noisy_topk", 2),
    ("expert_choice", 2),
    ("hash", 2),
    ("random", 2),
    ("sigmoid", 3),
]


@pytest.mark.parametrize("router,k", ROUTERS)
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("training", [True, False])
def test_moe_matches_reference_for_every_router(router, k, capacity_factor, training):
    """For every router, the layer output is sum_k w * FFN_e(x) over the routed (kept) slots."""
    if capacity_factor is not None and router == "expert_choice":
        pytest.skip("expert choice has its own capacity")
    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=6, top_k=k, router=router, capacity_factor=capacity_factor)
    moe = MoE(cfg).train(training)
    x_TD = torch.randn(40, 16, requires_grad=True)
    ids_T = torch.randint(0, 1000, (40,))
    torch.manual_seed(1)
    res = moe(x_TD, token_ids=ids_T)
    torch.manual_seed(1)
    routing = moe.router(x_TD, k, ids_T)  # same random draws as inside the layer
    experts_TK, weights_TK = routing.experts_TK, routing.weights_TK
    if capacity_factor is not None:
        from moekit.layer import apply_capacity, expert_capacity

        C = expert_capacity(40, k, 6, capacity_factor)
        experts_TK, weights_TK = apply_capacity(experts_TK, weights_TK, C, 6, probs_TE=routing.probs_TE)
    ref = moe_reference(x_TD, experts_TK, weights_TK, moe.experts.w_up, moe.experts.w_down)
    torch.testing.assert_close(res.out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    gx = torch.autograd.grad(res.out, x_TD, g)[0]
    gx_ref = torch.autograd.grad(ref, x_TD, g)[0]
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    """float64 finite differences agree with autograd through router, dispatch, experts and combine."""
    cfg = MoEConfig(
        dim=4,
        hidden_dim=6,
        num_experts=3,
        top_k=2,
        router_dtype="same",
        backend="grouped",
        balance_loss_weight=0.1,
        z_loss_weight=0.01,
    )
    moe = MoE(cfg).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = dict(moe.named_parameters())
    names = list(params)

    def f(x, *ps):
        res = torch.func.functional_call(moe, dict(zip(names, ps)), (x,))
        return res.out, res.aux_loss

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_(True) for p in params.values()]))


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_add_a_dense_ffn(gate):
    """Shared experts (DeepSeekMoE) add one dense FFN of n * shared width to the routed output (gated in Qwen2-MoE)."""
    cfg = MoEConfig(
        dim=16,
        hidden_dim=8,
        num_experts=4,
        top_k=2,
        num_shared_experts=2,
        shared_hidden_dim=12,
        shared_expert_gate=gate,
    )
    moe = MoE(cfg).eval()
    assert moe.shared.w_gate.shape == moe.shared.w_up.shape == (16, 2 * 12)
    x = torch.randn(10, 16)
    routing = moe.router(x, 2)
    routed = moe_reference(x, routing.experts_TK, routing.weights_TK, moe.experts.w_up, moe.experts.w_down)
    shared = dense_ffn(x, moe.shared.fused_up, moe.shared.w_down)
    if gate:
        shared = shared * torch.sigmoid(x @ moe.shared_gate.weight.t())
    torch.testing.assert_close(moe(x).out, routed + shared)


class _Conv(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x.unsqueeze(1)).squeeze(1)


class _Attn(nn.Module):
    """Self-attention over the feature vector cut into 4 pieces."""

    def __init__(self, d):
        super().__init__()
        self.attn = nn.MultiheadAttention(d // 4, 1, batch_first=True)

    def forward(self, x):
        s = x.view(x.shape[0], 4, -1)
        return self.attn(s, s, s, need_weights=False)[0].reshape(x.shape)


def test_heterogeneous_experts_match_reference():
    """A list of different modules (widths, activations, a conv, an attention block) routes like the stacked experts."""
    D = 16
    experts = [
        FeedForward(D, 8, "relu"),
        FeedForward(D, 40, "swiglu"),
        nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, D)),
        _Conv(D),
        _Attn(D),
    ]
    moe = MoE(MoEConfig(dim=D, hidden_dim=1, num_experts=5, top_k=2), experts=experts).eval()
    x = torch.randn(30, D, requires_grad=True)
    res = moe(x)
    routing = moe.router(x, 2)
    ref = torch.zeros_like(x)
    for e, m in enumerate(experts):
        w_T = (routing.weights_TK * (routing.experts_TK == e)).sum(-1)
        ref = ref + w_T[:, None] * m(x)
    torch.testing.assert_close(res.out, ref, rtol=1e-5, atol=1e-6)
    res.out.sum().backward()
    assert all(p.grad is not None for m in experts for p in m.parameters()), (
        "every expert that got a token gets a gradient"
    )
