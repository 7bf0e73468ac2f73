"""The expert activations, keyed by name: what every backend and the layer agree on.

An activation maps the up projection's output (R, H) to the down projection's input (R, F).
Gated kinds split the columns ``[gate | up]`` (H = 2F) and compute ``f(gate) * up``; the others
compute ``f(pre)`` (H = F). ``kernel_code`` names the elementwise ``f`` for the Triton epilogues
(:mod:`moekit.kernels.triton.activations`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

# elementwise codes of the Triton epilogues
SILU, GELU_TANH, GELU_ERF, RELU = 0, 1, 2, 3


def eager_autograd() -> bool:
    """Whether moekit's hand-written autograd Functions may run: not under torch.compile (the
    plain ops, which inductor fuses, run there) and not under a torch.func transform (the
    Functions define no vmap rule)."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


class _SwiGLUFn(torch.autograd.Function):
    """``silu(gate) * up`` whose backward writes both halves of the gradient into one (R, 2F)
    tensor: autograd's backward of the chunked form computes each half apart and then ``cat``s
    them, one more pass over R*2F. Fwd+bwd at R*F = 1M, 1 thread: fp32 6.4 -> 5.6 ms, bf16 5.0 ->
    4.7; bit-identical results (benchmarks/cpu_overheads.py; table in benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        ctx.save_for_backward(h, silu_gate)
        return silu_gate * up

    @staticmethod
    def backward(ctx, g_a: Tensor) -> Tensor:
        h, silu_gate = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops of h alone (silu_gate has no history)
            sig = torch.sigmoid(gate)
            return torch.cat([g_a * up * sig * (1 + gate * (1 - sig)), g_a * gate * sig], dim=-1)
        g_h = torch.empty_like(h)
        g_gate, g_up = g_h.chunk(2, dim=-1)
        torch.mul(g_a, silu_gate, out=g_up)
        torch.ops.aten.silu_backward.grad_input(g_a * up, gate, grad_input=g_gate)
        return g_h


def _swiglu(h: Tensor) -> Tensor:
    if h.requires_grad and torch.is_grad_enabled() and eager_autograd():
        return _SwiGLUFn.apply(h)
    gate, up = h.chunk(2, dim=-1)  # chunk, not two slices: its backward is one cat, not two zero-filled copies
    return F.silu(gate) * up


def _geglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return _gelu_tanh(gate) * up


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


@dataclass(frozen=True)
class Activation:
    fn: Callable[[Tensor], Tensor]  # (R, H) -> (R, F), in torch
    gated: bool  # H = 2F, columns [gate | up]
    kernel_code: int  # the elementwise f for the Triton kernels
    elementwise: Callable[[Tensor], Tensor]  # f alone: gated kinds compute f(gate) * up

    def pair(self, gate: Tensor, up: Tensor) -> Tensor:
        """A gated kind on its two halves held apart (the dense FFN's separate projections)."""
        return self.elementwise(gate) * up


ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation(_swiglu, True, SILU, F.silu),  # Shazeer 2020, "GLU Variants Improve Transformer"
    "geglu": Activation(_geglu, True, GELU_TANH, _gelu_tanh),  # same paper
    "gelu": Activation(F.gelu, False, GELU_ERF, F.gelu),
    "relu": Activation(F.relu, False, RELU, F.relu),
}

Act = Union[str, Callable[[Tensor], Tensor]]  # a name in ACTIVATIONS, or (torch backends only) any callable


def activation_fn(act: Act) -> Callable[[Tensor], Tensor]:
    """The torch function of ``act``: the registered one for a name, ``act`` itself for a callable."""
    if isinstance(act, str):
        return get_activation(act).fn
    return act


def get_activation(name: str) -> Activation:
    """The registry entry of ``name`` (ValueError naming the choices when there is none)."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {name!r}") from None
