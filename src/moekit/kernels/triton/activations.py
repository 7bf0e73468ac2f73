"""Elementwise activations for the kernels' epilogues, and the map from moekit's activation
callables to them.

A kind is an elementwise function ``f`` plus a flag: gated kinds split the up projection's
columns ``[gate | up]`` (H = 2F) and compute ``f(gate) * up``; the others compute ``f(pre)``.
Everything is evaluated in the accumulator's dtype (fp32, or fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import triton
import triton.language as tl

# elementwise codes (tl.constexpr so the kernels branch at compile time)
SILU = tl.constexpr(0)
GELU_TANH = tl.constexpr(1)  # F.gelu(approximate="tanh"), the gate of GEGLU
GELU_ERF = tl.constexpr(2)  # F.gelu's default
RELU = tl.constexpr(3)


class ActKind(NamedTuple):
    code: int
    gated: bool


def act_kind(act: Callable) -> ActKind:
    """The kernel activation for one of ``moekit.layer.experts.ACTIVATIONS`` (matched by identity)."""
    from ...layer.experts import ACTIVATIONS  # late: moekit.layer imports moekit.kernels

    kinds = {
        ACTIVATIONS["swiglu"]: ActKind(SILU.value, True),
        ACTIVATIONS["geglu"]: ActKind(GELU_TANH.value, True),
        ACTIVATIONS["gelu"]: ActKind(GELU_ERF.value, False),
        ACTIVATIONS["relu"]: ActKind(RELU.value, False),
    }
    try:
        return kinds[act]
    except (KeyError, TypeError):
        pass
    names = ", ".join(f"{name!r}" for name in ACTIVATIONS)
    raise ValueError(
        f"backend='triton' only runs moekit's own activations ({names}, i.e. the callables in "
        f"moekit.layer.experts.ACTIVATIONS); got {getattr(act, '__name__', act)!r}. "
        "Use backend='grouped' or 'loop' for other activations."
    )


# Float constants are literals below (sqrt(2/pi), 1/sqrt(2), 1/sqrt(2*pi), GELU's 0.044715):
# module-level float constexprs combine wrongly with tensors under the interpreter.
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def act_fwd(x, ACT: tl.constexpr):
    """f(x) for the elementwise code ``ACT``."""
    if ACT == SILU:
        y = x * _sigmoid(x)
    elif ACT == GELU_TANH:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == GELU_ERF:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        y = tl.where(x > 0, x, 0.0)
    return y


@triton.jit
def act_bwd(x, ACT: tl.constexpr):
    """f'(x) for the elementwise code ``ACT`` (relu'(0) = 0, as in torch)."""
    if ACT == SILU:
        s = _sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == GELU_TANH:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACT == GELU_ERF:
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    else:
        d = tl.where(x > 0, 1.0, 0.0)
    return d
