"""A self-check of the Triton kernels on a device: a small routed FFN (slot mode: gather, SwiGLU,
routing-weight scale, scatter) in the given dtype, forward and every gradient, against the loop
reference in float64 on the same rounded inputs. Run by the tests (``tests/kernels/test_triton_check.py``,
on a GPU by the test marked ``gpu``) and by hand before trusting ``backend="triton"`` on a new device:
``self_check(torch.device("cuda"), torch.bfloat16)`` raises if a kernel fails to compile or disagrees.
"""

from __future__ import annotations

import torch

from ..activations import activation_fn
from ..plan import plan_dispatch
from ..reference import loop_ffn
from .autograd import triton_moe_ffn

# relative max-abs error allowed against the fp64 reference (bf16 keeps 8 bits of mantissa)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def self_check(device: torch.device, dtype: torch.dtype) -> None:
    """Raise if the fused kernels do not reproduce the loop reference on ``device`` in ``dtype``.

    Runs whatever the caller's mode (e.g. from inside a forward): with gradients on, out
    of inference mode, autocast off, saved tensors kept as they are (not an enclosing activation
    checkpoint's), a fixed launch config (nothing tuned or cached) and its own generator (the
    global RNG is not advanced).
    """
    identity = lambda t: t  # noqa: E731
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(device.type, enabled=False),
        torch.autograd.graph.saved_tensors_hooks(identity, identity),
    ):
        _check(device, dtype)


def _check(device: torch.device, dtype: torch.dtype) -> None:
    if dtype not in TOLERANCE:
        raise ValueError(f"the Triton kernels take float64/32/16 and bfloat16; got {dtype}")
    T, K, E, D, F = 37, 2, 5, 64, 48  # T not a tile multiple; expert 4 gets no rows
    g = torch.Generator().manual_seed(1234)
    experts_TK = torch.rand(T, E - 1, generator=g).argsort(-1)[:, :K].to(device)
    plan = plan_dispatch(experts_TK, E)
    inputs = [
        torch.randn(T, D, generator=g),
        torch.randn(E, D, 2 * F, generator=g) / D**0.5,
        torch.randn(E, F, D, generator=g) / F**0.5,
        torch.rand(T, K, generator=g),
    ]
    inputs = [t.to(device=device, dtype=dtype) for t in inputs]  # rounded once; both sides use these
    grad_SD = torch.randn(T * K, D, generator=g).to(device=device, dtype=dtype)
    act = "swiglu"

    def run(ins, fused: bool):
        x, w_up, w_down, w_TK = (t.detach().clone().requires_grad_(True) for t in ins)
        s_R = w_TK.reshape(-1)[plan.order_R]
        if fused:
            y = triton_moe_ffn(
                x, plan.counts_E, w_up, w_down, act, scale_R=s_R, out_idx_R=plan.order_R, top_k=K, config={}
            )  # the default/heuristic config: no tuning from inside the check
        else:
            y_R = loop_ffn(x[plan.token_R], plan.counts_E, w_up, w_down, activation_fn(act)) * s_R[:, None]
            y = y_R.new_zeros(T * K, D).index_copy(0, plan.order_R, y_R)
        return [y, *torch.autograd.grad(y, (x, w_up, w_down, w_TK), grad_SD.to(y.dtype))]

    got = run(inputs, True)
    ref = run([t.double() for t in inputs], False)  # float64: also a reference for float64 kernels
    for name, a, b in zip(("output", "dx", "dw_up", "dw_down", "d_routing_weights"), got, ref):
        err = (a.double() - b).abs().max().item()
        scale = b.abs().max().item()
        if not err <= TOLERANCE[dtype] * max(scale, 1e-6):  # also catches NaN
            raise AssertionError(
                f"{name} differs from the loop reference: max error {err:.3e} (scale {scale:.3e}, {dtype})"
            )
