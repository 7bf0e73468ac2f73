"""The registered activations' torch functions against their plain formulas, with gradients."""

from __future__ import annotations

import pytest
import torch

from moekit.kernels.activations import ACTIVATIONS
from reference import act


def plain_swiglu(h):
    return act("swiglu", h)


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


def test_swiglu_and_dense_ffn_under_torch_func():
    """torch.func's grad and vmap(grad) (per-sample gradients) work on the activation and on the
    dense FFN, and equal autograd's (the fused-backward Function defines no vmap rule, so the plain
    ops run under torch.func)."""
    from moekit.layer.experts import FeedForward

    fn = ACTIVATIONS["swiglu"].fn
    h = torch.randn(3, 8, dtype=torch.float64)
    got = torch.func.grad(lambda t: fn(t).sum())(h)
    want = torch.autograd.grad(plain_swiglu(h.requires_grad_()).sum(), h)[0]
    torch.testing.assert_close(got, want)
    torch.manual_seed(0)
    ffn = FeedForward(6, 10).double()
    params = dict(ffn.named_parameters())
    x = torch.randn(4, 6, dtype=torch.float64)

    def loss(p, row):
        return torch.func.functional_call(ffn, p, (row[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(4):
        ffn.zero_grad()
        ffn(x[i : i + 1]).square().sum().backward()
        for name, p in ffn.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad)
