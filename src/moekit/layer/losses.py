"""Auxiliary routing losses: pure functions of a :class:`~moekit.layer.router.Routing`.

Shape legend: T tokens, E routed experts, K slots per token. An empty slot has expert id E.
All losses are unweighted scalars; the layer multiplies each by its configured weight.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _fp32_or_wider(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cv_squared(v_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation var/mean^2 (population variance), 0 for a constant vector."""
    v_E = _fp32_or_wider(v_E)
    if v_E.numel() <= 1:
        return v_E.new_zeros(())
    return v_E.var(unbiased=False) / (v_E.mean() ** 2 + eps)


def slot_counts(experts_TK: Tensor, num_experts: int) -> Tensor:
    """Routed slots per expert (E,), int64; empty slots (id E) are not counted."""
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts_TK.device)
    counts.scatter_add_(0, experts_TK.reshape(-1), torch.ones_like(experts_TK.reshape(-1)))
    return counts[:num_experts]


def load_balancing_loss(probs_TE: Tensor, experts_TK: Tensor) -> Tensor:
    """E * sum_i f_i * P_i (Switch Transformer, Fedus et al. 2021; GShard, Lepikhin et al. 2020).

    f_i: fraction of routed slots sent to expert i (not differentiable); P_i: mean router
    probability of expert i. Equals 1 when both are uniform.
    """
    E = probs_TE.shape[-1]
    counts_E = slot_counts(experts_TK, E).to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    return E * (f_E * probs_TE.mean(0)).sum()


def sq_load_loss(probs_TE: Tensor) -> Tensor:
    """E * sum_i P_i^2 with P_i the mean router probability: a differentiable squared
    load-fraction penalty, minimal (= 1) when the soft load is uniform."""
    E = probs_TE.shape[-1]
    return E * (probs_TE.mean(0) ** 2).sum()


def importance_loss(experts_TK: Tensor, weights_TK: Tensor, num_experts: int) -> Tensor:
    """CV^2 of each expert's summed gate weight over the batch (Shazeer et al. 2017)."""
    imp = torch.zeros(num_experts + 1, dtype=weights_TK.dtype, device=weights_TK.device)
    imp = imp.scatter_add(0, experts_TK.reshape(-1), weights_TK.reshape(-1))
    return cv_squared(imp[:num_experts])


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (ST-MoE, Zoph et al. 2022)."""
    return (torch.logsumexp(_fp32_or_wider(logits_TE), dim=-1) ** 2).mean()


def routing_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of the routing distribution."""
    p = _fp32_or_wider(probs_TE)
    return -torch.special.xlogy(p, p).sum(-1).mean()
