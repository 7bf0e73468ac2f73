"""Hierarchical MoE (Shazeer et al. 2017, appendix B)."""

import pytest
import torch
from torch import nn

from moekit import HierarchicalMoE
from moekit.layer.losses import cv_squared


class Counting(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.calls = 0
        self.rows = 0

    def forward(self, x):
        self.calls += 1
        self.rows += x.shape[0]
        return torch.tanh(self.lin(x))


def _ref(m, x):
    """The equations, one token at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = m.primary(x[t]).softmax(-1)
        wg, ig = p.topk(m.top_k_groups)
        wg = wg / wg.sum() if m.renormalize else wg
        for a, g in zip(wg, ig.tolist()):
            q = m.group_gates[g](x[t]).softmax(-1)
            we, ie = q.topk(m.top_k_experts)
            we = we / we.sum() if m.renormalize else we
            for b, j in zip(we, ie.tolist()):
                out[t] += a * b * m.experts.experts[g * m.experts_per_group + j](x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("kg,ke,renormalize", [(1, 1, True), (1, 2, True), (2, 2, True), (1, 2, False), (2, 3, False)])
def test_matches_reference(kg, ke, renormalize):
    G, Eg, D = 3, 4, 6
    m = HierarchicalMoE(
        D, 8, G, Eg, kg, ke, experts=[Counting(D) for _ in range(G * Eg)], renormalize=renormalize
    ).double()
    x = torch.randn(10, D, dtype=torch.float64)
    torch.testing.assert_close(m(x).out, _ref(m, x))


def test_stacked_experts_shapes_and_grouped_matches_loop():
    m = HierarchicalMoE(8, 16, 2, 4, 1, 2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    res = m(x)
    assert res.out.shape == x.shape and res.experts_TK.shape == (15, 2)
    m.backend = "loop"
    torch.testing.assert_close(m(x).out, res.out)


def test_only_selected_branches_run():
    G, Eg, D = 4, 3, 5
    experts = [Counting(D) for _ in range(G * Eg)]
    m = HierarchicalMoE(D, 8, G, Eg, top_k_groups=1, top_k_experts=1, experts=experts)
    gate_calls = [0] * G
    for g, gate in enumerate(m.group_gates):
        gate.register_forward_hook(
            lambda mod, inp, out, g=g: gate_calls.__setitem__(g, gate_calls[g] + inp[0].shape[0])
        )
    for ex in experts:  # ModuleListExperts probes each expert once at construction
        ex.calls = ex.rows = 0
    x = torch.randn(9, D)
    x[:, 0] = 10.0
    with torch.no_grad():  # logits: group 0 = 10, group 1 = 10 + x1/2, groups 2, 3 = 0
        m.primary.weight.zero_()
        m.primary.weight[0, 0] = m.primary.weight[1, 0] = 1.0
        m.primary.weight[1, 1] = 0.5
    res = m(x)
    chosen = res.experts_TK.flatten().tolist()
    assert all(e < 2 * Eg for e in chosen)  # experts of groups 0, 1 only
    assert gate_calls[2] == gate_calls[3] == 0  # unchosen groups' gates never ran
    assert sum(gate_calls) == 9  # each token evaluated exactly one group gate
    for e, ex in enumerate(experts):
        assert ex.calls == (1 if e in chosen else 0)
        assert ex.rows == chosen.count(e)
    assert sum(ex.rows for ex in experts) == 9  # 9 tokens x 1 group x 1 expert


def test_losses_at_both_levels_and_gradients():
    m = HierarchicalMoE(8, 16, 3, 4, 2, 2, importance_loss_weight=0.1, balance_loss_weight=0.1)
    x = torch.randn(64, 8)
    res = m(x)
    assert set(res.losses) == {"group_importance", "group_balance", "expert_importance", "expert_balance"}
    expected = 0.1 * sum(res.losses.values())
    torch.testing.assert_close(res.aux_loss, expected)
    # the hierarchical importance: sum over tokens of Gp_g * Gg_j
    imp = torch.zeros(12).index_add(0, res.experts_TK.flatten(), res.weights_TK.flatten().detach())
    torch.testing.assert_close(res.losses["expert_importance"].detach(), cv_squared(imp))
    (res.out.square().mean() + res.aux_loss).backward()
    assert m.primary.weight.grad.abs().sum() > 0
    used = res.stats["tokens_per_expert"]
    for g, gate in enumerate(m.group_gates):
        if used[g * 4 : (g + 1) * 4].sum() > 0:
            assert gate.weight.grad.abs().sum() > 0
    rows = m.experts.w_up.grad.flatten(1).abs().sum(1) > 0
    assert (rows == (used > 0)).all()  # exactly the experts that ran get gradients


def test_top1_primary_gate_learns_only_without_renormalisation():
    x = torch.randn(32, 8)
    for renorm, learns in ((True, False), (False, True)):
        m = HierarchicalMoE(8, 8, 2, 2, 1, 1, importance_loss_weight=0.0, balance_loss_weight=0.0, renormalize=renorm)
        m(x).out.sum().backward()
        assert (m.primary.weight.grad.abs().sum() > 1e-4) == learns  # w / w = 1 leaves only rounding noise


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k_groups"):
        HierarchicalMoE(8, 8, 2, 2, top_k_groups=3)
    with pytest.raises(ValueError, match="top_k_experts"):
        HierarchicalMoE(8, 8, 2, 2, top_k_experts=3)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="importance_loss_weight"):
        HierarchicalMoE(8, 8, 2, 2, importance_loss_weight=-1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="dim=8"):
        HierarchicalMoE(8, 8, 2, 2)(torch.randn(3, 7))


def test_empty_inputs():
    res = HierarchicalMoE(8, 8, 2, 2)(torch.randn(0, 8))
    assert res.out.shape == (0, 8) and float(res.aux_loss) == 0.0
