"""The few-slot inference path (kernels/slots.py) equals the plain loop: every form, every router
that can take it, shared experts, autocast, and the layer under torch.compile."""

import copy

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.kernels import slots
from moekit.layer.experts import ACTIVATIONS


def reference(x_TD, experts_TK, weights_TK, w_up, w_down, act):
    """sum_k w * ffn_e(x), one token and one slot at a time, in float64; id E adds nothing."""
    out = torch.zeros(x_TD.shape[0], w_down.shape[-1], dtype=torch.float64)
    for t in range(x_TD.shape[0]):
        for k in range(experts_TK.shape[1]):
            e = int(experts_TK[t, k])
            if e < w_up.shape[0]:
                h = act(x_TD[t : t + 1].double() @ w_up[e].double()) @ w_down[e].double()
                out[t] += weights_TK[t, k].double() * h[0]
    return out


@pytest.mark.parametrize("form", ["_host_loop", "_all_experts", "_reduce_form", "_gathered_bmm"])
@pytest.mark.parametrize("T", [1, 3, 9])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_every_form_equals_the_slot_by_slot_reference(form, T, kind):
    torch.manual_seed(T)
    E, D, F_, K = 6, 16, 12, 3
    H = 2 * F_ if kind == "swiglu" else F_
    w_up, w_down = torch.randn(E, D, H), torch.randn(E, F_, D)
    x = torch.randn(T, D)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    experts[0, -1] = E  # an empty slot (dropped, or expert choice's)
    if T > 1:
        experts[1, 1] = experts[1, 0]  # the same expert twice in one token (the random router can)
    weights = torch.rand(T, K)
    fn = getattr(slots, form)
    args = (x, experts, weights, w_up, w_down, ACTIVATIONS[kind])
    got = fn(*args, torch.zeros(T, D)) if form == "_host_loop" else fn(*args)
    torch.testing.assert_close(got.double(), reference(*args), rtol=1e-4, atol=1e-4)


def pair(cfg):
    """The layer (backend auto -> grouped on CPU) and a copy running the plain loop."""
    fast = MoE(cfg).eval()
    ref = copy.deepcopy(fast)
    ref.cfg = MoEConfig(**{**cfg.__dict__, "backend": "loop"})
    return fast, ref


ROUTERS = [
    dict(router="topk"),
    dict(router="topk", renormalize=False),
    dict(router="sigmoid", num_shared_experts=1),
    dict(router="sigmoid", num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
    dict(router="noisy_topk"),
    dict(router="random"),
    dict(router="hash"),
    dict(router="topk", num_shared_experts=2, shared_expert_gate=True),
]


@pytest.mark.parametrize("extra", ROUTERS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("T", [1, 5])
def test_layer_without_grad_takes_the_path_and_equals_the_loop(extra, T, monkeypatch):
    torch.manual_seed(0)
    cfg = MoEConfig(dim=16, hidden_dim=24, num_experts=8, top_k=2, **extra)
    fast, ref = pair(cfg)
    if cfg.router == "sigmoid":
        fast.router.bias_E.copy_(torch.randn(8) * 0.1)
        ref.router.bias_E.copy_(fast.router.bias_E)
    x = torch.randn(T, 16)
    ids = torch.randint(0, 100, (T,))
    taken = []
    real = slots.slot_ffn
    monkeypatch.setattr(slots, "slot_ffn", lambda *a, **k: taken.append(1) or real(*a, **k))
    with torch.no_grad():
        got = fast(x, token_ids=ids)
        want = ref(x, token_ids=ids)
    assert taken, "the no-grad call with few slots takes the few-slot path"
    torch.testing.assert_close(got.out, want.out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)  # the deferred statistics see the same routing
    torch.testing.assert_close(got.stats["tokens_per_expert"], want.stats["tokens_per_expert"])
    with_grad = fast(x, token_ids=ids)  # autograd on: the grouped path, same numbers
    torch.testing.assert_close(with_grad.out, want.out, rtol=1e-5, atol=1e-6)


def test_many_slots_a_capacity_or_grad_keep_the_grouped_path(monkeypatch):
    taken = []
    real = slots.slot_ffn
    monkeypatch.setattr(slots, "slot_ffn", lambda *a, **k: taken.append(1) or real(*a, **k))
    moe = MoE(MoEConfig(dim=16, hidden_dim=16, num_experts=8, top_k=2)).eval()
    capped = MoE(MoEConfig(dim=16, hidden_dim=16, num_experts=8, top_k=2, capacity_factor=1.0)).eval()
    with torch.no_grad():
        moe(torch.randn(slots.SMALL_SLOTS // 2 + 1, 16))
        capped(torch.randn(2, 16))
    moe(torch.randn(2, 16))
    assert not taken


def test_bf16_autocast_matches_the_loop():
    torch.manual_seed(1)
    fast, ref = pair(MoEConfig(dim=32, hidden_dim=32, num_experts=8, top_k=2, num_shared_experts=1))
    x = torch.randn(3, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fast(x).out, ref(x).out
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_under_torch_compile_the_layer_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(2)
    moe = MoE(MoEConfig(dim=16, hidden_dim=16, num_experts=8, top_k=2, router="sigmoid", num_shared_experts=1)).eval()
    compiled = torch.compile(moe, fullgraph=True)
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).out, moe(x).out, rtol=1e-5, atol=1e-6)


def test_cached_expert_views_follow_the_weights():
    """The per-expert weight views kept for eager decoding see in-place updates (an optimizer
    step, surgery) and are rebuilt when the weights' storage changes (a dtype move), so decoding
    always equals the dispatch path on the current weights."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=2, num_shared_experts=1)).eval()
    x = torch.randn(1, 16)

    def check():
        with torch.no_grad():
            fast = moe(x).out  # few-slot path (no grad, one token)
        ref = moe(x).out.detach()  # with grad enabled: the dispatch path
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)

    check()
    with torch.no_grad():
        moe.experts.w_up.mul_(-2.0)  # in place: the kept views see it
        moe.experts.w_down.add_(0.5)
    check()
    moe.double()
    x = x.double()
    assert moe.experts._views is None  # dropped by the move
    check()
    assert moe.experts._views is not None and moe.experts._views[1][0].dtype == torch.float64


def test_expert_views_only_without_grad_and_dropped_on_load():
    """The kept views carry no gradient, so they are never handed out with grad enabled; and
    ``load_state_dict(assign=True)``, which replaces the parameters, drops them at once."""
    moe = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=2)).eval()
    ex = moe.experts
    assert ex._expert_views(ex.w_up, ex.w_down) is None  # grad enabled
    with torch.no_grad():
        assert ex._expert_views(ex.w_up, ex.w_down) is not None
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    moe.load_state_dict(state, assign=True)
    assert ex._views is None
