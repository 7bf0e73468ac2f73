"""Routers: who goes where, and with what weight.

Every router maps tokens ``x_TD`` to a :class:`Routing`: for each token K slots, each slot an
expert id and a combine weight. A slot that carries no token (dropped by GShard's random
routing, not chosen by any expert under expert choice, over capacity) holds the sentinel
expert id ``E`` and weight 0, so every later stage works on fixed shapes.

Besides the combine weight, each slot carries the router's *score* of its expert before any
renormalisation or scaling (the softmax probability; the sigmoid affinity for DeepSeek-V3
routing). Capacity with ``capacity_priority="score"`` ranks tokens by their best score (V-MoE's
batch prioritized routing, Riquelme et al. 2021): the renormalised weight cannot serve, being the
constant 1 at top-1 and p1 / (p1 + p2) at top-2.

Shape legend: T tokens, D model width, E routed experts, K slots per token, G expert groups.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ROUTER_KINDS, MoEConfig
from ..kernels import as_dtype
from ..kernels.threads import compiled_row
from .losses import cv_squared, slot_counts
from .scope import LOCAL_SCOPE, count_once


@dataclass(frozen=True, init=False)
class Routing:
    """The router's decision for T tokens."""

    experts_TK: Tensor  # int64 expert id per slot; E marks an empty slot
    weights_TK: Tensor  # combine weight per slot (0 for an empty slot); differentiable
    logits_TE: Tensor  # router logits (z-loss); -inf for disabled experts
    probs: Union[Tensor, Callable[[], Tensor]]  # probs_TE, or a function computing it on first read
    losses: dict  # router-specific unweighted losses
    has_empty: bool  # True when some slots may be empty (static: decides masking downstream)
    capacity: Optional[int]  # per-expert capacity the router already enforces (expert choice)
    load_E: Optional[Tensor]  # noisy top-k: the smooth load estimate summed over tokens (for the load loss)
    scores_TK: Optional[
        Tensor
    ]  # router score of each slot's expert before renormalisation/scaling (0 if empty); None = weights_TK

    def __init__(
        self,
        experts_TK: Tensor,
        weights_TK: Tensor,
        logits_TE: Tensor,
        probs_TE: Union[Tensor, Callable[[], Tensor], None] = None,
        losses: Optional[dict] = None,
        has_empty: bool = False,
        capacity: Optional[int] = None,
        load_E: Optional[Tensor] = None,
        scores_TK: Optional[Tensor] = None,
        *,
        probs: Union[Tensor, Callable[[], Tensor], None] = None,
    ):
        """``probs_TE``: the routing distribution (T, E), or a zero-argument function returning it
        (``probs=`` is the same, the field's own name, as ``dataclasses.replace`` passes it)."""
        probs = probs_TE if probs_TE is not None else probs
        if probs is None:
            raise TypeError("Routing needs probs_TE: the (T, E) routing distribution or a function returning it")
        for name, value in (
            ("experts_TK", experts_TK),
            ("weights_TK", weights_TK),
            ("logits_TE", logits_TE),
            ("probs", probs),
            ("losses", {} if losses is None else losses),
            ("has_empty", has_empty),
            ("capacity", capacity),
            ("load_E", load_E),
            ("scores_TK", scores_TK),
        ):
            object.__setattr__(self, name, value)

    @property
    def probs_TE(self) -> Tensor:
        """Routing distribution per token (rows sum to 1), used by the balance losses and stats.
        A router may hand over a function instead, so that decoding, whose losses are never read,
        does not compute it."""
        if callable(self.probs):
            object.__setattr__(self, "probs", self.probs())
        assert isinstance(self.probs, Tensor)
        return self.probs

    @property
    def priority_scores_TK(self) -> Tensor:
        """What ``capacity_priority="score"`` ranks by: ``scores_TK``, or the weights for a router without scores."""
        return self.weights_TK if self.scores_TK is None else self.scores_TK


def _dtype(name: str, x: Tensor) -> torch.dtype:
    return x.dtype if name == "same" else getattr(torch, name)


def _sum_normalized(scores_TE: Tensor) -> Tensor:
    """Each row divided by its sum (the sigmoid router's routing distribution)."""
    return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)


def group_limited_mask(scores_TE: Tensor, num_groups: int, topk_groups: int, per_group: str = "top2") -> Tensor:
    """Boolean (T, E) mask of the experts in each token's ``topk_groups`` best expert groups
    (``num_groups`` equal, contiguous blocks of experts).

    Group-limited routing (DeepSeek-V2, 2024; DeepSeek-V3, 2024): an expert group's score is its
    best expert's score ("max") or the sum of its two best ("top2", V3).
    """
    T, E = scores_TE.shape
    scores_TGe = scores_TE.view(T, num_groups, E // num_groups)
    if per_group == "top2" and E // num_groups >= 2:
        expert_group_TG = scores_TGe.topk(2, dim=-1).values.sum(-1)
    else:
        expert_group_TG = scores_TGe.amax(-1)
    keep_TG = torch.zeros_like(expert_group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, expert_group_TG.topk(topk_groups, dim=-1).indices, True)
    return keep_TG.unsqueeze(-1).expand_as(scores_TGe).reshape(T, E)


def jitter(x_TD: Tensor, eps: float, scope=LOCAL_SCOPE) -> Tensor:
    """``x_TD`` times multiplicative noise drawn from U(1 - eps, 1 + eps) (Switch, Fedus et al. 2021),
    drawn through ``scope`` (under expert parallelism: for the global batch, so it equals one
    process's). One ``uniform_`` over a tensor shaped like ``x_TD``: the draws of transformers'
    Mixtral block for the same generator state. Applied by the router to its own input, or with
    ``router_jitter_experts`` by the layer to the input of router and experts alike."""
    return x_TD * scope.random_rows(lambda t: t.uniform_(1.0 - eps, 1.0 + eps), x_TD)


class Router(nn.Module):
    """Base class: a linear scorer ``logits_TE = x_TD @ W_ED^T`` plus expert masking.

    Subclasses implement :meth:`route`. ``disabled_E`` masks experts at inference (the remaining
    experts' weights renormalise over the rest).
    """

    learned = True
    count_between_graphs = False  # (set through MoE.count_between_graphs_: see scope.count_once)
    disabled_E: Tensor

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        if self.learned:
            self.linear = nn.Linear(cfg.dim, cfg.num_experts, bias=cfg.router_bias)
        self.register_buffer("disabled_E", torch.zeros(cfg.num_experts, dtype=torch.bool), persistent=False)
        self.num_disabled = 0  # a Python int, so the common no-mask path has no data-dependent branch
        self.scope = LOCAL_SCOPE  # where the layer's statistics are summed, set by each forward

    def logits(self, x_TD: Tensor) -> Tensor:
        dt = _dtype(self.cfg.router_dtype, x_TD)
        if self.training and self.cfg.router_jitter > 0 and not self.cfg.router_jitter_experts:
            x_TD = jitter(x_TD, self.cfg.router_jitter, self.scope)  # the router's input only (Switch)
        w, b = as_dtype(self.linear.weight, dt), self.linear.bias
        x_TD, bias = as_dtype(x_TD, dt), None if b is None else as_dtype(b, dt)
        logits_TE = compiled_row(x_TD, w, bias)
        if logits_TE is None:
            logits_TE = F.linear(x_TD, w, bias)
        return self._mask(logits_TE)

    def _mask(self, logits_TE: Tensor) -> Tensor:
        if self.num_disabled:
            logits_TE = logits_TE.masked_fill(self.disabled_E, float("-inf"))
        return logits_TE

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """No expert disabled (and, in subclasses, their own state as at construction)."""
        self.disabled_E.zero_()
        self.num_disabled = 0

    def set_disabled(self, mask_E: Tensor) -> None:
        """Mask experts out of routing (True = disabled)."""
        self.disabled_E.copy_(mask_E)
        self.num_disabled = int(mask_E.sum())

    def forward(self, x_TD: Tensor, top_k: int, token_ids_T: Optional[Tensor] = None, scope=None) -> Routing:
        """``scope``: the layer's :class:`~moekit.layer.scope.LocalScope` (or its expert-parallel
        replacement), whose ``gather_rows`` routers that choose over the whole batch use (expert choice)."""
        scope = scope or LOCAL_SCOPE
        if self.scope is not scope:  # nn.Module.__setattr__ costs microseconds a decode step feels
            self.scope = scope  # random draws of this call go through it (random_rows)
        if self.batch_dependent:
            return self.route(x_TD, top_k, token_ids_T, scope=self.scope)  # type: ignore[call-arg]  # batch-dependent routers take scope
        return self.route(x_TD, top_k, token_ids_T)

    batch_dependent = False  # True when a token's routing depends on the other tokens of the batch

    def _scaled(self, weights_TK: Tensor) -> Tensor:
        """The routed weights times ``routed_scaling_factor`` (DeepSeek-V3); no op launched at 1."""
        factor = self.cfg.routed_scaling_factor
        return weights_TK if factor == 1.0 else weights_TK * factor

    def route(self, x_TD: Tensor, top_k: int, token_ids_T: Optional[Tensor]) -> Routing:
        raise NotImplementedError

    def constant_weight(self, top_k: int) -> Optional[str]:
        """Why every combine weight is the same constant at this ``top_k`` (so the router gets no
        gradient from the layer's output, only from the auxiliary losses), with the way out; None
        when the weights depend on the router's scores. :class:`~moekit.MoE` warns at construction."""
        return None

    @torch.no_grad()
    def reset_rows(self, idx: Tensor, src: Optional[Tensor] = None) -> None:
        """Re-initialise (or copy from rows ``src``) the router rows of experts ``idx``."""
        if not self.learned:
            return
        if src is None:
            bound = 1.0 / math.sqrt(self.linear.in_features)
            self.linear.weight[idx] = torch.empty_like(self.linear.weight[idx]).uniform_(-bound, bound)
        else:
            self.linear.weight[idx] = self.linear.weight[src]
        if self.linear.bias is not None:
            self.linear.bias[idx] = 0.0 if src is None else self.linear.bias[src]


class TopKRouter(Router):
    """Token-choice top-k routing.

    ``renormalize=False``: softmax over all experts, then the top-k probabilities are the weights
    (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021). ``renormalize=True``: the top-k
    probabilities renormalised to sum to 1, i.e. top-k then softmax (Mixtral, Jiang et al. 2024).
    With k = 1 and no renormalisation this is Switch routing; with k = 1 and renormalisation the
    one weight is p / p = 1 and the router learns nothing from the output (the layer warns).
    """

    def constant_weight(self, top_k):
        if top_k == 1 and self.cfg.renormalize:
            return (
                "renormalize=True makes every weight p / p = 1; use renormalize=False (Switch routing: the weight "
                "is the softmax probability) or top_k >= 2"
            )
        return None

    def route(self, x_TD, top_k, token_ids_T=None):
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        sel_TE = probs_TE
        if self.cfg.num_groups is not None:
            assert self.cfg.topk_groups is not None  # MoEConfig sets both or neither
            sel_TE = probs_TE.masked_fill(
                ~group_limited_mask(probs_TE, self.cfg.num_groups, self.cfg.topk_groups, "max"), 0.0
            )
        experts_TK = sel_TE.topk(top_k, dim=-1).indices
        scores_TK = probs_TE.gather(1, experts_TK)
        weights_TK = scores_TK / scores_TK.sum(-1, keepdim=True) if self.cfg.renormalize else scores_TK
        return Routing(experts_TK, self._scaled(weights_TK), logits_TE, probs_TE, scores_TK=scores_TK)


class SwitchRouter(TopKRouter):
    """Switch routing (Fedus et al. 2021): top-1, weight = the expert's softmax probability."""

    def constant_weight(self, top_k):
        return None  # never renormalised

    def route(self, x_TD, top_k, token_ids_T=None):
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        scores_TK, experts_TK = probs_TE.topk(top_k, dim=-1)  # never renormalised: keeps the router's gradient
        return Routing(experts_TK, scores_TK * self.cfg.routed_scaling_factor, logits_TE, probs_TE, scores_TK=scores_TK)


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

    ``H = x W_g + N(0, 1) * softplus(x W_noise)`` in training (no noise in eval); the weights are
    softmax over the top-k of H. Adds the paper's smooth load estimator to ``losses["load"]``:
    P(x, i) = Phi((clean_i - kth_excluding_i(H)) / std_i), load_i = sum_x P(x, i), loss CV(load)^2.
    At k = 1 the one weight is the softmax of one value, 1: the gate learns only from the losses
    (the paper uses k >= 2; the layer warns).
    """

    def constant_weight(self, top_k):
        if top_k == 1:
            return (
                "the weight is the softmax over the one kept noisy logit, always 1; "
                "use top_k >= 2 (as Shazeer et al. 2017) or router='switch'"
            )
        return None

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.noise = nn.Linear(cfg.dim, cfg.num_experts, bias=False)
        nn.init.zeros_(self.noise.weight)  # the paper starts with no learned noise

    @torch.no_grad()
    def reset_rows(self, idx: Tensor, src: Optional[Tensor] = None) -> None:
        super().reset_rows(idx, src)
        self.noise.weight[idx] = 0.0 if src is None else self.noise.weight[src]

    def route(self, x_TD, top_k, token_ids_T=None):
        clean_TE = self.logits(x_TD)
        dt = clean_TE.dtype
        std_TE = F.softplus(F.linear(x_TD.to(dt), self.noise.weight.to(dt))) + self.cfg.noise_eps
        noisy_TE = (
            clean_TE + self.scope.random_rows(lambda t: t.normal_(), clean_TE) * std_TE if self.training else clean_TE
        )
        kp1 = min(top_k + 1, self.num_experts)
        top_TK1, experts_TK1 = noisy_TE.topk(kp1, dim=-1)
        experts_TK = experts_TK1[:, :top_k]
        weights_TK = top_TK1[:, :top_k].softmax(-1)
        probs_TE = noisy_TE.softmax(-1)
        scores_TK = probs_TE.gather(1, experts_TK)  # the (noisy) router probability, before KeepTopK's renormalisation
        losses, load_E = {}, None
        if kp1 > top_k:  # with k = E every expert is chosen: the load is not random
            in_topk_TE = noisy_TE >= top_TK1[:, top_k - 1 : top_k]
            thresh_TE = torch.where(in_topk_TE, top_TK1[:, top_k : top_k + 1], top_TK1[:, top_k - 1 : top_k])
            normal = torch.distributions.Normal(
                torch.zeros((), dtype=dt, device=x_TD.device), torch.ones((), dtype=dt, device=x_TD.device)
            )
            prob_TE = normal.cdf((clean_TE - thresh_TE) / std_TE)
            prob_TE = prob_TE.masked_fill(self.disabled_E, 0.0)
            load_E = prob_TE.sum(0)
            losses["load"] = cv_squared(load_E)
        return Routing(
            experts_TK, self._scaled(weights_TK), clean_TE, probs_TE, losses, load_E=load_E, scores_TK=scores_TK
        )


class RandomSecondRouter(Router):
    """GShard top-2 gating with random dispatch of the later experts (Lepikhin et al. 2020).

    The first expert always gets the token; each later expert k keeps it, in training, with
    probability min(1, K * w_k) where w are the top-k weights normalised to sum to 1 (for K = 2
    that is GShard's 2 * g2). An empty slot contributes nothing (weights are not renormalised).
    """

    def route(self, x_TD, top_k, token_ids_T=None):
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        scores_TK, experts_TK = probs_TE.topk(top_k, dim=-1)
        weights_TK = scores_TK / scores_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(scores_TK.dtype).tiny)
        if not self.training or self.cfg.second_expert_policy == "all" or top_k == 1:
            return Routing(experts_TK, self._scaled(weights_TK), logits_TE, probs_TE, scores_TK=scores_TK)
        keep_TK = self.scope.random_rows(lambda t: t.uniform_(), weights_TK) < (top_k * weights_TK.detach()).clamp(
            max=1.0
        )
        keep_TK[:, 0] = True
        experts_TK = experts_TK.masked_fill(~keep_TK, self.num_experts)
        weights_TK, scores_TK = weights_TK * keep_TK, scores_TK * keep_TK
        return Routing(experts_TK, self._scaled(weights_TK), logits_TE, probs_TE, has_empty=True, scores_TK=scores_TK)


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

    C = ceil(T * c / E) with c = ``capacity_factor`` (default: ``top_k``, the average number of
    experts per token). Scores are the softmax over experts; a token may get 0..E experts. The
    result uses K = E slots per token, slot e meaning expert e, empty where e did not pick it.
    Not causal: a token's routing depends on the other tokens in the batch. With a ``scope``
    spanning ranks (expert/data parallelism, :mod:`moekit.layer.scope`) the experts choose among
    all ranks' tokens, as one process would.
    """

    batch_dependent = True

    def route(self, x_TD, top_k, token_ids_T=None, scope=None):
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        factor = self.cfg.capacity_factor_for(self.training)
        if factor is None:
            factor = top_k
        all_TE, start = (scope or LOCAL_SCOPE).gather_rows(probs_TE.detach())
        T_all = all_TE.shape[0]
        C = min(T_all, max(1, math.ceil(T_all * factor / E)))
        chosen_EC = all_TE.t().topk(C, dim=-1).indices  # (E, C) token ids
        picked_TE = torch.zeros(T_all, E, dtype=torch.bool, device=x_TD.device)
        picked_TE.scatter_(0, chosen_EC.t(), True)
        picked_TE = picked_TE[start : start + T] & ~self.disabled_E
        arange_E = torch.arange(E, device=x_TD.device).expand(T, E)
        experts_TK = torch.where(picked_TE, arange_E, E)
        weights_TK = probs_TE * picked_TE
        return Routing(experts_TK, self._scaled(weights_TK), logits_TE, probs_TE, has_empty=True, capacity=C)


def _mix64(h: Tensor) -> Tensor:
    """A 64-bit integer mixer (after splitmix64's finaliser). int64 products wrap like uint64;
    the masks turn torch's arithmetic right shift into a logical one."""
    h = (h ^ ((h >> 33) & 0x7FFFFFFF)) * 0x62A9D9ED799705F5
    h = (h ^ ((h >> 28) & 0xFFFFFFFFF)) * 0x4BE98134A5976FD3
    return h ^ ((h >> 32) & 0xFFFFFFFF)


class HashRouter(Router):
    """Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

    A fixed hash of the token id picks the expert; nothing is learned. With K > 1 the token goes
    to K consecutive experts after its hash, each with weight 1/K. Needs ``token_ids``. It has no
    scores, so ``capacity_priority="score"`` keeps token order.
    """

    learned = False

    def route(self, x_TD, top_k, token_ids_T=None):
        if token_ids_T is None:
            raise ValueError(
                "router 'hash' needs token_ids: call moe(x, token_ids=ids) with ids shaped like x.shape[:-1]"
            )
        T, E = x_TD.shape[0], self.num_experts
        if token_ids_T.shape != (T,):
            raise ValueError(
                f"token_ids must have shape x.shape[:-1] ({T} tokens in all); got {tuple(token_ids_T.shape)} tokens"
            )
        if token_ids_T.dtype.is_floating_point or token_ids_T.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer tensor; got {token_ids_T.dtype}")
        h_T = _mix64(token_ids_T.to(torch.int64) + self.cfg.hash_seed * 0x632BE5AB)
        first_T = torch.remainder(h_T, E)
        experts_TK = torch.remainder(first_T[:, None] + torch.arange(top_k, device=x_TD.device), E)
        weights_TK = torch.full((T, top_k), 1.0 / top_k, device=x_TD.device, dtype=torch.float32)
        probs_TE = torch.zeros(T, E, device=x_TD.device).scatter_(1, experts_TK, 1.0 / top_k)
        logits_TE = torch.zeros(T, E, device=x_TD.device)
        return Routing(experts_TK, self._scaled(weights_TK), logits_TE, probs_TE)


class SigmoidRouter(Router):
    """Sigmoid scores with auxiliary-loss-free balancing (DeepSeek-V3, 2024).

    ``s = sigmoid(logits)``; experts are *selected* on ``s + b`` (optionally only inside each
    token's best expert groups); the weights are the selected ``s`` (renormalised, times the routed
    scaling factor), so the bias ``b`` never enters the gradient. After each training step
    :meth:`update_bias` moves ``b_i`` by ``rate * sign(mean_load - load_i)``. At k = 1 with
    ``renormalize=True`` the one weight is s / s = 1 and the router learns nothing from the output
    (the layer warns): use ``renormalize=False`` there (weight = s).
    """

    def constant_weight(self, top_k):
        if top_k == 1 and self.cfg.renormalize:
            return (
                "renormalize=True makes every weight s / s = 1; use renormalize=False (the weight is the sigmoid "
                "score s) or top_k >= 2"
            )
        return None

    bias_E: Tensor
    load_E: Tensor

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.register_buffer("bias_E", torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.register_buffer("load_E", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def reset_rows(self, idx: Tensor, src: Optional[Tensor] = None) -> None:
        super().reset_rows(idx, src)
        self.bias_E[idx] = 0.0 if src is None else self.bias_E[src]

    @torch.no_grad()
    def reset_buffers(self) -> None:
        super().reset_buffers()
        self.bias_E.zero_()
        self.load_E.zero_()

    def route(self, x_TD, top_k, token_ids_T=None):
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        sel_TE = (scores_TE.detach() if scores_TE.requires_grad else scores_TE) + as_dtype(self.bias_E, scores_TE.dtype)
        if self.cfg.num_groups is not None:
            assert self.cfg.topk_groups is not None  # MoEConfig sets both or neither
            sel_TE = sel_TE.masked_fill(
                ~group_limited_mask(sel_TE, self.cfg.num_groups, self.cfg.topk_groups, "top2"), float("-inf")
            )
        if self.num_disabled:
            sel_TE = sel_TE.masked_fill(self.disabled_E, float("-inf"))
        experts_TK = sel_TE.topk(top_k, dim=-1).indices
        scores_TK = scores_TE.gather(1, experts_TK)  # the sigmoid affinities: capacity priority ranks by these
        weights_TK = scores_TK / (scores_TK.sum(-1, keepdim=True) + 1e-20) if self.cfg.renormalize else scores_TK

        probs_TE = functools.partial(_sum_normalized, scores_TE)  # a partial, not a closure: picklable
        if self.training:  # (not again in a checkpointed forward's re-run)
            count_once(functools.partial(self._count_load, experts_TK), self.count_between_graphs)
        probs = probs_TE() if self.training else probs_TE  # in eval only losses and stats read it
        return Routing(experts_TK, self._scaled(weights_TK), logits_TE, probs, scores_TK=scores_TK)

    def _count_load(self, experts_TK: Tensor) -> None:
        self.load_E += slot_counts(experts_TK, self.num_experts).float()

    @torch.no_grad()
    def update_bias(self, load_E: Optional[Tensor] = None) -> None:
        """One aux-loss-free balancing step: ``b_i += rate * sign(mean_load - load_i)``.

        ``load_E`` defaults to the tokens per expert accumulated by training forwards since the
        last update (then reset), so gradient accumulation counts every micro-batch once. Call it
        once per optimizer step (moekit's trainer does, through :func:`moekit.layer.after_optimizer_step`).
        Under expert/data parallelism, all-reduce ``load_E`` first so every rank moves the same way.
        """
        if load_E is None:
            load_E = self.load_E.clone()
            self.load_E.zero_()
        load_E = load_E.float()
        enabled = ~self.disabled_E
        mean = load_E[enabled].mean() if enabled.any() else load_E.mean()
        self.bias_E += self.cfg.bias_update_rate * torch.sign(mean - load_E) * enabled


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str, cls: type[Router]) -> None:
    """Make ``MoEConfig(router=name)`` build ``cls``: a subclass of :class:`Router` implementing
    ``route`` (and ``constant_weight`` if its weights can be constant). Adding a router touches
    this call and its class only."""
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        raise TypeError(f"a router must be a subclass of moekit.layer.router.Router; got {cls!r}")
    ROUTERS[name] = cls
    if name not in ROUTER_KINDS:
        ROUTER_KINDS.append(name)


for _name, _cls in (
    ("topk", TopKRouter),
    ("noisy_topk", NoisyTopKRouter),
    ("switch", SwitchRouter),
    ("expert_choice", ExpertChoiceRouter),
    ("hash", HashRouter),
    ("random", RandomSecondRouter),
    ("sigmoid", SigmoidRouter),
):
    register_router(_name, _cls)


def build_router(cfg: MoEConfig) -> Router:
    return ROUTERS[cfg.router](cfg)
