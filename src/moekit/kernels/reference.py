"""The plain per-expert loop: the reference every faster backend is tested against."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def per_expert(x_RD: Tensor, counts_E: Tensor, fn: Callable[[int, Tensor], Tensor], out_dim: int) -> Tensor:
    """Apply ``fn(e, rows)`` to each expert's contiguous rows (one host sync for the counts);
    rows past ``sum(counts_E)`` come back as zeros."""
    R = x_RD.shape[0]
    outs, start = [], 0
    for e, c in enumerate(counts_E.tolist()):
        if c:
            outs.append(fn(e, x_RD[start : start + c]).to(x_RD.dtype))
        start += c
    if start < R or not outs:
        outs.append(x_RD.new_zeros(R - start, out_dim))
    return torch.cat(outs)


def loop_ffn(
    x_RD: Tensor, counts_E: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor, act: Callable[[Tensor], Tensor]
) -> Tensor:
    """One matmul pair per expert over its contiguous rows."""
    return per_expert(x_RD, counts_E, lambda e, rows: act(rows @ w_up_EDH[e]) @ w_down_EFD[e], w_down_EFD.shape[-1])
