"""What ``MoEFeedForward`` keeps for ``moekit.aux_loss`` stays bounded whatever the loop does, and
the layer runs under ``torch.compile``.

Memory is counted as objects, not RSS: weak references to the tensors each call returned or saved
in its autograd graph (the input of the layer is saved by the router), alive after the loop.
"""

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from moekit import MoE, MoEConfig, MoEFeedForward, aux_loss

D = 16
NO_LOSS = dict(balance_loss_weight=0.0, z_loss_weight=0.0)


def _cfg(**kw) -> MoEConfig:
    base = dict(dim=D, hidden_dim=32, num_experts=4, top_k=2, balance_loss_weight=0.1, z_loss_weight=0.01)
    base.update(kw)
    return MoEConfig(**base)


def _twin(ff: MoEFeedForward) -> MoE:
    moe = MoE(ff.moe.cfg)
    moe.load_state_dict(ff.moe.state_dict())
    return moe.train(ff.training)


def _alive(refs: list) -> int:
    gc.collect()
    return sum(r() is not None for r in refs)


@pytest.mark.parametrize("weights", [{}, NO_LOSS], ids=["losses", "no-losses"])
def test_a_loop_that_backpropagates_but_never_collects_frees_each_call(weights):
    """forward + backward, never aux_loss: each step's output is freed (it was not: the hook that
    marks a call backpropagated held the call, a cycle through autograd the collector cannot see,
    so every output lived forever, with every loss weight 0 too)."""
    torch.manual_seed(0)
    ff = MoEFeedForward(_cfg(**weights))
    model = nn.Sequential(nn.Linear(8, D), ff)
    refs = []
    for _ in range(40):
        out = model(torch.randn(8, 8))
        refs.append(weakref.ref(out))
        out.square().mean().backward()
        del out
    assert _alive(refs) <= 2  # ff.last, and the last call kept until the next one


def test_forwards_never_backpropagated_nor_collected_keep_at_most_max_uncollected():
    """Training-mode forwards with autograd and no backward (e.g. metrics without no_grad): the layer
    keeps the newest ``max_uncollected`` calls, warns once, and collects exactly those."""
    torch.manual_seed(0)
    ff = MoEFeedForward(_cfg())
    ff.max_uncollected = 8
    pre = nn.Linear(8, D)
    refs, inputs = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(30):
            h = pre(torch.randn(8, 8))
            refs.append(weakref.ref(h))
            inputs.append(h.detach())
            ff(h)
            del h
    assert _alive(refs) == 8  # the graphs of the newest 8 calls; ff.last is the newest of them
    messages = [str(w.message) for w in caught if "MoEFeedForward" in str(w.message)]
    assert len(messages) == 1 and "8 calls" in messages[0] and "forgets the oldest" in messages[0]
    moe = _twin(ff)
    want = sum(moe(h).aux_loss for h in inputs[-8:])
    torch.testing.assert_close(aux_loss(ff), want)


def test_the_default_bound_holds_without_setting_it():
    ff = MoEFeedForward(_cfg(dim=D, hidden_dim=4))
    n = MoEFeedForward.max_uncollected
    refs = []
    with pytest.warns(UserWarning, match="forgets the oldest"):
        for _ in range(n + 20):
            x = torch.randn(2, D, requires_grad=True)
            refs.append(weakref.ref(x))
            ff(x)
            del x
    assert _alive(refs) == n


def test_with_every_loss_weight_zero_nothing_is_kept():
    """The aux loss is then a constant 0: no call is kept (only ``last``), nothing warns, and
    aux_loss gives 0."""
    ff = MoEFeedForward(_cfg(**NO_LOSS))
    ff.max_uncollected = 4
    refs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(20):
            x = torch.randn(6, D, requires_grad=True)
            refs.append(weakref.ref(x))
            ff(x)
            del x
    assert _alive(refs) == 1  # ff.last's graph
    assert ff.last is not None and float(ff.last.aux_loss) == 0.0
    total = aux_loss(ff)
    assert float(total) == 0.0 and not total.requires_grad
    ff.moe.cfg.z_loss_weight = 0.01  # a weight turned on later counts from the next call
    x = torch.randn(6, D)
    ff(x)
    torch.testing.assert_close(aux_loss(ff), _twin(ff)(x).aux_loss)


def test_several_forwards_then_one_collection_is_the_sum_of_their_losses():
    """Gradient accumulation in one graph: the losses of several forwards are summed, value and
    gradient, as MoE's returned aux losses are."""
    torch.manual_seed(0)
    ff = MoEFeedForward(_cfg(importance_loss_weight=0.05))
    moe = _twin(ff)
    xs = [torch.randn(10, D) for _ in range(5)]
    for x in xs:
        ff(x)
    got = aux_loss(ff)
    want = sum(moe(x).aux_loss for x in xs)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, [ff.moe.router.linear.weight])
    (g_want,) = torch.autograd.grad(want, [moe.router.linear.weight])
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_dropin_equals_eager(backend):
    """torch.compile of a model holding the drop-in layer: output, collected aux loss and every
    parameter's gradient equal eager (same weights, same input)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ff = MoEFeedForward(_cfg(capacity_factor=1.0))
    model = nn.Sequential(nn.Linear(8, D), ff, nn.Linear(D, 3))
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 12, 8)
    results = []
    for m in (model, compiled):
        y = m(x)
        aux = aux_loss(model)
        grads = torch.autograd.grad(y.square().mean() + aux, list(model.parameters()))
        results.append((y, aux, grads))
    (y_e, aux_e, g_e), (y_c, aux_c, g_c) = results
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(aux_c, aux_e)
    assert float(aux_e.detach()) > 0
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)
    assert float(aux_loss(model)) == 0.0  # collected once
