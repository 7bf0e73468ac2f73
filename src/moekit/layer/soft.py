"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Instead of routing each token to a few experts, every expert gets ``S`` *slots*, and every slot
is a convex combination of all the tokens of the sequence:

    logits_BNM = scale * l2norm(x_BND) @ l2norm(Phi_DM)        (M = E*S slots; Phi's columns normalised)
    dispatch_BNM = softmax over tokens N (each slot's column sums to 1)
    combine_BNM  = softmax over slots M (each token's row sums to 1)
    slots_BMD = dispatch_BNM^T @ x_BND ;  expert e runs its S slots ;  out_BND = combine_BNM @ y_BMD

Fully differentiable, no token dropping, no load-balancing loss (``aux_loss`` is 0).

**Not causal**: every slot mixes all tokens of the sequence, so a token's output depends on the
later tokens. Use it for encoders (ViTs, classification), not for autoregressive decoding.

Shape legend: B batch, N tokens per sequence, D model width, E experts, S slots per expert,
M = E*S slots, R = B*M rows handed to the experts (expert-major).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SoftMoEConfig, config_from_args
from ..kernels import compute_dtype, resolve_backend
from .experts import GroupedExperts


@dataclass
class SoftMoEOutput:
    """What one Soft MoE call returns."""

    out: Tensor  # (B, N, D)
    aux_loss: Tensor  # scalar 0: Soft MoE needs no balancing loss
    losses: dict = field(default_factory=dict)  # empty
    stats: dict = field(
        default_factory=dict
    )  # dispatch_entropy, combine_entropy (mean, nats), tokens_per_expert (slot rows)
    dispatch_BNM: Tensor | None = None  # dispatch weights (columns sum to 1 over tokens)
    combine_BNM: Tensor | None = None  # combine weights (rows sum to 1 over slots)


class SoftMoE(nn.Module):
    """A Soft MoE layer mapping (B, N, D) -> (B, N, D).

    Args:
        cfg: the layer's :class:`~moekit.config.SoftMoEConfig`; or, instead, its fields as
            arguments: ``dim``, ``hidden_dim``, ``num_experts``, ``slots_per_expert`` (1),
            ``expert`` ("swiglu"), ``normalize`` (True: L2-normalised tokens and slot parameters
            with a learned scale, the paper's recipe at large D), ``backend`` ("auto").

    Example::

        moe = SoftMoE(dim=64, hidden_dim=128, num_experts=8, slots_per_expert=2)
        moe = SoftMoE(SoftMoEConfig(dim=64, hidden_dim=128, num_experts=8, slots_per_expert=2))  # the same
        res = moe(torch.randn(4, 16, 64))     # res.out: (4, 16, 64)
    """

    def __init__(self, *args, cfg: SoftMoEConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = config_from_args(SoftMoEConfig, cfg, args, kwargs, layer="SoftMoE")
        self.dim, self.num_experts, self.slots_per_expert = cfg.dim, cfg.num_experts, cfg.slots_per_expert
        self.normalize, self.backend = cfg.normalize, cfg.backend
        M = cfg.num_experts * cfg.slots_per_expert
        self.phi_DM = nn.Parameter(torch.randn(cfg.dim, M) / cfg.dim**0.5)  # slot parameters, LeCun normal
        # learned temperature of the normalised logits; shape (1,), not a scalar: FSDP2 shards along dim 0
        self.scale = nn.Parameter(torch.ones(1))
        self.experts = GroupedExperts(cfg.num_experts, cfg.dim, cfg.hidden_dim, cfg.expert)

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.slots_per_expert

    def logits(self, x_BND: Tensor) -> Tensor:
        """Token-slot logits (B, N, M)."""
        phi_DM = self.phi_DM.to(x_BND.dtype)
        if self.normalize:
            return self.scale * (F.normalize(x_BND, dim=-1) @ F.normalize(phi_DM, dim=0))
        return x_BND @ phi_DM

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        key = prefix + "scale"
        if key in state_dict and state_dict[key].dim() == 0:  # saved when the scale was a scalar
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> SoftMoEOutput:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, tokens, dim={self.dim}); got {tuple(x.shape)}")
        B, _, D = x.shape
        E, S = self.num_experts, self.slots_per_expert
        logits_BNM = self.logits(x)
        logits_BNM = logits_BNM.to(torch.promote_types(logits_BNM.dtype, torch.float32))  # softmaxes in fp32 or wider
        dispatch_BNM = logits_BNM.softmax(dim=1)  # over tokens: each slot is a convex mix of the tokens
        combine_BNM = logits_BNM.softmax(dim=2)  # over slots: each output is a convex mix of the slots
        slots_BMD = dispatch_BNM.transpose(1, 2).to(x.dtype) @ x
        # rows in expert order: slot m belongs to expert m // S
        x_RD = slots_BMD.view(B, E, S, D).transpose(0, 1).reshape(E * B * S, D)
        counts_E = torch.full((E,), B * S, dtype=torch.int64, device=x.device)
        y_RD = self.experts(x_RD, counts_E, resolve_backend(self.backend, x.device, compute_dtype(x_RD)))
        y_BMD = y_RD.view(E, B, S, D).transpose(0, 1).reshape(B, E * S, D)
        out_BND = combine_BNM.to(x.dtype) @ y_BMD
        with torch.no_grad():
            stats = {
                "dispatch_entropy": -torch.special.xlogy(dispatch_BNM, dispatch_BNM).sum(1).mean(),
                "combine_entropy": -torch.special.xlogy(combine_BNM, combine_BNM).sum(2).mean(),
                "tokens_per_expert": counts_E,  # slot rows each expert computed (always equal)
            }
        return SoftMoEOutput(out_BND, x.new_zeros((), dtype=torch.float32), {}, stats, dispatch_BNM, combine_BNM)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.experts.hidden_dim}, experts={self.num_experts}, "
            f"slots_per_expert={self.slots_per_expert}, normalize={self.normalize}"
        )


__all__ = ["SoftMoE", "SoftMoEOutput"]
