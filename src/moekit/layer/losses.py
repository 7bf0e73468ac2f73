"""Auxiliary routing losses: pure functions of a :class:`~moekit.layer.router.Routing`.

Shape legend: T tokens, E routed experts, K slots per token. An empty slot has expert id E.
All losses are unweighted scalars; the layer multiplies each by its configured weight. Each is
a function of sums over tokens (``*_from_stats``, ``*_per_token``, ``importance_E``), so that under
expert/data parallelism the layer all-reduces the sums and gets the loss of the global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.plan import slot_counts

# every auxiliary loss the layer returns in ``losses`` -> the MoEConfig field weighting it in ``aux_loss``
LOSS_WEIGHTS = {
    "balance": "balance_loss_weight",
    "sq_load": "sq_load_loss_weight",
    "importance": "importance_loss_weight",
    "load": "load_loss_weight",
    "z": "z_loss_weight",
    "entropy": "entropy_loss_weight",
}


def loss_names(learned_logits: bool, smooth_load: bool) -> list[str]:
    """The losses a layer returns: all of :data:`LOSS_WEIGHTS` but ``z`` without learned router
    logits (the hash router) and ``load`` without the noisy top-k router's smooth load estimate."""
    return [n for n in LOSS_WEIGHTS if (n != "z" or learned_logits) and (n != "load" or smooth_load)]


def _fp32_or_wider(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cv_squared(v_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation var/mean^2 (population variance), 0 for a constant vector."""
    v_E = _fp32_or_wider(v_E)
    if v_E.numel() <= 1:
        return v_E.new_zeros(())
    return v_E.var(unbiased=False) / (v_E.mean() ** 2 + eps)


def balance_from_stats(counts_E: Tensor, mean_probs_E: Tensor) -> Tensor:
    """E * sum_i f_i * P_i from the routed-slot counts and the mean router probabilities
    (Switch Transformer, Fedus et al. 2021), with f_i = counts_E[i] / sum(counts_E) the share of
    routed *slots*: 1 for uniform routing at any top_k. Hugging Face transformers'
    ``load_balancing_loss_func`` divides the counts by the tokens instead (f sums to top_k), so
    its value is ``top_k`` times this one; it also pools counts and probabilities over all layers
    before the product (moekit: ``LMConfig.balance_pooling="model"``)."""
    E = mean_probs_E.shape[-1]
    counts_E = counts_E.to(mean_probs_E.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    return E * (f_E * mean_probs_E).sum()


def sq_load_from_stats(mean_probs_E: Tensor) -> Tensor:
    """E * sum_i P_i^2 from the mean router probabilities."""
    return mean_probs_E.shape[-1] * (mean_probs_E**2).sum()


def importance_E(experts_TK: Tensor, weights_TK: Tensor, num_experts: int) -> Tensor:
    """Summed gate weight of each expert over the batch (E,); empty slots are not counted."""
    imp = torch.zeros(num_experts + 1, dtype=weights_TK.dtype, device=weights_TK.device)
    return imp.scatter_add(0, experts_TK.reshape(-1), weights_TK.reshape(-1))[:num_experts]


def load_balancing_loss(probs_TE: Tensor, experts_TK: Tensor) -> Tensor:
    """E * sum_i f_i * P_i (Switch Transformer, Fedus et al. 2021; GShard, Lepikhin et al. 2020).

    f_i: fraction of routed slots sent to expert i (not differentiable); P_i: mean router
    probability of expert i. Equals 1 when both are uniform. transformers' Mixtral / Qwen-MoE /
    OLMoE ``aux_loss`` of one layer is ``top_k`` times this (it counts f_i per token, not per
    slot; see :func:`balance_from_stats`).
    """
    return balance_from_stats(slot_counts(experts_TK, probs_TE.shape[-1]), probs_TE.mean(0))


def sq_load_loss(probs_TE: Tensor) -> Tensor:
    """E * sum_i P_i^2 with P_i the mean router probability: a differentiable squared
    load-fraction penalty, minimal (= 1) when the soft load is uniform."""
    return sq_load_from_stats(probs_TE.mean(0))


def importance_loss(experts_TK: Tensor, weights_TK: Tensor, num_experts: int) -> Tensor:
    """CV^2 of each expert's summed gate weight over the batch (Shazeer et al. 2017)."""
    return cv_squared(importance_E(experts_TK, weights_TK, num_experts))


def z_per_token(logits_TE: Tensor) -> Tensor:
    """logsumexp(logits)^2 of each token (T,), in fp32 or wider."""
    return torch.logsumexp(_fp32_or_wider(logits_TE), dim=-1) ** 2


def entropy_per_token(probs_TE: Tensor) -> Tensor:
    """Entropy (nats) of each token's routing distribution (T,), in fp32 or wider. The log is
    clamped so that experts with probability exactly 0 (disabled, or -inf logits) give a zero
    gradient instead of 0 * log(0) = NaN."""
    p = _fp32_or_wider(probs_TE)
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (ST-MoE, Zoph et al. 2022)."""
    return z_per_token(logits_TE).mean()


def routing_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of the routing distribution."""
    return entropy_per_token(probs_TE).mean()
