"""Hierarchical Mixture-of-Experts (Shazeer et al. 2017, "Outrageously Large Neural Networks",
appendix B).

A primary gate picks ``top_k_groups`` of G groups for each token; inside each chosen group, that
group's own gate picks ``top_k_experts`` of its Eg experts:

    y = sum_{g in top groups} Gp(x)_g * sum_{j in top experts of g} Gg(x)_j * E_{g,j}(x)

Both gates are ``softmax(KeepTopK(x W))`` (the paper's gating without noise), i.e. the top-k
softmax probabilities renormalised over the kept ones; with ``renormalize=False`` the weights are
the raw softmax probabilities (Switch, Fedus et al. 2021). A top-1 gate needs the latter to learn
from the task loss: renormalised, its single weight is the constant 1 (the layer warns at
construction, as :class:`~moekit.MoE` does). Only the chosen branches run: a group's gate is
evaluated only on the tokens that picked the group, and an expert only on its rows (the
flattened (token, expert) slots go through moekit's dispatch / experts / combine path, so the
stacked experts run one grouped pass).

Auxiliary losses at both levels, returned unweighted in ``losses`` and weighted in ``aux_loss``:

* ``group_importance``: CV^2 over groups of the summed primary gate weights (Shazeer et al. 2017).
* ``group_balance``: G * sum_g f_g P_g over groups (Switch, Fedus et al. 2021).
* ``expert_importance``: CV^2 over all G*Eg experts of ``importance_H(X)_{g,j} = sum_x Gp(x)_g Gg(x)_j``
  (the paper's hierarchical importance).
* ``expert_balance``: for each group, Eg * sum_j f_j P_j over the tokens routed to it, averaged
  over the groups that received tokens.

Shape legend: T tokens, D model width, G groups, Eg experts per group, E = G*Eg experts,
Kg groups per token, Ke experts per chosen group, K = Kg*Ke slots per token.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import HierarchicalMoEConfig, config_from_args
from ..kernels import compute_dtype, resolve_backend
from . import losses as L
from .dispatch import combine, dispatch, plan_dispatch
from .experts import GroupedExperts, ModuleListExperts
from .moe import MoEOutput, _user_stacklevel


def _keep_top_k(logits_NX: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(softmax probs, top-k ids, top-k weights) of gate logits, in fp32 or wider; the weights
    renormalised over the kept k, or the raw probabilities."""
    probs = logits_NX.to(torch.promote_types(logits_NX.dtype, torch.float32)).softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    return probs, idx, (w / w.sum(-1, keepdim=True) if renormalize else w)


def _warn_constant_weight(cfg: HierarchicalMoEConfig) -> None:
    """Warn, as :class:`~moekit.MoE` does, when a gate that has a choice keeps 1 option with
    renormalised weights: its weight is then the constant p / p = 1, and the gate gets no gradient
    from the layer's output, only from the auxiliary losses."""
    if not cfg.renormalize:
        return
    levels = [
        (k, name, gate)
        for k, name, gate, choices in (
            (cfg.top_k_groups, "top_k_groups", "the primary gate", cfg.num_groups),
            (cfg.top_k_experts, "top_k_experts", "the group gates", cfg.experts_per_group),
        )
        if k == 1 and choices > 1  # one group / one expert per group: nothing to choose, nothing to learn
    ]
    if levels:
        settings = " and ".join(f"{name}=1" for _, name, _ in levels)
        gates = " and ".join(gate for _, _, gate in levels)
        remedy = " or ".join(f"{name} >= 2" for _, name, _ in levels)
        warnings.warn(
            f"moekit: HierarchicalMoE with {settings} gets no gradient for {gates} from the layer's output, "
            f"only from the auxiliary losses: renormalize=True makes every such weight p / p = 1; use "
            f"renormalize=False (the raw softmax probabilities, as Switch) or {remedy}",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )


class HierarchicalMoE(nn.Module):
    """A two-level MoE layer mapping (..., D) -> (..., D).

    Args:
        cfg: the layer's :class:`~moekit.config.HierarchicalMoEConfig`; or, instead, its fields as
            arguments: ``dim``, ``hidden_dim``, ``num_groups`` (G), ``experts_per_group`` (Eg),
            ``top_k_groups`` (Kg, 1), ``top_k_experts`` (Ke, 2), ``expert`` ("swiglu"),
            ``importance_loss_weight`` and ``balance_loss_weight`` (1e-2 each, applied at both
            levels), ``renormalize`` (True, the paper; False: raw softmax probabilities, for a level
            that keeps only 1 choice), ``backend`` ("auto").
        experts: optional list of G*Eg modules (N, D) -> (N, D) replacing the stacked FFNs;
            expert (g, j) is ``experts[g * Eg + j]`` (keyword only).

    Example::

        hmoe = HierarchicalMoE(dim=64, hidden_dim=128, num_groups=4, experts_per_group=4,
                               top_k_groups=1, top_k_experts=2, renormalize=False)
        res = hmoe(x)                          # res.out like x; res.experts_TK holds flat ids g*Eg+j
        loss = task_loss(res.out) + res.aux_loss
    """

    def __init__(
        self, *args, cfg: HierarchicalMoEConfig | None = None, experts: Sequence[nn.Module] | None = None, **kwargs
    ):
        super().__init__()
        self.cfg = cfg = config_from_args(HierarchicalMoEConfig, cfg, args, kwargs, layer="HierarchicalMoE")
        self.dim, self.num_groups, self.experts_per_group = cfg.dim, cfg.num_groups, cfg.experts_per_group
        self.top_k_groups, self.top_k_experts = cfg.top_k_groups, cfg.top_k_experts
        self.importance_loss_weight, self.balance_loss_weight = cfg.importance_loss_weight, cfg.balance_loss_weight
        self.backend, self.renormalize = cfg.backend, cfg.renormalize
        E = cfg.num_groups * cfg.experts_per_group
        self.primary = nn.Linear(cfg.dim, cfg.num_groups, bias=False)
        self.group_gates = nn.ModuleList(
            [nn.Linear(cfg.dim, cfg.experts_per_group, bias=False) for _ in range(cfg.num_groups)]
        )
        if experts is not None:
            if len(experts) != E:
                raise ValueError(f"got {len(experts)} experts but num_groups * experts_per_group is {E}")
            self.experts: nn.Module = ModuleListExperts(list(experts), cfg.dim)
        else:
            self.experts = GroupedExperts(E, cfg.dim, cfg.hidden_dim, cfg.expert)
        _warn_constant_weight(cfg)

    @property
    def num_experts(self) -> int:
        return self.num_groups * self.experts_per_group

    def forward(self, x: Tensor) -> MoEOutput:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be a floating-point tensor with last dimension dim={self.dim}")
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, self.dim)
        T, G = x_TD.shape[0], self.num_groups
        gp_probs_TG, groups_TKg, gp_w_TKg = _keep_top_k(self.primary(x_TD), self.top_k_groups, self.renormalize)
        experts_TK, weights_TK, importance_E, balances = self._route_in_groups(x_TD, groups_TKg, gp_w_TKg)

        plan = plan_dispatch(experts_TK, self.num_experts)
        backend = (
            resolve_backend(self.backend, x.device, compute_dtype(x))
            if isinstance(self.experts, GroupedExperts)
            else "loop"
        )
        y_RD = self.experts(dispatch(x_TD, plan), plan.counts_E, backend)
        out_TD = combine(y_RD, plan, weights_TK)

        zero = x_TD.new_zeros((), dtype=torch.float32)
        losses = {
            "group_importance": L.importance_loss(groups_TKg, gp_w_TKg, G) if T else zero,
            "group_balance": L.load_balancing_loss(gp_probs_TG, groups_TKg) if T else zero,
            "expert_importance": L.cv_squared(importance_E) if T else zero,
            "expert_balance": torch.stack(balances).mean() if balances else zero,
        }
        aux = self.importance_loss_weight * (
            losses["group_importance"] + losses["expert_importance"]
        ) + self.balance_loss_weight * (losses["group_balance"] + losses["expert_balance"])
        with torch.no_grad():
            stats = {
                "tokens_per_expert": plan.counts_E.detach(),
                "tokens_per_group": L.slot_counts(groups_TKg, G),
                "group_entropy": L.routing_entropy(gp_probs_TG) if T else zero,
            }
        return MoEOutput(out_TD.reshape(*lead, self.dim).to(x.dtype), aux, losses, stats, experts_TK, weights_TK)

    def _route_in_groups(
        self, x_TD: Tensor, groups_TKg: Tensor, gp_w_TKg: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """(experts_TK flat ids g*Eg+j, weights_TK = Gp(x)_g * Gg(x)_j, importance_E, per-group balance
        losses): each chosen group's gate, run only on the tokens that picked it."""
        T, G, Eg, Kg, Ke = x_TD.shape[0], self.num_groups, self.experts_per_group, self.top_k_groups, self.top_k_experts
        E = G * Eg
        experts_TKgKe = torch.full((T, Kg, Ke), E, dtype=torch.int64, device=x_TD.device)
        weights_TKgKe = x_TD.new_zeros((T, Kg, Ke), dtype=gp_w_TKg.dtype)
        importance_E = x_TD.new_zeros(E, dtype=gp_w_TKg.dtype)
        balances = []
        for g in range(G):  # only the groups some token picked run their gate
            tok_P, slot_P = (groups_TKg == g).nonzero(as_tuple=True)
            if tok_P.numel() == 0:
                continue
            probs_PEg, idx_PKe, w_PKe = _keep_top_k(self.group_gates[g](x_TD[tok_P]), Ke, self.renormalize)
            w_PKe = w_PKe * gp_w_TKg[tok_P, slot_P, None]  # Gp(x)_g * Gg(x)_j
            experts_TKgKe = experts_TKgKe.index_put((tok_P, slot_P), g * Eg + idx_PKe)
            weights_TKgKe = weights_TKgKe.index_put((tok_P, slot_P), w_PKe)
            importance_E = importance_E.index_add(0, g * Eg + idx_PKe.reshape(-1), w_PKe.reshape(-1))
            balances.append(L.load_balancing_loss(probs_PEg, idx_PKe))
        return experts_TKgKe.view(T, Kg * Ke), weights_TKgKe.view(T, Kg * Ke), importance_E, balances

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, groups={self.num_groups}, experts_per_group={self.experts_per_group}, "
            f"top_k_groups={self.top_k_groups}, top_k_experts={self.top_k_experts}"
        )


__all__ = ["HierarchicalMoE"]
