"""Multi-gate Mixture-of-Experts for multi-task learning (Ma et al. 2018, "Modeling Task
Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD).

E shared experts (small ReLU MLPs), one softmax gate per task over the experts, one tower per
task on top of its own mixture:

    f_e(x) = relu(x W_e + b_e)                         expert e, (B, expert_dim)
    g^t(x) = softmax(x W_g^t)                          task t's gate, (B, E)
    y^t    = tower^t( sum_e g^t_e(x) f_e(x) )

The gating is dense (every expert runs on every example), as in the paper. ``shared_gate=True``
gives the paper's one-gate baseline OMoE (all tasks read the same mixture).

Shape legend: B examples, I input width, E experts, H expert output width, T tasks,
Ht tower hidden width, O outputs per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MultiGateMoEConfig, config_from_args


@dataclass
class MultiGateOutput:
    """What one MultiGateMoE call returns."""

    outs: list  # per task, (B, O)
    gates_TBE: Tensor  # each task's gate distribution (rows sum to 1); for OMoE all tasks are equal
    aux_loss: Tensor  # scalar 0 (the paper adds no balancing loss)
    stats: dict = field(default_factory=dict)  # gate_entropy (per task, mean over examples), expert_share_TE

    @property
    def out_BTO(self) -> Tensor:
        return torch.stack(self.outs, dim=1)


class MultiGateMoE(nn.Module):
    """MMoE (Ma et al. 2018): shared experts, a gate and a tower per task.

    Args:
        cfg: the layer's :class:`~moekit.config.MultiGateMoEConfig`; or, instead, its fields as
            arguments: ``in_dim``, ``expert_dim`` (each expert's output width, one ReLU layer),
            ``num_experts``, ``num_tasks``, ``tower_hidden`` (each tower: one ReLU layer, then a
            linear output), ``out_dim`` (1), ``shared_gate`` (False; True: the paper's OMoE baseline).

    Example::

        mmoe = MultiGateMoE(in_dim=100, expert_dim=16, num_experts=8, num_tasks=2, tower_hidden=8)
        res = mmoe(x)                          # res.outs[t]: (B, 1); res.gates_TBE: (2, B, 8)
        loss = sum(F.mse_loss(o, y[:, t:t + 1]) for t, o in enumerate(res.outs))
    """

    def __init__(self, *args, cfg: MultiGateMoEConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = cfg = config_from_args(MultiGateMoEConfig, cfg, args, kwargs, layer="MultiGateMoE")
        self.in_dim, self.num_experts, self.num_tasks, self.shared_gate = (
            cfg.in_dim,
            cfg.num_experts,
            cfg.num_tasks,
            cfg.shared_gate,
        )
        In, E, H = cfg.in_dim, cfg.num_experts, cfg.expert_dim
        bound = 1.0 / math.sqrt(In)  # nn.Linear's default initialisation, per expert
        self.w_EIH = nn.Parameter(torch.empty(E, In, H).uniform_(-bound, bound))
        self.b_EH = nn.Parameter(torch.empty(E, H).uniform_(-bound, bound))
        self.gates = nn.ModuleList([nn.Linear(In, E) for _ in range(1 if cfg.shared_gate else cfg.num_tasks)])
        self.towers = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(H, cfg.tower_hidden), nn.ReLU(), nn.Linear(cfg.tower_hidden, cfg.out_dim))
                for _ in range(cfg.num_tasks)
            ]
        )

    def experts(self, x_BI: Tensor) -> Tensor:
        """All experts' outputs (B, E, H)."""
        return F.relu(torch.einsum("bi,eih->beh", x_BI, self.w_EIH) + self.b_EH)

    def forward(self, x_BI: Tensor) -> MultiGateOutput:
        if x_BI.dim() != 2 or x_BI.shape[-1] != self.in_dim:
            raise ValueError(f"x must have shape (batch, in_dim={self.in_dim}); got {tuple(x_BI.shape)}")
        h_BEH = self.experts(x_BI)
        gates = [g(x_BI).softmax(-1) for g in self.gates]
        if self.shared_gate:
            gates = gates * self.num_tasks
        gates_TBE = torch.stack(gates)
        mix_TBH = torch.einsum("tbe,beh->tbh", gates_TBE, h_BEH)
        outs = [tower(mix_TBH[t]) for t, tower in enumerate(self.towers)]
        with torch.no_grad():
            stats = {
                "gate_entropy": -torch.special.xlogy(gates_TBE, gates_TBE).sum(-1).mean(-1),
                "expert_share_TE": gates_TBE.mean(1),
            }
        return MultiGateOutput(outs, gates_TBE, x_BI.new_zeros(()), stats)


__all__ = ["MultiGateMoE", "MultiGateOutput"]
