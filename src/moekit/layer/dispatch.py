"""Dispatch and combine: move routed slots into expert order and back.

``plan_dispatch`` (:mod:`moekit.kernels.plan`, re-exported here with :class:`DispatchPlan`)
sorts the T*K slots by expert (empty slots, id E, sort last), ``dispatch``
gathers their token rows, the experts compute one grouped pass over ``x_RD``, and ``combine``
puts the results back in slot order and sums them with the routing weights. Capacity limits
(GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021) are applied beforehand by
``apply_capacity``, which turns overflowing slots into empty ones or re-routes them.

Under expert parallelism, module hooks on the experts (``moekit.parallel``) carry the rows to the
ranks holding their experts and back; the experts see the same ``(x_RD, counts_E)`` either way.

Shape legend: T tokens, D model width, E experts, K slots per token, S = T*K slots,
R rows handed to the experts (R = S, or E*C under a capacity C).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..kernels import eager_autograd
from ..kernels.plan import DispatchPlan, plan_dispatch, slot_counts  # noqa: F401  (plan_dispatch: re-exported)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float, min_capacity: int = 1) -> int:
    """C = ceil(factor * T * K / E), at least ``min_capacity`` and at most T. (Rounded to 9 digits
    before the ceiling so that 1.1 * 100 / 10 gives 11, not 12.)"""
    return min(num_tokens, max(min_capacity, math.ceil(round(factor * num_tokens * top_k / num_experts, 9))))


def _priority_S(scores_TK: Tensor, priority: str) -> Tensor:
    """Rank of each slot in the order experts accept them: all first choices before any second
    choice (GShard); within a choice, token order ("order") or descending best router score
    ("score": batch prioritized routing, Riquelme et al. 2021, whose priority is the token's top-1
    router probability; ties keep token order)."""
    T, K = scores_TK.shape
    if priority == "order":
        rank_T = torch.arange(T, device=scores_TK.device)
    else:
        by_score_T = scores_TK.detach().amax(-1).argsort(descending=True, stable=True)
        rank_T = torch.empty_like(by_score_T).scatter_(0, by_score_T, torch.arange(T, device=scores_TK.device))
    k_K = torch.arange(K, device=scores_TK.device)
    return (k_K[None, :] * T + rank_T[:, None]).reshape(-1)


def _positions(experts_S: Tensor, priority_S: Tensor, num_experts: int, start_E: Optional[Tensor] = None) -> Tensor:
    """Each slot's position in its expert's queue (0-based, in priority order), plus ``start_E``."""
    S = experts_S.numel()
    order = (experts_S * S + priority_S).argsort()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts_S.device)
    counts.scatter_add_(0, experts_S, torch.ones_like(experts_S))
    first = counts.cumsum(0) - counts
    pos_sorted = torch.arange(S, device=experts_S.device) - first[experts_S[order]]
    pos_S = torch.empty_like(pos_sorted).scatter_(0, order, pos_sorted)
    if start_E is not None:
        pos_S = pos_S + torch.cat([start_E, start_E.new_zeros(1)])[experts_S]
    return pos_S


def apply_capacity(
    experts_TK: Tensor,
    weights_TK: Tensor,
    capacity: int,
    num_experts: int,
    *,
    probs_TE: Optional[Tensor] = None,
    overflow: str = "drop",
    priority: str = "order",
    scores_TK: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Limit every expert to ``capacity`` slots.

    Slots are accepted all first choices first, then all second choices, ...; within a choice in
    token order (``priority="order"``) or by descending ``scores_TK.amax(-1)`` (``"score"``: V-MoE's
    batch prioritized routing, Riquelme et al. 2021). ``scores_TK`` is the router's score of each
    slot's expert before renormalisation (:attr:`Routing.scores_TK`; default ``weights_TK``, which
    is the same only for weights that are not renormalised: a renormalised top-1 weight is always 1).
    Over-capacity slots become empty (expert id E, weight 0): the token's MoE output for that
    slot is zero and the residual connection carries it. With ``overflow="reroute"`` each dropped
    slot is offered, in rounds, to its token's next-best expert (by ``probs_TE``) that still has
    room, with weight ``p_new * w_old / p_old`` (the router's normalisation kept).

    Returns the new ``(experts_TK, weights_TK)``.
    """
    T, K = experts_TK.shape
    E = num_experts
    experts_S = experts_TK.reshape(-1)
    prio_S = _priority_S(weights_TK if scores_TK is None else scores_TK, priority)
    keep_S = (_positions(experts_S, prio_S, E) < capacity) & (experts_S < E)
    new_experts_S = torch.where(keep_S, experts_S, E)
    new_weights_S = weights_TK.reshape(-1) * keep_S
    if overflow == "reroute":
        if probs_TE is None:
            raise ValueError("overflow='reroute' needs the router's probs_TE")
        new_experts_S, new_weights_S = _reroute(
            experts_TK, weights_TK, new_experts_S, new_weights_S, probs_TE, capacity, prio_S
        )
    return new_experts_S.view(T, K), new_weights_S.view(T, K)


def _reroute(experts_TK, weights_TK, experts_S, weights_S, probs_TE, capacity, prio_S):
    T, K = experts_TK.shape
    E = probs_TE.shape[-1]
    dev = experts_TK.device
    tried_TE = torch.zeros(T, E + 1, dtype=torch.bool, device=dev)
    tried_TE.scatter_(1, experts_TK, True)
    tried_TE = tried_TE[:, :E] | (probs_TE.detach() <= 0)
    p_old_S = probs_TE.gather(1, experts_TK.clamp(max=E - 1)).reshape(-1)
    scale_S = weights_TK.reshape(-1) / p_old_S.clamp_min(torch.finfo(p_old_S.dtype).tiny)
    dropped_S = (experts_S == E) & (experts_TK.reshape(-1) < E)
    # each round handles slot k of every token at once, so one token never takes an expert twice
    for _ in range(E):
        if not dropped_S.any():
            break
        for k in range(K):
            fill_E = slot_counts(experts_S.view(T, K), E)
            full_E = fill_E >= capacity
            cand_S = dropped_S.view(T, K)[:, k]
            score_TE = probs_TE.detach().masked_fill(tried_TE | full_E, float("-inf"))
            best_T = score_TE.argmax(-1)
            cand_S = cand_S & torch.isfinite(score_TE.amax(-1))
            idx_T = torch.arange(T, device=dev) * K + k
            target_T = torch.where(cand_S, best_T, E)
            pos_T = _positions(target_T, prio_S[idx_T], E, start_E=fill_E)
            ok_T = cand_S & (pos_T < capacity)
            tried_TE[torch.arange(T, device=dev), best_T] |= cand_S
            experts_S = experts_S.clone()
            experts_S[idx_T] = torch.where(ok_T, best_T, experts_S[idx_T])
            new_w_T = probs_TE.gather(1, best_T[:, None]).squeeze(1) * scale_S[idx_T]
            weights_S = weights_S.index_put((idx_T,), torch.where(ok_T, new_w_T, weights_S[idx_T]))
            dropped_S = dropped_S.clone()
            dropped_S[idx_T] = dropped_S[idx_T] & ~ok_T & torch.isfinite(score_TE.amax(-1))
    return experts_S, weights_S


def _to_slot_order(y_RD: Tensor, order_R: Tensor, inverse_S: Optional[Tensor], S: int) -> Tensor:
    """Rows back in slot order (S, D); slots that got no row are zero."""
    if inverse_S is not None:
        return y_RD.index_select(0, inverse_S)
    return y_RD.new_zeros(S, y_RD.shape[-1]).index_copy(0, order_R, y_RD)


class _GatherSlots(torch.autograd.Function):
    """``x_RD = x_TD[order_R // K]``. Backward sums each token's K row gradients. On the CPU one
    ``index_add_`` does it (serial per index there, so deterministic; torch 2.13 accumulates 16-bit
    floats in float32, so each sum rounds once, tested): against putting the rows back in slot
    order and summing over K, 1.21 -> 0.70 ms at fp32 K=4 D=128, 7.05 -> 3.36 at K=2 D=512, 7.86
    -> 3.08 in bf16 (T*K = 8192, 1 thread; benchmarks/cpu_overheads.py, table in RESULTS.md).
    Elsewhere, and under torch.compile (whose inductor fuses it), the rows go back in slot order
    (a permutation, no atomics) and are summed: deterministic, where a CUDA index_add_ is not."""

    @staticmethod
    def forward(ctx, x_TD, order_R, inverse_S, K):
        token_R = torch.div(order_R, K, rounding_mode="floor")
        ctx.K, ctx.T = K, x_TD.shape[0]
        # under torch.compile the permutation + sum, which inductor fuses into one loop
        ctx.index_add = x_TD.device.type == "cpu" and eager_autograd()
        ctx.save_for_backward(*((token_R,) if ctx.index_add else (order_R, inverse_S)))
        return x_TD.index_select(0, token_R)

    @staticmethod
    def backward(ctx, g_RD):
        if ctx.index_add:
            (token_R,) = ctx.saved_tensors
            return g_RD.new_zeros(ctx.T, g_RD.shape[-1]).index_add_(0, token_R, g_RD), None, None, None
        order_R, inverse_S = ctx.saved_tensors
        g_SD = _to_slot_order(g_RD, order_R, inverse_S, ctx.T * ctx.K)
        return g_SD.view(ctx.T, ctx.K, g_SD.shape[-1]).sum(1), None, None, None


class _ScatterSlots(torch.autograd.Function):
    """``y_SD`` = rows back in slot order; backward is the forward gather ``g_SD[order_R]``."""

    @staticmethod
    def forward(ctx, y_RD, order_R, inverse_S, S):
        ctx.save_for_backward(order_R)
        return _to_slot_order(y_RD, order_R, inverse_S, S)

    @staticmethod
    def backward(ctx, g_SD):
        (order_R,) = ctx.saved_tensors
        return g_SD.index_select(0, order_R), None, None, None


def dispatch(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """Token rows in expert order, ``x_RD``; rows of empty slots are zero."""
    x_RD = _GatherSlots.apply(x_TD, plan.order_R, plan.inverse_S, plan.top_k)
    if plan.has_empty:
        x_RD = torch.where(plan.valid_R()[:, None], x_RD, 0)
    return x_RD


def combine(y_RD: Tensor, plan: DispatchPlan, weights_TK: Tensor) -> Tensor:
    """``out_TD = sum_k weights_TK[t, k] * y[slot (t, k)]``; empty slots contribute zero."""
    y_TKD = undispatch(y_RD, plan)
    return weighted_sum(weights_TK.to(y_TKD.dtype), y_TKD)


def undispatch(y_RD: Tensor, plan: DispatchPlan) -> Tensor:
    """The experts' rows back in slot order, ``y_TKD``; empty slots are zero. The first half of
    :func:`combine`, for a caller that sums the slots its own way."""
    T, K = plan.num_tokens, plan.top_k
    if plan.has_empty:
        y_RD = torch.where(plan.valid_R()[:, None], y_RD, 0)
    return _ScatterSlots.apply(y_RD, plan.order_R, plan.inverse_S, T * K).view(T, K, y_RD.shape[-1])


class _WeightedSum(torch.autograd.Function):
    """``out_TD = sum_k weights_TK[t, k] * y_TKD[t, k]``, each step in its cheapest CPU form.

    Forward: an ``addcmul_`` chain for K <= 2 (the (1,K) x (K,D) batches of a bmm are slow
    there), else one (T,1,K) x (T,K,D) bmm. Backward: ``g_y`` one broadcast multiply; ``g_w`` a
    (1,D) x (D,K) bmm in float32, a ``vecdot`` in 16-bit floats (where the K <= 2 chain rounds
    after each term, the bmm once: at most a unit in the last place apart). Fwd+bwd, T*K = 8192,
    1 thread, ms, autograd's multiply + sum / autograd's bmm / this: fp32 K=2 D=128 3.97 / 10.10 /
    2.64, K=4 D=128 2.77 / 1.61 / 1.28, K=2 D=512 16.68 / 8.12 / 6.78; bf16 K=2 D=128 2.94 / 3.24 /
    1.81, K=2 D=512 13.36 / 15.96 / 7.07 (benchmarks/cpu_overheads.py; table in RESULTS.md)."""

    @staticmethod
    def forward(ctx, weights_TK: Tensor, y_TKD: Tensor) -> Tensor:
        ctx.save_for_backward(weights_TK, y_TKD)
        K = y_TKD.shape[1]
        with torch.autocast("cpu", enabled=False):  # in y's dtype, as the backward (run outside autocast) expects
            if K > 2:
                return torch.bmm(weights_TK.unsqueeze(1), y_TKD).squeeze(1)
            out_TD = y_TKD[:, 0] * weights_TK[:, :1]
            for k in range(1, K):
                out_TD.addcmul_(y_TKD[:, k], weights_TK[:, k : k + 1])
            return out_TD

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        weights_TK, y_TKD = ctx.saved_tensors
        g_T1D = g_TD.unsqueeze(1)
        g_w = None
        if ctx.needs_input_grad[0]:
            if y_TKD.dtype in (torch.float32, torch.float64):
                g_w = torch.bmm(g_T1D, y_TKD.transpose(1, 2)).squeeze(1)
            else:
                g_w = torch.linalg.vecdot(y_TKD, g_T1D)
        g_y = weights_TK.unsqueeze(-1) * g_T1D if ctx.needs_input_grad[1] else None
        return g_w, g_y


def weighted_sum(weights_TK: Tensor, y_TKD: Tensor) -> Tensor:
    """``sum_k weights_TK[t, k] * y_TKD[t, k]`` (both in one dtype). Eager on the CPU
    :class:`_WeightedSum`; under torch.compile and on other devices (not measured there) a plain
    multiply + sum in float32/64, which inductor fuses with the gather before it, and a bmm in
    16-bit floats (one rounding)."""
    if y_TKD.device.type == "cpu" and eager_autograd():
        return _WeightedSum.apply(weights_TK, y_TKD)
    if y_TKD.dtype in (torch.float32, torch.float64):
        return (weights_TK.unsqueeze(-1) * y_TKD).sum(1)
    return torch.bmm(weights_TK.unsqueeze(1), y_TKD).squeeze(1)
