"""One grouped computation for all experts: ``torch.nn.functional.grouped_mm`` over the sorted
rows with per-expert offsets (no host sync), or contiguous per-expert slices where grouped_mm
does not support the device or dtype."""
from __future__ import annotations

from typing import Callable

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


def grouped_ffn(x_RD: Tensor, counts_E: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    """Both projections as grouped GEMMs; rows past ``sum(counts_E)`` hold unspecified values."""
    if not grouped_mm_supported(x_RD, w_up_EDH, w_down_EFD):
        return loop_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act)
    offs_E = counts_E.cumsum(0).to(torch.int32)
    h_RH = F.grouped_mm(x_RD, w_up_EDH, offs=offs_E)
    return F.grouped_mm(act(h_RH), w_down_EFD, offs=offs_E)
