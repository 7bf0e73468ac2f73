"""Slow, obvious versions of moekit's computations, written independently of the library's
dispatch code, for the tests to compare against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def act(kind: str, h: Tensor) -> Tensor:
    if kind in ("swiglu", "geglu"):
        gate, up = h.chunk(2, dim=-1)
        g = F.silu(gate) if kind == "swiglu" else F.gelu(gate, approximate="tanh")
        return g * up
    return F.gelu(h) if kind == "gelu" else F.relu(h)


def dense_ffn(x: Tensor, w_up: Tensor, w_down: Tensor, kind: str = "swiglu") -> Tensor:
    """A dense FFN written out by hand."""
    return act(kind, x @ w_up) @ w_down


def moe_reference(
    x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor, kind: str = "swiglu"
) -> Tensor:
    """out[t] = sum_k weights[t, k] * FFN_{experts[t, k]}(x[t]), looping over experts with masks;
    slots whose expert id is out of range (empty) contribute nothing."""
    E = w_up_EDH.shape[0]
    out = torch.zeros_like(x_TD)
    for e in range(E):
        w_T = (weights_TK * (experts_TK == e)).sum(-1)
        if (experts_TK == e).any():
            out = out + w_T[:, None].to(x_TD.dtype) * dense_ffn(x_TD, w_up_EDH[e], w_down_EFD[e], kind)
    return out
