"""One grouped computation for all experts: ``torch.nn.functional.grouped_mm`` over the sorted
rows with per-expert offsets (no host sync), or contiguous per-expert slices where grouped_mm
does not support the device or dtype.

torch's compiler only knows grouped_mm in bf16, while the CPU kernel also runs fp32 and fp16;
for those dtypes the call goes through a small custom op (``moekit::grouped_mm``) with its own
shape function and backward, so ``torch.compile(fullgraph=True)`` captures it in every dtype.

``F.grouped_mm`` takes only row- or column-major operands with 16-byte-aligned strides and data
pointer; an incoming gradient need not be one (``y.sum()``'s gradient is an expanded tensor with
zero strides). Such operands are copied to a fresh contiguous tensor, and only those.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import loop_ffn

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_mm_supported(x: Tensor, *weights: Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands here (dtype, device, 16-byte strides)."""
    if not _HAS_GROUPED_MM:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16:
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    elem = x.element_size()
    return all(w.shape[-1] * elem % 16 == 0 and w.shape[-2] * elem % 16 == 0 for w in weights)


def _layout_ok(t: Tensor, check_ptr: bool = True) -> bool:
    """Whether ``F.grouped_mm`` accepts ``t``'s layout as it is: its last two dims row- or
    column-major with a 16-byte-aligned leading stride and (``check_ptr``) data pointer."""
    (s_m, s_n), (n_m, n_n) = t.stride()[-2:], t.shape[-2:]
    align = max(1, 16 // t.element_size())
    if s_n == 1 and s_m >= max(1, n_n):
        lead = s_m
    elif s_m == 1 and s_n >= max(1, n_m):
        lead = s_n
    else:
        return False
    return lead % align == 0 and (not check_ptr or t.data_ptr() % 16 == 0)


def _mm_operand(t: Tensor, check_ptr: bool = True) -> Tensor:
    """``t`` itself when ``F.grouped_mm`` takes its layout, else a fresh contiguous copy."""
    return t if _layout_ok(t, check_ptr) else t.clone(memory_format=torch.contiguous_format)


if _HAS_GROUPED_MM:

    @torch.library.custom_op("moekit::grouped_mm", mutates_args=())
    def _grouped_mm_op(a_RD: Tensor, b_EDN: Tensor, offs_E: Tensor) -> Tensor:
        """(R, D) x (E, D, N) -> (R, N), rows grouped by ``offs_E``."""
        return F.grouped_mm(_mm_operand(a_RD), _mm_operand(b_EDN), offs=offs_E)

    @_grouped_mm_op.register_fake
    def _(a_RD, b_EDN, offs_E):
        return a_RD.new_empty(a_RD.shape[0], b_EDN.shape[-1])

    @torch.library.custom_op("moekit::grouped_mm_wgrad", mutates_args=())
    def _grouped_mm_wgrad_op(a_RD: Tensor, g_RN: Tensor, offs_E: Tensor) -> Tensor:
        """Per-group a^T @ g: (R, D), (R, N) -> (E, D, N)."""
        return F.grouped_mm(_mm_operand(a_RD).t(), _mm_operand(g_RN), offs=offs_E)

    @_grouped_mm_wgrad_op.register_fake
    def _(a_RD, g_RN, offs_E):
        return a_RD.new_empty(offs_E.shape[0], a_RD.shape[1], g_RN.shape[1])

    def _setup(ctx, inputs, output):
        a_RD, b_EDN, offs_E = inputs
        ctx.save_for_backward(a_RD, b_EDN, offs_E)

    def _backward(ctx, g_RN):
        a_RD, b_EDN, offs_E = ctx.saved_tensors
        ga = _grouped_mm_op(g_RN, b_EDN.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
        gb = _grouped_mm_wgrad_op(a_RD, g_RN, offs_E) if ctx.needs_input_grad[1] else None
        return ga, gb, None

    _grouped_mm_op.register_autograd(_backward, setup_context=_setup)

    class _GradForGroupedMM(torch.autograd.Function):
        """Identity whose backward hands on a gradient ``F.grouped_mm``'s own backward accepts
        (torch's bf16 path fails on an expanded one, e.g. from ``.sum()``)."""

        @staticmethod
        def forward(y):
            return y.view_as(y)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return _mm_operand(g)


def _gmm(a_RD: Tensor, b_EDN: Tensor, offs_E: Tensor) -> Tensor:
    if a_RD.dtype == torch.bfloat16:
        y = F.grouped_mm(a_RD, b_EDN, offs=offs_E)
        if y.requires_grad and not torch.compiler.is_compiling():
            y = _GradForGroupedMM.apply(y)
        return y
    return _grouped_mm_op(a_RD, b_EDN, offs_E)


def grouped_ffn(
    x_RD: Tensor, counts_E: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor, act: Callable[[Tensor], Tensor]
) -> Tensor:
    """Both projections as grouped GEMMs; rows past ``sum(counts_E)`` hold unspecified values."""
    if not grouped_mm_supported(x_RD, w_up_EDH, w_down_EFD):
        return loop_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act)
    offs_E = counts_E.cumsum(0).to(torch.int32)
    return _gmm(act(_gmm(x_RD, w_up_EDH, offs_E)), w_down_EFD, offs_E)
