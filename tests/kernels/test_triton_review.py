"""Regression tests from a review of the Triton slot mode, launch configs, tuner and self-check
(under Triton's CPU interpreter, small shapes): strided inputs, the self-check under the
caller's grad mode / autocast, the tuner under activation checkpointing and with stale cache
entries, and double backward.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from moekit.kernels.reference import loop_ffn  # noqa: E402
from moekit.kernels.triton import INTERPRETED, triton_moe_ffn  # noqa: E402
from moekit.layer.dispatch import combine, dispatch, plan_dispatch  # noqa: E402
from moekit.layer.experts import ACTIVATIONS  # noqa: E402

if not INTERPRETED:
    pytest.skip("moekit.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

ACT = ACTIVATIONS["swiglu"]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _problem(T=7, K=2, E=3, D=16, F=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts_TK = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
    plan = plan_dispatch(experts_TK, E)
    x_TD = torch.randn(T, D, generator=g, dtype=dtype)
    w_up = (torch.randn(E, D, 2 * F, generator=g, dtype=dtype) / D**0.5)
    w_down = (torch.randn(E, F, D, generator=g, dtype=dtype) / F**0.5)
    weights_TK = torch.rand(T, K, generator=g, dtype=dtype)
    return plan, x_TD, w_up, w_down, weights_TK


def test_strided_scale_is_read_through_its_stride():
    """scale_R given as a strided view (a column of a (R, 2) tensor) scales each row by its own
    entry, forward and gradients, as a contiguous copy does."""
    plan, x_TD, w_up, w_down, weights_TK = _problem()
    K = plan.top_k
    s_R = weights_TK.reshape(-1)[plan.order_R]
    outs = []
    for strided in (False, True):
        x, wu, wd, ss = _leaf(x_TD), _leaf(w_up), _leaf(w_down), _leaf(s_R)
        s = torch.stack([ss, torch.full_like(ss, 7.0)], 1)[:, 0] if strided else ss
        assert s.is_contiguous() != strided
        y = triton_moe_ffn(x, plan.counts_E, wu, wd, ACT, scale_R=s, out_idx_R=plan.order_R, top_k=K)
        g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        outs.append([y, *torch.autograd.grad(y, (x, wu, wd, ss), g)])
    for name, a, b in zip(("y", "dx", "dw_up", "dw_down", "ds"), *outs):
        torch.testing.assert_close(b, a, msg=name)
