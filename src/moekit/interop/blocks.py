"""Single MoE *blocks* of transformers models as moekit :class:`~moekit.MoE` layers (weights copied).

* DeepSeek-V3 (``DeepseekV3MoE``): sigmoid scores, group-limited top-k on scores +
  ``e_score_correction_bias`` (sum of each group's two best), renormalised selected scores times
  ``routed_scaling_factor``, plus the shared experts: moekit's ``router="sigmoid"``.
* gpt-oss (``GptOssMLP``): a biased router, softmax over the top-k logits, experts with biases and
  a clamped SwiGLU ``(clamp(up) + 1) * g * sigmoid(alpha * g)`` on interleaved gate/up columns.
  moekit's stacked experts have no biases, so the experts become a heterogeneous expert list
  (:class:`GptOssExpert` modules, run by the loop backend).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..layer.experts import GroupedExperts
from ..layer.moe import MoE
from ..layer.router import SigmoidRouter
from .hf import UnsupportedModelError, WeightMismatchError


def _w(t: Tensor) -> Tensor:
    return t.detach().clone()


def deepseek_v3_moe(block: Any, config) -> MoE:
    """A moekit MoE equal to a transformers ``DeepseekV3MoE`` block (``block(x)`` == ``moe(x).out``)."""
    E = config.n_routed_experts if getattr(config, "n_routed_experts", None) else config.num_local_experts
    cfg = MoEConfig(
        dim=config.hidden_size,
        hidden_dim=config.moe_intermediate_size,
        num_experts=E,
        top_k=config.num_experts_per_tok,
        expert="swiglu",
        router="sigmoid",
        renormalize=bool(config.norm_topk_prob),
        num_groups=config.n_group,
        topk_groups=config.topk_group,
        routed_scaling_factor=float(config.routed_scaling_factor),
        num_shared_experts=config.n_shared_experts,
        shared_hidden_dim=config.moe_intermediate_size,
        router_dtype="float32",
        bias_update_rate=0.0,
        balance_loss_weight=0.0,
        z_loss_weight=0.0,
    )
    if config.hidden_act != "silu":
        raise UnsupportedModelError(f"DeepSeek-V3 hidden_act={config.hidden_act!r} (only 'silu')")
    moe = MoE(cfg)
    assert isinstance(moe.router, SigmoidRouter) and isinstance(moe.experts, GroupedExperts) and moe.shared is not None
    ex = block.experts
    if tuple(ex.gate_up_proj.shape) != (E, 2 * cfg.hidden_dim, cfg.dim):
        raise WeightMismatchError(
            f"experts.gate_up_proj: expected shape {(E, 2 * cfg.hidden_dim, cfg.dim)}, "
            f"got {tuple(ex.gate_up_proj.shape)}"
        )
    with torch.no_grad():
        moe.router.linear.weight.copy_(block.gate.weight)
        moe.router.bias_E.copy_(block.gate.e_score_correction_bias)
        moe.experts.w_up.copy_(ex.gate_up_proj.transpose(1, 2))
        moe.experts.w_down.copy_(ex.down_proj.transpose(1, 2))
        s = block.shared_experts
        assert moe.shared.w_gate is not None  # a SwiGLU shared expert
        moe.shared.w_gate.copy_(s.gate_proj.weight.t())
        moe.shared.w_up.copy_(s.up_proj.weight.t())
        moe.shared.w_down.copy_(s.down_proj.weight.t())
    return moe.eval()


class GptOssExpert(nn.Module):
    """One gpt-oss expert: ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g) @ W_down + b_down`` with
    ``g = clamp(gate, max=l)`` and [gate, up] interleaved in the columns of ``x @ W_up + b_up``."""

    def __init__(
        self, w_up_DH: Tensor, b_up_H: Tensor, w_down_FD: Tensor, b_down_D: Tensor, alpha: float, limit: float
    ):
        super().__init__()
        self.w_up, self.b_up = nn.Parameter(_w(w_up_DH)), nn.Parameter(_w(b_up_H))
        self.w_down, self.b_down = nn.Parameter(_w(w_down_FD)), nn.Parameter(_w(b_down_D))
        self.alpha, self.limit = alpha, limit

    def forward(self, x_ND: Tensor) -> Tensor:
        h = x_ND @ self.w_up + self.b_up
        gate, up = h[..., ::2].clamp(max=self.limit), h[..., 1::2].clamp(-self.limit, self.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * self.alpha)) @ self.w_down + self.b_down


def gpt_oss_moe(block: Any, config) -> MoE:
    """A moekit MoE equal to a transformers ``GptOssMLP`` block (``block(x)[0]`` == ``moe(x).out``)."""
    E, D, F_ = config.num_local_experts, config.hidden_size, config.intermediate_size
    cfg = MoEConfig(
        dim=D,
        hidden_dim=F_,
        num_experts=E,
        top_k=config.num_experts_per_tok,
        router="topk",
        renormalize=True,
        router_bias=True,
        router_dtype="same",
        balance_loss_weight=0.0,
        z_loss_weight=0.0,
    )
    ex = block.experts
    if tuple(ex.gate_up_proj.shape) != (E, D, 2 * F_):
        raise WeightMismatchError(
            f"experts.gate_up_proj: expected shape {(E, D, 2 * F_)}, got {tuple(ex.gate_up_proj.shape)}"
        )
    experts = [
        GptOssExpert(
            ex.gate_up_proj[e],
            ex.gate_up_proj_bias[e],
            ex.down_proj[e],
            ex.down_proj_bias[e],
            float(config.swiglu_alpha) if hasattr(config, "swiglu_alpha") else ex.alpha,
            float(config.swiglu_limit) if hasattr(config, "swiglu_limit") else ex.limit,
        )
        for e in range(E)
    ]
    moe = MoE(cfg, experts=experts)
    with torch.no_grad():
        moe.router.linear.weight.copy_(block.router.weight)
        moe.router.linear.bias.copy_(block.router.bias)
    return moe.eval()
