"""The registered activations' torch functions against their plain formulas, with gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.kernels.activations import ACTIVATIONS


def plain_swiglu(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_the_plain_formula_bit_for_bit(dtype):
    """The fused-backward SwiGLU gives the same output and input gradient as autograd through
    ``chunk``, ``silu`` and ``*``, bit for bit, on a random input and gradient."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 2 * 24, generator=g).to(dtype)
    g_a = torch.randn(37, 24, generator=g).to(dtype)
    outs, grads = [], []
    for fn in (ACTIVATIONS["swiglu"].fn, plain_swiglu):
        x = h.clone().requires_grad_()
        y = fn(x)
        y.backward(g_a)
        outs.append(y)
        grads.append(x.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_swiglu_gradcheck_and_double_backward():
    """float64 gradcheck, and second derivatives (``create_graph=True``) still work."""
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    fn = ACTIVATIONS["swiglu"].fn
    assert torch.autograd.gradcheck(fn, (h,))
    assert torch.autograd.gradgradcheck(fn, (h,))


def test_swiglu_without_grad_is_the_plain_formula():
    h = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(ACTIVATIONS["swiglu"].fn(h), plain_swiglu(h), rtol=0, atol=0)
