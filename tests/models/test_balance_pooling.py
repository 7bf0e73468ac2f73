"""LMConfig.balance_pooling="model": one Switch balance loss on counts and router probabilities pooled
over the MoE layers (transformers' load_balancing_loss_func convention, divided by top_k)."""

import pytest
import torch

from moekit import MoEConfig
from moekit.config import LMConfig
from moekit.models import MoETransformer


def tiny(pooling, n_layers=3, **moe_kw):
    moe = dict(dim=32, hidden_dim=24, num_experts=4, top_k=2, balance_loss_weight=0.1, z_loss_weight=1e-3)
    moe.update(moe_kw)
    torch.manual_seed(0)
    return MoETransformer(
        LMConfig(
            vocab_size=50,
            dim=32,
            n_layers=n_layers,
            n_heads=4,
            max_seq_len=16,
            balance_pooling=pooling,
            moe=MoEConfig(**moe),
        )
    ).train()


def _reference(logits_per_layer, E, K):
    """Straight from the definition: f_i = expert i's share of all layers' top-k slots, P_i = its
    softmax probability averaged over all layers' tokens; E * sum_i f_i P_i."""
    logits = torch.cat(logits_per_layer)  # (L*T, E), as transformers concatenates the layers
    probs = logits.float().softmax(-1)
    chosen = probs.topk(K, dim=-1).indices
    f = torch.zeros(E).scatter_add_(0, chosen.flatten(), torch.ones(chosen.numel())) / chosen.numel()
    return E * (f * probs.mean(0)).sum()


def test_pooled_balance_loss_matches_its_definition_value_and_gradient():
    model = tiny("model")
    logits = []
    for m in model.moe_layers:
        m.router.register_forward_hook(lambda mod, args, out: logits.append(out.logits_TE))
    x = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    out = model(x)
    want = _reference(logits, 4, 2)
    assert out.pooled_balance_loss.item() == pytest.approx(want.item(), rel=1e-6)
    routers = [m.router.linear.weight for m in model.moe_layers]
    g_got = torch.autograd.grad(out.pooled_balance_loss, routers, retain_graph=True)
    g_want = torch.autograd.grad(want, routers)
    for a, b in zip(g_got, g_want):
        assert (a - b).abs().max().item() <= 1e-6 * b.abs().max().item() + 1e-12
    # aux_loss: the pooled balance loss (weighted) plus each layer's other terms, no per-layer balance
    z = sum(r.losses["z"] for r in out.moe)
    assert out.aux_loss.item() == pytest.approx((0.1 * want + 1e-3 * z).item(), rel=1e-6)
    # differs from the per-layer sum once the layers route differently
    per_layer = sum(r.losses["balance"] for r in out.moe) * 0.1 + 1e-3 * z
    assert out.aux_loss.item() != pytest.approx(per_layer.item(), rel=1e-4)


def test_one_moe_layer_pooled_equals_per_layer():
    a, b = tiny("model", n_layers=1), tiny("layer", n_layers=1)
    x = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    assert a(x).aux_loss.item() == pytest.approx(b(x).aux_loss.item(), rel=1e-6)


def test_layer_pooling_is_the_default_and_unchanged():
    model = tiny("layer")
    assert LMConfig().balance_pooling == "layer"
    out = model(torch.randint(0, 50, (2, 10)))
    assert out.pooled_balance_loss is None
    assert out.aux_loss.item() == pytest.approx(sum(r.aux_loss for r in out.moe).item(), rel=1e-6)


def test_bad_balance_pooling():
    with pytest.raises(ValueError, match="balance_pooling must be one of 'layer', 'model'; got 'global'"):
        LMConfig(balance_pooling="global")
