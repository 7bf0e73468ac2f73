"""GroupedExperts.rows_major_: the experts' memory layout changes (what compiled CPU decoding reads
fastest), their values and everything computed from them do not."""

import pytest
import torch

from moekit import MoE, MoEConfig


@pytest.mark.parametrize("backend", ["grouped", "loop"])
def test_rows_major_experts_compute_the_same_forward_backward_and_decode(backend):
    torch.manual_seed(0)
    cfg = MoEConfig(dim=24, hidden_dim=40, num_experts=6, top_k=2, backend=backend)
    a = MoE(cfg).double()
    b = MoE(cfg).double()
    b.load_state_dict(a.state_dict())
    b.experts.rows_major_()
    w_up = b.experts.w_up
    assert w_up.stride() == (w_up.shape[1] * w_up.shape[2], 1, w_up.shape[1])  # (E, D, H) over (E, H, D) memory
    assert torch.equal(w_up, a.experts.w_up) and torch.equal(b.experts.w_down, a.experts.w_down)
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    ya, yb = a(x).out, b(x).out
    torch.testing.assert_close(yb, ya)
    ga = torch.autograd.grad(ya.square().sum(), [x, a.experts.w_up, a.experts.w_down])
    gb = torch.autograd.grad(yb.square().sum(), [x, b.experts.w_up, b.experts.w_down])
    for g1, g2 in zip(ga, gb):
        torch.testing.assert_close(g2, g1)
    with torch.no_grad():  # the few-slot decode path, eager
        a.eval(), b.eval()
        x1 = torch.randn(1, 1, 24, dtype=torch.float64)
        torch.testing.assert_close(b(x1).out, a(x1).out)
    sd = b.state_dict()
    assert torch.equal(sd["experts.w_up"], a.experts.w_up)  # saves as the same values
