"""Adding a router or an expert backend touches one module: a class or function registered with
``register_router`` / ``register_backend`` is accepted by MoEConfig and used by the layer, with
no other change. Checked here with a router and a backend defined in this test file only."""

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.config import BACKENDS, ROUTER_KINDS
from moekit.kernels import _BACKENDS, expert_ffn, loop_ffn, register_backend
from moekit.kernels.activations import activation_fn
from moekit.layer.router import ROUTERS, Router, Routing, register_router


class SoftmaxThenTopK(Router):
    """Softmax over all experts, the top-k probabilities as weights (the test's own router)."""

    def route(self, x_TD, top_k, token_ids_T=None):
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        weights_TK, experts_TK = probs_TE.topk(top_k, dim=-1)
        return Routing(experts_TK, weights_TK, logits_TE, probs_TE)


calls = []


def counted_loop(x_RD, counts_E, w_up_EDH, w_down_EFD, act):
    calls.append(x_RD.shape[0])
    return loop_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, activation_fn(act))


@pytest.fixture
def registered():
    register_router("softmax_then_topk", SoftmaxThenTopK)
    register_backend("counted_loop", counted_loop)
    yield
    for registry, names, name in ((ROUTERS, ROUTER_KINDS, "softmax_then_topk"), (_BACKENDS, BACKENDS, "counted_loop")):
        registry.pop(name)
        names.remove(name)


def test_a_registered_router_and_backend_run_in_the_layer(registered):
    torch.manual_seed(0)
    kw = dict(dim=16, hidden_dim=8, num_experts=4, top_k=2, balance_loss_weight=0.1)
    ref = MoE(MoEConfig(router="topk", renormalize=False, backend="loop", **kw)).double()
    mine = MoE(MoEConfig(router="softmax_then_topk", backend="counted_loop", **kw)).double()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    r, o = ref(x), mine(x)
    torch.testing.assert_close(o.out, r.out)
    torch.testing.assert_close(o.aux_loss, r.aux_loss)
    assert calls, "the registered backend was not called"
    g_ref = torch.autograd.grad(r.out.square().sum() + r.aux_loss, [x, *ref.parameters()])
    g_mine = torch.autograd.grad(o.out.square().sum() + o.aux_loss, [x, *mine.parameters()])
    for a, b in zip(g_mine, g_ref):
        torch.testing.assert_close(a, b)


def test_unregistered_names_are_clear_errors():
    with pytest.raises(ValueError, match="router must be one of"):
        MoEConfig(dim=8, hidden_dim=8, num_experts=4, router="softmax_then_topk")
    with pytest.raises(ValueError, match="backend must be one of"):
        MoEConfig(dim=8, hidden_dim=8, num_experts=4, backend="counted_loop")
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="backend must be one of 'loop', 'grouped', 'triton'"):
        expert_ffn(x, torch.tensor([4]), torch.randn(1, 8, 8), torch.randn(1, 8, 8), "relu", "counted_loop")
    with pytest.raises(TypeError, match="subclass of moekit.layer.router.Router"):
        register_router("bad", object)
