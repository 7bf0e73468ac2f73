"""Multi-gate MoE (Ma et al. 2018) and the multi-task baselines."""

import pytest
import torch
import torch.nn.functional as F

from moekit import MultiGateMoE
from moekit.models.multitask import SharedBottom, synthetic_tasks


def test_shapes_and_gate_rows_sum_to_one():
    m = MultiGateMoE(in_dim=10, expert_dim=6, num_experts=4, num_tasks=3, tower_hidden=5, out_dim=2)
    res = m(torch.randn(7, 10))
    assert len(res.outs) == 3 and all(o.shape == (7, 2) for o in res.outs)
    assert res.out_BTO.shape == (7, 3, 2)
    assert res.gates_TBE.shape == (3, 7, 4)
    torch.testing.assert_close(res.gates_TBE.sum(-1), torch.ones(3, 7))


def test_each_task_learns_its_own_gate():
    torch.manual_seed(0)
    m = MultiGateMoE(in_dim=8, expert_dim=8, num_experts=4, num_tasks=2, tower_hidden=8)
    with torch.no_grad():  # identical gates at the start
        m.gates[1].load_state_dict(m.gates[0].state_dict())
    x = torch.randn(64, 8)
    assert torch.allclose(m(x).gates_TBE[0], m(x).gates_TBE[1])
    y0, y1 = x[:, :1].sin(), (x[:, 1:2] * 3).cos()  # different targets
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(20):
        res = m(x)
        loss = F.mse_loss(res.outs[0], y0) + F.mse_loss(res.outs[1], y1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = m(x).gates_TBE
    assert (g[0] - g[1]).abs().max() > 1e-3


def test_one_gate_variant_shares_the_gate():
    m = MultiGateMoE(in_dim=5, expert_dim=4, num_experts=3, num_tasks=2, tower_hidden=4, shared_gate=True)
    assert len(m.gates) == 1
    g = m(torch.randn(6, 5)).gates_TBE
    torch.testing.assert_close(g[0], g[1])


def test_gradients_reach_every_expert_gate_and_tower():
    m = MultiGateMoE(in_dim=6, expert_dim=5, num_experts=4, num_tasks=2, tower_hidden=3)
    res = m(torch.randn(32, 6))
    sum(o.square().sum() for o in res.outs).backward()
    assert (m.w_EIH.grad.flatten(1).abs().sum(1) > 0).all()
    for mod in list(m.gates) + list(m.towers):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())


def test_synthetic_tasks_correlation_and_baseline():
    d = synthetic_tasks(4000, 0.5, dim=20, seed=0, data_seed=1)
    w = d.w_TI
    torch.testing.assert_close(F.cosine_similarity(w[0], w[1], dim=0), torch.tensor(0.5), atol=1e-5, rtol=0)
    same = synthetic_tasks(500, 1.0, dim=20, seed=0, data_seed=1).y_BT
    assert (same[:, 0] - same[:, 1]).std() < 0.2  # p = 1: the same function, independent noise (var 0.01 each)
    assert torch.corrcoef(d.y_BT.t())[0, 1] < torch.corrcoef(same.t())[0, 1]
    res = SharedBottom(20, 16, 2, 4)(d.x_BI[:3])
    assert [o.shape for o in res.outs] == [(3, 1), (3, 1)]


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_tasks"):
        MultiGateMoE(4, 4, 2, 0, 4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="in_dim"):
        MultiGateMoE(4, 4, 2, 2, 4)(torch.randn(3, 5))
