"""GroupedExperts.rows_major_: the experts' memory layout changes (what compiled CPU decoding reads
fastest), their values and everything computed from them do not."""

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.kernels import native


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


def _rows_major(experts) -> bool:
    return experts.w_up.stride(1) == 1 and experts.w_down.stride(1) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decoding_on_the_cpu_lays_experts_out_rows_major_when_compiled_or_16_bit(dtype):
    from moekit.config import LMConfig
    from moekit.models import MoETransformer

    torch.manual_seed(0)
    moe = MoEConfig(dim=32, hidden_dim=48, num_experts=4, top_k=2)
    m = MoETransformer(LMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=40, moe=moe)).to(dtype)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.generate(torch.randint(0, 50, (1, 4)), 3, temperature=0.0)
    want = dtype != torch.float32 or native.available()  # the native kernels read float32 rows-major too
    assert all(_rows_major(x.experts) == want for x in m.moe_layers), dtype
    m.prepare_decoding_(compile=True)
    assert all(_rows_major(x.experts) for x in m.moe_layers)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # values unchanged
