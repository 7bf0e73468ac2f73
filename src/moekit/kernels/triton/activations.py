"""Elementwise activations for the kernels' epilogues, and the kernel code of each activation
name in :data:`moekit.kernels.activations.ACTIVATIONS`.

A kind is an elementwise function ``f`` plus a flag: gated kinds split the up projection's
columns ``[gate | up]`` (H = 2F) and compute ``f(gate) * up``; the others compute ``f(pre)``.
Everything is evaluated in the accumulator's dtype (fp32, or fp64 for fp64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from .. import activations as registry
from ..activations import Act

# elementwise codes (tl.constexpr so the kernels branch at compile time)
SILU = tl.constexpr(registry.SILU)
GELU_TANH = tl.constexpr(registry.GELU_TANH)  # F.gelu(approximate="tanh"), the gate of GEGLU
GELU_ERF = tl.constexpr(registry.GELU_ERF)  # F.gelu's default
RELU = tl.constexpr(registry.RELU)


class ActKind(NamedTuple):
    code: int
    gated: bool


def act_kind(act: Act) -> ActKind:
    """The kernel activation of an activation name (a key of ``moekit.kernels.activations.ACTIVATIONS``)."""
    entry = registry.ACTIVATIONS.get(act) if isinstance(act, str) else None
    if entry is None:
        names = ", ".join(f"{name!r}" for name in registry.ACTIVATIONS)
        raise ValueError(
            f"backend='triton' only runs moekit's own activations, passed by name ({names}); "
            f"got {getattr(act, '__name__', act)!r}. Use backend='grouped' or 'loop' for other activations."
        )
    return ActKind(entry.kernel_code, entry.gated)


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
