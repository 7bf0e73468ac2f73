"""How a MoE layer's routed slots reach its experts and come back: one function per path, all
with the same signature, and :func:`choose_path` that picks one for a call.

- :func:`dispatched`: sort the slots by expert (a :class:`~moekit.layer.dispatch.DispatchPlan`),
  gather their rows, run the experts on the grouped rows, scatter back weighted (GShard). Under
  expert parallelism the experts' module hooks move the rows to the ranks holding their experts
  and back (``moekit.parallel``): the layer sees the same ``(x_RD, counts_E) -> y_RD``.
- :func:`fused`: the same in moekit's Triton kernels, the gather and the weighted scatter fused
  into the expert GEMMs (ScatterMoE-style), the plan from a counting-sort kernel.
- :func:`few_slots`: decoding (no grad, a few slots): each slot reads its expert's weights
  directly, no sort and no plan (gpt-fast's Mixtral), added to the shared experts' output.

Each returns ``(out_TD, kept_E)``: the output including the shared experts' ``shared_TD`` (None:
no shared experts), and the slots each expert computed (None: count them from ``experts_TK``).

Shape legend: T tokens, D width, E routed experts, K slots per token, R rows handed to the experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from torch import Tensor, nn

from ..kernels.slots import SMALL_SLOTS
from .dispatch import combine, dispatch, plan_dispatch
from .experts import GroupedExperts, StackedExperts

Path = Callable[..., "tuple[Tensor, Optional[Tensor]]"]


def dispatched(
    experts: nn.Module,
    x_TD: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    shared_TD: Optional[Tensor],
    *,
    num_experts: int,
    max_rows: Optional[int],
    has_empty: bool,
    backend: str,
) -> tuple[Tensor, Optional[Tensor]]:
    plan = plan_dispatch(experts_TK, num_experts, max_rows=max_rows, has_empty=has_empty)
    y_RD = experts(dispatch(x_TD, plan), plan.counts_E, backend)
    out_TD = combine(y_RD, plan, weights_TK)
    return _plus(out_TD, shared_TD), plan.counts_E


def fused(
    experts: GroupedExperts,
    x_TD: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    shared_TD: Optional[Tensor],
    *,
    num_experts: int,
    max_rows: Optional[int],
    has_empty: bool,
    backend: str,
) -> tuple[Tensor, Optional[Tensor]]:
    from ..kernels.triton import routing_plan

    # the router's ids are valid: no host-side check, no host sync
    plan = routing_plan(experts_TK, num_experts, max_rows=max_rows, has_empty=has_empty, validate=False)
    out_TD = experts.fused(x_TD, plan, weights_TK)
    return _plus(out_TD, shared_TD), plan.counts_E


def few_slots(
    experts: StackedExperts, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, shared_TD: Optional[Tensor], **_
) -> tuple[Tensor, Optional[Tensor]]:
    return experts.few_slots(x_TD, experts_TK, weights_TK, into_TD=shared_TD), None  # shared_TD updated in place


def _plus(out_TD: Tensor, shared_TD: Optional[Tensor]) -> Tensor:
    """The routed output plus the shared experts' (None: there are none)."""
    return out_TD if shared_TD is None else out_TD + shared_TD


def choose_path(
    experts: nn.Module, backend: str, *, local: bool, capacity_limited: bool, grad: bool, num_slots: int
) -> Path:
    """The path for one call: few slots when decoding on one process with the grouped backend,
    the fused kernels for ``backend="triton"`` on one process, else the dispatch path."""
    if not isinstance(experts, StackedExperts) or not local:
        return dispatched
    if backend == "grouped" and not capacity_limited and not grad and num_slots <= SMALL_SLOTS:
        return few_slots
    return fused if backend == "triton" and isinstance(experts, GroupedExperts) else dispatched
