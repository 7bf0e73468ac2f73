"""The ``moekit::grouped_mm`` custom op and ``grouped_ffn`` against a per-group ``torch.mm`` loop
(float64), forward and gradients, with incoming gradients of every layout autograd produces:
``y.sum()`` (expanded, strides (0, 0)), a broadcast row (strides (0, 1)), a transposed one whose
leading stride is not 16-byte aligned, and a plain contiguous one. Eager only (no torch.compile)."""

import pytest
import torch
import torch.nn.functional as F

from moekit.kernels import grouped_ffn, grouped_mm_supported
from moekit.kernels.grouped import _HAS_GROUPED_MM, _layout_ok, _mm_operand

pytestmark = pytest.mark.skipif(not _HAS_GROUPED_MM, reason="torch has no F.grouped_mm")

if _HAS_GROUPED_MM:
    from moekit.kernels.grouped import _grouped_mm_op, _grouped_mm_wgrad_op

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # max error / max |reference|
OFFS = [3, 3, 7, 10, 10]  # R = 10 rows in 5 groups; groups 1 and 4 are empty
R, D, N = 10, 16, 24


def loop_mm(a_RD, b_EDN, offs):
    """The obvious version: one torch.mm per group over its rows."""
    outs, start = [], 0
    for e, end in enumerate(offs):
        outs.append(torch.mm(a_RD[start:end], b_EDN[e]))
        start = end
    return torch.cat(outs)


def close(got, want, dtype, what):
    err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    assert err <= TOL[dtype], f"{what}: max error {err:.2e} relative to the reference's max > {TOL[dtype]:.0e}"


def backprop(kind: str, y, w):
    """Backward from ``y`` with an incoming gradient of the named layout (its values from ``w``)."""
    if kind == "sum":
        y.sum().backward()  # ones, expanded: strides (0, 0)
    elif kind == "row_broadcast":
        (y.sum(0) * w[0]).sum().backward()  # one row expanded: strides (0, 1)
    elif kind == "transposed":
        y.backward(w.t().contiguous().t())  # column-major, leading stride R (40 bytes in fp32)
    else:
        y.backward(w)


def grad_layout(kind: str, y, w) -> tuple:
    """The strides of the gradient that ``backprop(kind)`` hands to ``y`` (checks the test's premise)."""
    seen = []
    y = y.detach().requires_grad_() * 1
    y.register_hook(lambda g: seen.append(g.stride()))
    backprop(kind, y, w)
    return seen[0]


LAYOUTS = {"sum": (0, 0), "row_broadcast": (0, 1), "transposed": (1, R), "contiguous": (N, 1)}


@pytest.mark.parametrize("kind", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_op_gradients_match_a_per_group_loop(dtype, kind):
    a = torch.randn(R, D).to(dtype).requires_grad_()
    b = (torch.randn(len(OFFS), D, N) / D**0.5).to(dtype).requires_grad_()
    w = torch.randn(R, N).to(dtype)
    offs = torch.tensor(OFFS, dtype=torch.int32)
    y = _grouped_mm_op(a, b, offs)
    assert grad_layout(kind, y, w) == LAYOUTS[kind]
    backprop(kind, y, w)

    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = loop_mm(a64, b64, OFFS)
    backprop(kind, y64, w.double())
    close(y, y64, dtype, "output")
    close(a.grad, a64.grad, dtype, "a.grad")
    close(b.grad, b64.grad, dtype, "b.grad")
    for e in (1, 4):  # empty groups get exactly zero gradient
        assert torch.equal(b.grad[e], torch.zeros_like(b.grad[e])), f"empty group {e} got a nonzero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_wgrad_op_takes_any_gradient_layout(dtype):
    """The weight-gradient op alone: per-group a^T @ g, with g expanded, transposed or sliced, and a
    column-major a whose transpose alone grouped_mm would refuse."""
    a = torch.randn(R, D).to(dtype)
    offs = torch.tensor(OFFS, dtype=torch.int32)
    base = torch.randn(R, N).to(dtype)
    layouts = {
        "expanded": torch.randn(1, N).to(dtype).expand(R, N),
        "transposed": base.t().contiguous().t(),
        "column slice": torch.randn(R, N + 3).to(dtype)[:, 1 : N + 1],  # odd leading stride, misaligned pointer
        "contiguous": base,
    }
    cases = [(name, a, g) for name, g in layouts.items()]
    cases.append(("contiguous", torch.randn(D, R).to(dtype).t(), base))  # a column-major, leading stride R
    for name, a, g in cases:
        got = _grouped_mm_wgrad_op(a, g, offs)
        want = torch.stack([torch.mm(a[s:e].double().t(), g[s:e].double()) for s, e in zip([0] + OFFS[:-1], OFFS)])
        close(got, want, dtype, f"wgrad with a {name} gradient, a strides {a.stride()}")
        assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(got[4], torch.zeros_like(got[4]))


def test_operands_are_copied_only_when_grouped_mm_refuses_them():
    """A layout F.grouped_mm takes is passed through (no copy); others become fresh contiguous copies."""
    accepted = {
        "contiguous": torch.randn(R, N),
        "column-major, aligned": torch.randn(N, 16).t(),
        "padded rows": torch.randn(R, 32)[:, :N],
        "3-D weights": torch.randn(3, D, N),
    }
    for name, t in accepted.items():
        assert _layout_ok(t), name
        assert _mm_operand(t) is t, f"{name}: copied although grouped_mm takes it"
    refused = {
        "expanded scalar": torch.tensor(1.0).expand(R, N),
        "expanded row": torch.randn(1, N).expand(R, N),
        "transposed, leading stride 40 bytes": torch.randn(N, R).t(),
        "leading stride 25": torch.randn(R, N + 1)[:, :N],
        # torch's CUDA check also wants a 16-byte-aligned data pointer; the CPU kernel takes this one
        "misaligned pointer": torch.randn(R * N + 1)[1:].view(R, N),
    }
    for name, t in refused.items():
        assert not _layout_ok(t), name
        m = _mm_operand(t)
        assert m.is_contiguous() and _layout_ok(m) and torch.equal(m, t), name
        if name != "misaligned pointer":
            with pytest.raises(RuntimeError, match="strides"):  # why the copy: torch refuses the original
                F.grouped_mm(t, torch.randn(3, N, 8), offs=torch.tensor([3, 7, 10], dtype=torch.int32))


def swiglu(h):
    g, u = h.chunk(2, -1)
    return F.silu(g) * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_grouped_ffn_sum_backward_matches_the_loop(dtype):
    """Normal eager use: both projections, ``out.sum().backward()`` (bf16 runs torch's own
    grouped_mm autograd, which also refuses an expanded gradient), an empty expert included."""
    counts = torch.tensor([3, 0, 4, 3, 0])
    x = torch.randn(R, D).to(dtype).requires_grad_()
    w_up = (torch.randn(5, D, 2 * N) / D**0.5).to(dtype).requires_grad_()
    w_down = (torch.randn(5, N, D) / N**0.5).to(dtype).requires_grad_()
    assert grouped_mm_supported(x, w_up, w_down)  # else this would compare the loop with itself
    grouped_ffn(x, counts, w_up, w_down, swiglu).sum().backward()

    ref = [t.detach().double().requires_grad_() for t in (x, w_up, w_down)]
    offs = counts.cumsum(0).tolist()
    loop_mm(swiglu(loop_mm(ref[0], ref[1], offs)), ref[2], offs).sum().backward()
    for name, got, want in zip(("x", "w_up", "w_down"), (x, w_up, w_down), ref):
        close(got.grad, want.grad, dtype, f"{name}.grad")
    assert not w_up.grad[1].any() and not w_down.grad[4].any()
