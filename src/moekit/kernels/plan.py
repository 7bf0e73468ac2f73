"""The dispatch plan: the T*K routed slots sorted by expert, shared by the layer's dispatch and
combine (:mod:`moekit.layer.dispatch`) and the kernels that fuse them (:mod:`moekit.kernels.triton`).

Shape legend: T tokens, E experts, K slots per token, S = T*K slots, R rows handed to the experts
(R = S, or E*C under a capacity C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class DispatchPlan:
    """Metadata shared by :func:`moekit.layer.dispatch.dispatch` and :func:`~moekit.layer.dispatch.combine`
    (all on the device)."""

    order_R: Tensor  # slot ids (t*K + k) in expert order; rows past sum(counts_E) are empty slots
    counts_E: Tensor  # rows per expert, int64
    inverse_S: Optional[Tensor]  # row of each slot when R == S (the inverse permutation), else None
    num_tokens: int  # T
    top_k: int  # K
    has_empty: bool  # whether rows past sum(counts_E) can exist (then they are masked to zero)

    @property
    def token_R(self) -> Tensor:
        return torch.div(self.order_R, self.top_k, rounding_mode="floor")

    def valid_R(self) -> Tensor:
        return torch.arange(self.order_R.numel(), device=self.order_R.device) < self.counts_E.sum()


def slot_counts(experts_TK: Tensor, num_experts: int) -> Tensor:
    """Routed slots per expert (E,), int64; empty slots (id E) are not counted."""
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts_TK.device)
    counts.scatter_add_(0, experts_TK.reshape(-1), torch.ones_like(experts_TK.reshape(-1)))
    return counts[:num_experts]


def plan_dispatch(
    experts_TK: Tensor, num_experts: int, *, max_rows: Optional[int] = None, has_empty: bool = False
) -> DispatchPlan:
    """Sort the slots by expert. ``max_rows`` is a static bound on the non-empty slots (E*C under
    a capacity): only that many rows are handed to the experts."""
    T, K = experts_TK.shape
    S = T * K
    experts_S = experts_TK.reshape(-1)
    order_S = experts_S.argsort(stable=True)
    counts_E = slot_counts(experts_TK, num_experts)
    R = S if max_rows is None else min(S, max_rows)
    inverse_S = None
    if R == S:
        inverse_S = torch.empty_like(order_S).scatter_(0, order_S, torch.arange(S, device=order_S.device))
    return DispatchPlan(order_S[:R], counts_E, inverse_S, T, K, has_empty or R < S)
