"""The drop-in form of the layer: ``MoEFeedForward`` returns a tensor like a feed-forward block,
and ``moekit.aux_loss(model)`` collects the auxiliary losses it kept aside, each call's once.

Checked against the plain ``MoE`` (same weights): outputs, aux losses and their gradients.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import moekit
from moekit import MoE, MoEConfig, MoEFeedForward, aux_loss

D = 16


def _cfg(**kw):
    base = dict(dim=D, hidden_dim=32, num_experts=4, top_k=2, balance_loss_weight=0.1, z_loss_weight=0.01)
    base.update(kw)
    return MoEConfig(**base)


def _twin(ff: MoEFeedForward) -> MoE:
    """A plain MoE with the drop-in layer's weights."""
    moe = MoE(ff.moe.cfg)
    moe.load_state_dict(ff.moe.state_dict())
    return moe.train(ff.training)


def test_exported_from_the_package_and_the_layer_module():
    assert moekit.MoEFeedForward is moekit.layer.MoEFeedForward is MoEFeedForward
    assert moekit.aux_loss is moekit.layer.aux_loss is aux_loss
    assert "MoEFeedForward" in moekit.__all__ and "aux_loss" in moekit.__all__


def test_sequential_linear_dropin_linear_trains_a_step():
    """nn.Sequential(Linear, MoEFeedForward, Linear) runs, and one optimizer step on task + aux
    loss changes every parameter (router included) and lowers the loss on that batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, D), MoEFeedForward(_cfg()), nn.Linear(D, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (64, 3)
    loss = F.cross_entropy(logits, y) + aux_loss(model)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[n]), n
    with torch.no_grad():
        after = F.cross_entropy(model(x), y) + aux_loss(model)
    assert float(after) < float(loss.detach())


@pytest.mark.parametrize("train", [True, False])
def test_output_equals_moe_out_and_last_is_the_moe_output(train):
    """The drop-in output equals MoE(x).out (same weights), leading dims kept; ``last`` holds the
    MoEOutput of that call (losses and stats equal the plain layer's)."""
    ff = MoEFeedForward(_cfg(capacity_factor=1.0)).train(train)
    moe = _twin(ff)
    x = torch.randn(3, 7, D)
    out = ff(x)
    res = moe(x)
    assert out.shape == x.shape
    assert torch.equal(out, res.out)
    assert ff.last.out is out
    torch.testing.assert_close(ff.last.aux_loss, res.aux_loss)
    assert ff.last.losses.keys() == res.losses.keys()
    assert torch.equal(ff.last.stats["tokens_per_expert"], res.stats["tokens_per_expert"])


def test_keyword_arguments_reach_the_moe():
    """top_k, token_ids and capacity_factor pass through (here: the per-call top_k)."""
    ff = MoEFeedForward(_cfg()).eval()
    moe = _twin(ff)
    x = torch.randn(10, D)
    assert torch.equal(ff(x, top_k=1), moe(x, top_k=1).out)
    h = MoEFeedForward(_cfg(router="hash", top_k=1))
    ids = torch.arange(10)
    assert torch.equal(h(x, token_ids=ids), _twin(h)(x, token_ids=ids).out)


def test_aux_loss_value_and_gradient_equal_res_aux_loss():
    """aux_loss(model) after a forward is the MoE's res.aux_loss, and so is its gradient w.r.t.
    the router, the input and the layer before."""
    torch.manual_seed(0)
    pre = nn.Linear(8, D)
    ff = MoEFeedForward(_cfg(importance_loss_weight=0.1, sq_load_loss_weight=0.1))
    moe = _twin(ff)
    x = torch.randn(40, 8)
    model = nn.Sequential(pre, ff)
    model(x)
    got = aux_loss(model)
    params = [pre.weight, ff.moe.router.linear.weight]
    g_got = torch.autograd.grad(got, params)
    res = moe(pre(x))
    g_want = torch.autograd.grad(res.aux_loss, [pre.weight, moe.router.linear.weight])
    torch.testing.assert_close(got, res.aux_loss)
    assert got.requires_grad and float(got.detach()) > 0
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_collecting_twice_does_not_double_count():
    """A collection forgets what it returned: a second one without a new forward is 0 (and has no
    gradient); after the next forward it is that forward's loss alone."""
    ff = MoEFeedForward(_cfg())
    x1, x2 = torch.randn(20, D), torch.randn(20, D)
    ff(x1)
    first = aux_loss(ff)
    assert float(first.detach()) > 0
    again = aux_loss(ff)
    assert float(again) == 0.0 and not again.requires_grad
    ff(x2)
    torch.testing.assert_close(aux_loss(ff), _twin(ff)(x2).aux_loss)
    # the layer's last output stays readable after collecting
    assert ff.last is not None and float(ff.last.aux_loss.detach()) > 0


def test_two_dropin_layers_are_summed():
    """A model with two drop-in layers: the sum of both layers' res.aux_loss, gradients included."""
    torch.manual_seed(0)
    ff1, ff2 = MoEFeedForward(_cfg()), MoEFeedForward(_cfg(router="sigmoid", top_k=3))
    lin = nn.Linear(D, D)
    model = nn.Sequential(ff1, lin, ff2)
    x = torch.randn(30, D)
    model(x)
    got = aux_loss(model)
    m1, m2 = _twin(ff1), _twin(ff2)
    r1 = m1(x)
    r2 = m2(lin(r1.out))
    want = r1.aux_loss + r2.aux_loss
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, [ff1.moe.router.linear.weight, ff2.moe.router.linear.weight, lin.weight])
    g_want = torch.autograd.grad(want, [m1.router.linear.weight, m2.router.linear.weight, lin.weight])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_a_layer_called_twice_counts_both_calls():
    """Weight sharing: one drop-in instance used twice in a forward contributes both calls."""
    ff = MoEFeedForward(_cfg())
    model = nn.Sequential(ff, nn.Tanh(), ff)
    x = torch.randn(12, D)
    model(x)
    moe = _twin(ff)
    r1 = moe(x)
    r2 = moe(torch.tanh(r1.out))
    torch.testing.assert_close(aux_loss(model), r1.aux_loss + r2.aux_loss)


def test_two_forwards_then_one_collection_counts_both():
    """Two forwards before one backward (e.g. two views of a batch): both calls are collected."""
    ff = MoEFeedForward(_cfg())
    a, b = torch.randn(12, D), torch.randn(12, D)
    ff(a)
    ff(b)
    moe = _twin(ff)
    torch.testing.assert_close(aux_loss(ff), moe(a).aux_loss + moe(b).aux_loss)


def test_uncollected_losses_do_not_pile_up():
    """A training loop that never collects keeps at most the calls not yet backpropagated (no
    growing list of graphs); calls without autograd or in eval mode keep only the last one."""
    ff = MoEFeedForward(_cfg())
    for _ in range(5):
        ff(torch.randn(8, D)).sum().backward()
    ff(torch.randn(8, D)).sum().backward()
    assert len(ff._uncollected) == 1  # the last call: backpropagated, dropped at the next call
    with torch.no_grad():
        for _ in range(5):
            ff(torch.randn(8, D))
    assert len(ff._uncollected) == 1
    x = torch.randn(8, D)
    with torch.no_grad():
        ff(x)
        torch.testing.assert_close(aux_loss(ff), _twin(ff)(x).aux_loss)
    # a call with autograd and no backward yet is kept through later calls (it may still be used)
    out_y = ff(torch.randn(8, D))
    with torch.no_grad():
        ff(torch.randn(8, D))
    out_z = ff(torch.randn(8, D))  # drops the no-grad call
    out_z.sum().backward()
    assert [id(c.output.out) for c in ff._uncollected] == [id(out_y), id(out_z)]
    out_x = ff(x)  # drops the backpropagated call
    assert [id(c.output.out) for c in ff._uncollected] == [id(out_y), id(out_x)]
    aux_loss(ff)
    ff.eval()  # an evaluation loop that forgot torch.no_grad
    for _ in range(5):
        out = ff(torch.randn(8, D, requires_grad=True))
        assert out.requires_grad
    assert len(ff._uncollected) == 1


def test_eval_collection_resolves_deferred_losses():
    """In eval mode the MoE defers its losses; collecting still returns their value."""
    ff = MoEFeedForward(_cfg()).eval()
    x = torch.randn(9, D)
    with torch.no_grad():
        ff(x)
        torch.testing.assert_close(aux_loss(ff), _twin(ff)(x).aux_loss)


@pytest.mark.parametrize("early_stop", [True, False])
def test_activation_checkpointing_does_not_add_a_call(early_stop):
    """Non-reentrant activation checkpointing re-runs the forward during backward (to the end when
    early stopping is off); that re-run is not a new call: gradients equal the plain layer's and
    nothing is left to collect afterwards."""
    torch.manual_seed(0)
    ff = MoEFeedForward(_cfg())
    moe = _twin(ff)
    x = torch.randn(10, D, requires_grad=True)
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        out = checkpoint(ff, x, use_reentrant=False)
        loss = out.square().mean() + aux_loss(ff)
        gx = torch.autograd.grad(loss, x)[0]
    res = moe(x)
    torch.testing.assert_close(gx, torch.autograd.grad(res.out.square().mean() + res.aux_loss, x)[0])
    assert float(aux_loss(ff)) == 0.0


def test_model_without_dropin_layers_gives_zero():
    z = aux_loss(nn.Linear(3, 3))
    assert z.shape == () and float(z) == 0.0


def test_deepcopy_and_state_dict_after_a_forward():
    """A model can be deep-copied (EMA copies) or pickled after a forward: the kept outputs are
    not part of the copy; the weights are, under the same names as the MoE's."""
    ff = MoEFeedForward(_cfg())
    ff(torch.randn(6, D))
    twin = copy.deepcopy(ff)
    assert twin.last is None and float(aux_loss(twin)) == 0.0
    assert float(aux_loss(ff).detach()) > 0
    assert set(ff.state_dict()) == {f"moe.{k}" for k in MoE(_cfg()).state_dict()}
    x = torch.randn(5, D)
    assert torch.equal(twin(x), ff(x))


def test_wraps_an_existing_moe_and_rejects_bad_arguments():
    moe = MoE(_cfg())
    ff = MoEFeedForward(moe)
    assert ff.moe is moe
    with pytest.raises(TypeError, match="cfg"):
        MoEFeedForward({"dim": D})
    with pytest.raises(ValueError, match="experts"):
        MoEFeedForward(moe, experts=[nn.Linear(D, D) for _ in range(4)])
    with pytest.raises(TypeError, match="model"):
        aux_loss("not a module")
