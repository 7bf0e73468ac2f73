"""The MoE layer: router -> capacity -> dispatch -> experts -> combine (+ shared experts).

The sparse form of a Transformer feed-forward block (Shazeer et al. 2017; GShard, Lepikhin et
al. 2020; Switch, Fedus et al. 2021). Auxiliary losses and routing statistics are returned with
the output, never kept in globals; :class:`MoEFeedForward` is the drop-in module that returns
just the tensor and keeps them on the layer until :func:`aux_loss` collects them.

Shape legend: T tokens (all leading dims flattened), D model width, E routed experts,
K slots per token, R rows handed to the experts.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Optional, Union, cast

import torch
from torch import Tensor, nn

from .._graphs import eager
from ..config import MoEConfig, check_config_type, check_positive, check_router_top_k
from ..kernels import as_dtype, compute_dtype, resolve_backend
from . import losses as L
from . import surgery
from .dispatch import apply_capacity, expert_capacity
from .experts import FeedForward, GroupedExperts, ModuleListExperts, StackedExperts
from .losses import LOSS_WEIGHTS
from .paths import choose_path
from .router import Routing, SigmoidRouter, build_router, jitter
from .scope import LOCAL_SCOPE, LocalScope, _count_unless_recomputing, count_once, in_backward


@dataclasses.dataclass(init=False, repr=False, eq=False)
class MoEOutput:
    """What one MoE call returns.

    ``aux_loss``, ``losses`` and ``stats`` may be deferred: a layer in eval mode (not expert
    parallel) computes them on first access, so inference that never reads them (decoding)
    launches none of their ~50 small ops. Training computes them during the call. A dataclass
    so that FSDP2 finds its tensors (it hooks a module's outputs for the backward's all-gather
    and gradient reduction; an opaque object would leave a root layer's gradients unreduced).
    """

    __slots__ = ("out", "experts_TK", "weights_TK", "_aux_loss", "_losses", "_stats", "_pending")
    out: Tensor
    experts_TK: Optional[Tensor]
    weights_TK: Optional[Tensor]
    _aux_loss: Optional[Tensor]
    _losses: Optional[dict]
    _stats: Optional[dict]
    _pending: Optional[Callable]

    def __init__(
        self,
        out: Tensor,
        aux_loss: Optional[Tensor] = None,
        losses: Optional[dict] = None,
        stats: Optional[dict] = None,
        experts_TK: Optional[Tensor] = None,
        weights_TK: Optional[Tensor] = None,
        *,
        pending=None,
    ):
        self.out = out  # (..., D)
        self.experts_TK = experts_TK  # the slots' experts after capacity (E = empty), for analysis
        self.weights_TK = weights_TK  # their combine weights
        self._aux_loss, self._losses, self._stats = aux_loss, losses, stats
        self._pending = pending  # () -> (aux_loss, losses, stats), run once on first access

    def _resolve(self) -> None:
        if self._pending is not None:
            self._aux_loss, self._losses, self._stats = self._pending()
            self._pending = None

    @property
    def aux_loss(self) -> Tensor:
        """Scalar: the weighted sum of the enabled auxiliary losses."""
        self._resolve()
        return cast(Tensor, self._aux_loss)  # set by the constructor or by _pending

    @property
    def losses(self) -> dict:
        """Name -> unweighted scalar tensor."""
        self._resolve()
        return cast(dict, self._losses)

    @property
    def stats(self) -> dict:
        """tokens_per_expert (E,), dropped_fraction, router_entropy, expert_usage (E,), routed_per_expert (E,),
        mean_router_probs (E,) (differentiable)."""
        self._resolve()
        return cast(dict, self._stats)

    def __repr__(self) -> str:
        return f"MoEOutput(out={tuple(self.out.shape)}, deferred={self._pending is not None})"


_UNSET = object()
_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(cast(str, m.__file__))) + os.sep for m in (sys.modules["moekit"], torch)
)


def _user_stacklevel() -> int:
    """``stacklevel`` for a warning raised here that points at the first caller outside moekit and
    torch (the user's ``MoE(cfg)``, ``MoEFeedForward(cfg)`` or model constructor)."""
    frame: Optional[FrameType]
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class MoE(nn.Module):
    """A sparse Mixture-of-Experts feed-forward layer.

    Args:
        cfg: the layer's :class:`~moekit.MoEConfig`.
        experts: optional list of heterogeneous expert modules mapping (N, dim) -> (N, dim);
            replaces the stacked FFN experts (``cfg.num_experts`` must equal its length).

    Example::

        moe = MoE(MoEConfig(dim=512, hidden_dim=1024, num_experts=16, top_k=2))
        res = moe(torch.randn(4, 128, 512))
        loss = task_loss(res.out) + res.aux_loss
    """

    expert_usage: Tensor
    steps_unused: Tensor
    step_counts: Tensor

    count_between_graphs = False  # routing bookkeeping outside compiled graphs: count_between_graphs_

    def __init__(self, cfg: MoEConfig, experts: Optional[Sequence[nn.Module]] = None):
        super().__init__()
        check_config_type("MoE", MoEConfig, cfg)
        # the layer's own copy (router included): changing the caller's cfg later leaves this layer as built
        self.cfg = cfg = dataclasses.replace(cfg)
        if experts is not None:
            if len(experts) != cfg.num_experts:
                raise ValueError(f"got {len(experts)} experts but cfg.num_experts is {cfg.num_experts}")
            self.experts: nn.Module = ModuleListExperts(list(experts), cfg.dim)
        else:
            self.experts = GroupedExperts(cfg.num_experts, cfg.dim, cfg.hidden_dim, cfg.expert)
        self.router = build_router(cfg)
        self._warned_constant_k: Optional[int] = None  # the per-call top_k already warned about (once)
        self._warn_constant_weight(cfg.top_k)
        self.shared: Optional[FeedForward] = None
        self.shared_gate: Optional[nn.Linear] = None
        if cfg.num_shared_experts:
            width = cfg.num_shared_experts * (cfg.shared_hidden_dim or cfg.hidden_dim)
            self.shared = FeedForward(cfg.dim, width, cfg.expert)  # n shared experts == one FFN n times as wide
            if cfg.shared_expert_gate:
                self.shared_gate = nn.Linear(cfg.dim, 1, bias=False)
        E = cfg.num_experts
        self.register_buffer("expert_usage", torch.full((E,), 1.0 / E))  # running share of routed slots
        self.register_buffer("steps_unused", torch.zeros(E, dtype=torch.int64))  # optimizer steps since last token
        self.register_buffer("step_counts", torch.zeros(E, dtype=torch.int64), persistent=False)  # tokens this step
        # where routing statistics are summed: this process (the default), or every rank once
        # moekit.parallel.apply_expert_parallel has replaced it (it also hooks the experts' all-to-all)
        self.scope: LocalScope = LOCAL_SCOPE

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The routing bookkeeping as at construction (after ``to_empty`` of a meta-built layer)."""
        self.expert_usage.fill_(1.0 / self.expert_usage.numel())
        self.steps_unused.zero_()
        self.step_counts.zero_()
        self.router.reset_buffers()

    @property
    def num_experts(self) -> int:
        return self.cfg.num_experts

    def _warn_constant_weight(self, top_k: int, per_call: bool = False) -> bool:
        """Warn when every combine weight is a constant at ``top_k`` (the router then gets no
        gradient from the layer's output, only from the auxiliary losses): at construction for
        ``cfg.top_k``, and once per layer for a per-call override used in training. Returns whether it warned."""
        why = self.router.constant_weight(top_k)
        if why is None or self.cfg.num_experts == 1:  # one expert: nothing to route, nothing to learn
            return False
        when = " (this call's top_k override, in training)" if per_call else ""
        warnings.warn(
            f"moekit: router {self.cfg.router!r} with top_k={top_k}{when} gets no gradient from the layer's "
            f"output, only from the auxiliary losses: {why}",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )
        return True

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: Tensor, *, top_k: Optional[int] = None, token_ids: Optional[Tensor] = None, capacity_factor=_UNSET
    ) -> MoEOutput:
        """Route, compute and combine.

        Args:
            x: (..., dim) input.
            top_k: experts per token for this call (e.g. fewer at inference); default ``cfg.top_k``.
            token_ids: (...) integer ids, required by the hash router.
            capacity_factor: override the configured (train or eval) capacity factor for this call.

        Returns:
            :class:`MoEOutput` with ``out`` shaped like ``x``.
        """
        x_TD, lead = self._check_input(x)
        k, token_ids = self._check_top_k(top_k), self._check_token_ids(token_ids, lead)
        if k != self.cfg.top_k and k != self._warned_constant_k and self.training and torch.is_grad_enabled():
            if self._warn_constant_weight(k, per_call=True):
                self._warned_constant_k = k
        if x_TD.shape[0] == 0 and not self.scope.spans_ranks:  # else every rank must run the same collectives
            return self._empty_output(x, lead)
        factor = self._capacity_factor(capacity_factor)
        self.scope.begin_call(x_TD.shape[0], (k, self.training, torch.is_grad_enabled(), factor), x_TD.device)
        if self.training and self.cfg.router_jitter > 0 and self.cfg.router_jitter_experts:
            x_TD = jitter(x_TD, self.cfg.router_jitter, self.scope)  # Mixtral's form: router and experts see it
        routing = self.router(x_TD, k, token_ids, scope=self.scope)
        experts_TK, weights_TK, max_rows = self._apply_capacity(routing, factor)
        backend = self._backend(x_TD)
        path = choose_path(
            self.experts,
            backend,
            local=not self.scope.spans_ranks,
            capacity_limited=max_rows is not None,
            grad=torch.is_grad_enabled(),
            num_slots=experts_TK.numel(),
        )
        out_TD, kept_E = path(
            self.experts,
            x_TD,
            experts_TK,
            weights_TK,
            self._shared(x_TD),
            num_experts=self.cfg.num_experts,
            max_rows=max_rows,
            has_empty=routing.has_empty or max_rows is not None,
            backend=backend,
        )
        out = as_dtype(out_TD.reshape(*lead, self.cfg.dim), x.dtype)
        return self._output(out, routing, experts_TK, weights_TK, kept_E)

    def _backend(self, x_TD: Tensor) -> str:
        if not isinstance(self.experts, StackedExperts):
            return "loop"
        return resolve_backend(self.cfg.backend, x_TD.device, compute_dtype(x_TD))

    def _output(
        self, out: Tensor, routing: Routing, experts_TK: Tensor, weights_TK: Tensor, kept_E: Optional[Tensor]
    ) -> MoEOutput:
        """The output with its losses and stats: computed now in training or across ranks (usage
        bookkeeping and collectives happen in the call), else deferred until read."""
        cfg, training = self.cfg, self.training

        def losses_and_stats() -> tuple[Tensor, dict, dict]:
            counts_E = kept_E if kept_E is not None else L.slot_counts(experts_TK, cfg.num_experts)
            losses, stats = self._losses_and_stats(routing, counts_E, training)
            aux = out.new_zeros((), dtype=torch.float32)
            for name, value in losses.items():
                w = getattr(cfg, LOSS_WEIGHTS[name])
                if w:
                    aux = aux + w * value
            return aux, losses, stats

        if training or self.scope.spans_ranks:
            return MoEOutput(out, *losses_and_stats(), experts_TK, weights_TK)
        return MoEOutput(out, experts_TK=experts_TK, weights_TK=weights_TK, pending=losses_and_stats)

    def _check_token_ids(self, token_ids: Optional[Tensor], lead: torch.Size) -> Optional[Tensor]:
        if token_ids is None:
            return None
        if not isinstance(token_ids, Tensor):
            raise TypeError(f"token_ids must be a tensor; got {type(token_ids).__name__}")
        if tuple(token_ids.shape) != tuple(lead):
            raise ValueError(f"token_ids must have shape x.shape[:-1] = {tuple(lead)}; got {tuple(token_ids.shape)}")
        return token_ids.reshape(-1)

    def _shared(self, x_TD: Tensor) -> Optional[Tensor]:
        """The shared experts' output (DeepSeekMoE), gated per token (Qwen2-MoE); None without them."""
        if self.shared is None:
            return None
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
        return shared_TD

    def _apply_capacity(self, r: Routing, factor: Optional[float]) -> tuple[Tensor, Tensor, Optional[int]]:
        """(experts_TK, weights_TK, max_rows) after the capacity limit. Under expert/data parallelism
        the limit is decided on all ranks' slots together (the global batch, as one process would)."""
        E = self.cfg.num_experts
        if r.capacity is not None:  # expert choice enforces its own capacity
            return r.experts_TK, r.weights_TK, E * r.capacity
        if factor is None:
            return r.experts_TK, r.weights_TK, None
        g, T = self.scope, r.experts_TK.shape[0]
        by_score = self.cfg.capacity_priority == "score"
        # all ranks' rows (one process: its own); other ranks' rows are constants, the local rows keep their graph
        experts_TK, start = g.gather_rows(r.experts_TK)
        weights_TK, _ = g.gather_rows(r.weights_TK)
        probs_TE = g.gather_rows(r.probs_TE)[0] if self.cfg.overflow == "reroute" else None
        scores_TK = (
            g.gather_rows(r.priority_scores_TK.detach())[0] if by_score else None
        )  # router scores, not renormalised weights
        K = experts_TK.shape[1]
        C = expert_capacity(experts_TK.shape[0], K, E - self.router.num_disabled, factor, self.cfg.min_capacity)
        experts_TK, weights_TK = apply_capacity(
            experts_TK,
            weights_TK,
            C,
            E,
            probs_TE=probs_TE,
            overflow=self.cfg.overflow,
            priority=self.cfg.capacity_priority,
            scores_TK=scores_TK,
        )
        return experts_TK[start : start + T], weights_TK[start : start + T], E * C

    def _empty_output(self, x: Tensor, lead) -> MoEOutput:
        """A batch with no tokens: an empty output, zero losses (no NaN from averaging nothing)."""
        E = self.cfg.num_experts
        zero = x.new_zeros((), dtype=torch.float32)
        names = L.loss_names(self.router.learned, smooth_load=self.cfg.router == "noisy_topk")
        stats = {
            "tokens_per_expert": torch.zeros(E, dtype=torch.int64, device=x.device),
            "dropped_fraction": zero,
            "router_entropy": zero,
            "expert_usage": self.expert_usage.clone(),
        }
        return MoEOutput(x * 0, zero, {n: zero for n in names}, stats)  # x * 0 keeps x's graph for backward

    def _check_input(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"x must have last dimension dim={self.cfg.dim}; got shape {tuple(x.shape)}")
        if self.cfg.check_finite and not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf (check_finite=True)")
        return x.reshape(-1, self.cfg.dim), x.shape[:-1]

    def _check_top_k(self, top_k: Optional[int]) -> int:
        if top_k is None:
            top_k = self.cfg.top_k
        check_positive("top_k", top_k, integer=True)
        if self.cfg.router == "expert_choice":
            return top_k
        enabled = self.cfg.num_experts - self.router.num_disabled
        if top_k > enabled:
            raise ValueError(f"top_k must be <= the number of enabled experts ({enabled}); got {top_k}")
        check_router_top_k(self.cfg.router, top_k)
        return top_k

    def _capacity_factor(self, override) -> Optional[float]:
        if override is not _UNSET and self.cfg.router == "expert_choice":
            raise ValueError(
                "capacity_factor cannot be overridden per call for router 'expert_choice': its capacity "
                "comes from cfg.capacity_factor, or from top_k when that is None (pass top_k=...)"
            )
        if override is not _UNSET:
            check_positive("capacity_factor", override, allow_none=True)
            return override
        if self.cfg.router == "expert_choice":  # its router sizes the capacity (ExpertChoiceRouter)
            return None
        return self.cfg.capacity_factor_for(self.training)

    def count_between_graphs_(self, on: bool = True) -> MoE:
        """Run the routing bookkeeping (``expert_usage``, ``step_counts``, the sigmoid router's
        load) eagerly between compiled graphs: what a model under activation checkpointing needs,
        since a compiled graph's recomputation in the backward would count it again. The
        language model sets it with its ``activation_checkpointing``."""
        self.count_between_graphs = self.router.count_between_graphs = bool(on)
        if on:
            eager(_count_unless_recomputing)  # made now, outside any compiled code
        return self

    def _count_usage(self, kept_E: Tensor) -> None:
        """A training call's tokens per expert into ``expert_usage`` (a moving share) and ``step_counts``."""
        share_E = kept_E.float() / kept_E.sum().clamp_min(1).float()
        self.expert_usage.mul_(self.cfg.usage_decay).add_((1 - self.cfg.usage_decay) * share_E)
        self.step_counts.add_(kept_E)

    def _losses_and_stats(self, r: Routing, kept_E: Tensor, training: bool) -> tuple[dict, dict]:
        """Auxiliary losses and routing stats from sums over tokens; under expert/data parallelism
        the sums are all-reduced first, so both describe the global batch on every rank."""
        E, g = self.cfg.num_experts, self.scope
        wide = torch.promote_types(r.probs_TE.dtype, torch.float32)
        sums = {
            "probs": r.probs_TE.to(wide).sum(0),
            "importance": L.importance_E(r.experts_TK, r.weights_TK, E).to(wide),
            "entropy": L.entropy_per_token(r.probs_TE).sum().reshape(1).to(wide),
        }
        if self.router.learned:
            sums["z"] = L.z_per_token(r.logits_TE).sum().reshape(1).to(wide)
        if r.load_E is not None:
            sums["load"] = r.load_E.to(wide)
        counts = {
            "routed": L.slot_counts(r.experts_TK, E),
            "kept": kept_E,
            "tokens": torch.full((1,), r.experts_TK.shape[0], dtype=torch.int64, device=kept_E.device),
        }
        sums, counts = g.all_sum_dict(sums), g.all_sum_dict(counts)
        T = counts["tokens"].to(wide)[0].clamp_min(1)  # 0 only when every rank's batch is empty
        mean_probs_E = sums["probs"] / T
        losses = dict(r.losses)
        losses.update(
            {
                "balance": L.balance_from_stats(counts["routed"], mean_probs_E),
                "sq_load": L.sq_load_from_stats(mean_probs_E),
                "importance": L.cv_squared(sums["importance"]),
                "entropy": sums["entropy"][0] / T,
            }
        )
        if "z" in sums:
            losses["z"] = sums["z"][0] / T
        if "load" in sums:
            losses["load"] = L.cv_squared(sums["load"])
        kept = counts["kept"]
        if training:  # (not again in a checkpointed forward's re-run)
            count_once(functools.partial(self._count_usage, kept), self.count_between_graphs)
        with torch.no_grad():
            stats = {
                "tokens_per_expert": kept.detach(),
                "dropped_fraction": 1.0 - kept.sum().float() / counts["routed"].sum().clamp_min(1).float(),
                "router_entropy": losses["entropy"].detach(),
                "expert_usage": self.expert_usage.clone(),
            }
        # for a balance loss pooled over layers (LMConfig.balance_pooling="model"): routed slots and the
        # mean router probabilities of the (global) batch, the latter differentiable
        stats.update(routed_per_expert=counts["routed"], mean_router_probs=mean_probs_E)
        return losses, stats

    @torch.no_grad()
    def after_optimizer_step(self) -> list[int]:
        """Per-step bookkeeping, once per optimizer step (not per micro-batch): the sigmoid
        router's balancing bias, idle-step counts of enabled experts, and (with ``revive_after``)
        dead-expert revival, done here so parameters never change between forward and backward.
        Returns the revived experts."""
        self.update_router_bias()
        enabled = ~self.router.disabled_E
        idle = (self.step_counts == 0) & enabled
        self.steps_unused.copy_(torch.where(idle, self.steps_unused + 1, torch.zeros_like(self.steps_unused)))
        self.step_counts.zero_()
        if self.cfg.revive_after is not None:
            return self.revive_dead_experts(self.cfg.revive_after)
        return []

    def update_router_bias(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): move the sigmoid router's selection bias from the
        load seen since the last call. A no-op for other routers. Call once per optimizer step."""
        if isinstance(self.router, SigmoidRouter) and self.cfg.bias_update_rate > 0:
            self.router.load_E.copy_(
                self.scope.world_sum(self.router.load_E)
            )  # every rank moves its replicated bias alike
            self.router.update_bias()

    # ------------------------------------------------------------------ expert surgery (moekit.layer.surgery)
    def disable_experts(self, experts: Union[int, Sequence[int]]) -> None:
        """Mask experts out of routing: see :func:`moekit.layer.surgery.disable_experts`."""
        surgery.disable_experts(self, experts)

    def enable_experts(self, experts: Optional[Union[int, Sequence[int]]] = None) -> None:
        """Undo :meth:`disable_experts`: see :func:`moekit.layer.surgery.enable_experts`."""
        surgery.enable_experts(self, experts)

    def revive_dead_experts(self, min_unused_steps: int, noise: Optional[float] = None) -> list[int]:
        """Re-initialise dead experts: see :func:`moekit.layer.surgery.revive_dead_experts`."""
        return surgery.revive_dead_experts(self, min_unused_steps, noise)

    def add_experts(self, n: int, copy_from: Optional[Union[int, Sequence[int]]] = None, noise: float = 0.0) -> MoE:
        """Grow the layer by ``n`` experts: see :func:`moekit.layer.surgery.add_experts`."""
        return surgery.add_experts(self, n, copy_from, noise)

    @classmethod
    def from_dense(cls, ffn: FeedForward, cfg: MoEConfig, noise: float = 0.0) -> MoE:
        """Sparse upcycling of a dense FFN: see :func:`moekit.layer.surgery.upcycle`."""
        return surgery.upcycle(ffn, cfg, noise, build=cls)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"dim={c.dim}, hidden_dim={c.hidden_dim}, experts={c.num_experts}, top_k={c.top_k}, "
            f"router={c.router!r}, backend={c.backend!r}"
        )


def after_optimizer_step(model: nn.Module) -> dict:
    """Call :meth:`MoE.after_optimizer_step` on every MoE layer of ``model``; returns
    {layer name: revived experts} for the layers that revived any."""
    revived = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            r = m.after_optimizer_step()
            if r:
                revived[name] = r
    return revived


class _Call:
    """One MoEFeedForward call whose auxiliary loss has not been collected yet."""

    __slots__ = ("output", "trainable", "_reached")

    def __init__(self, output: MoEOutput, trainable: bool):
        self.output = output
        self.trainable = trainable  # made in training mode with autograd: its loss may still be backpropagated
        # set by a hook on output.out when a backward pass reaches it. The hook holds this list, not
        # the call: a hook holding the call would close a cycle (call -> output -> out -> hook ->
        # call) through autograd's C++ side, which Python's garbage collector cannot see, and every
        # call's output would live forever
        self._reached = [False]

    @property
    def backpropagated(self) -> bool:
        return self._reached[0]

    def watch_backward(self) -> None:
        """Mark the call when a backward pass goes through its output."""
        self.output.out.register_hook(functools.partial(_set_reached, self._reached))


def _set_reached(reached: list, grad: Tensor) -> None:
    reached[0] = True


class MoEFeedForward(nn.Module):
    """The drop-in form of :class:`MoE`: ``forward(x)`` returns the output tensor, shaped like ``x``,
    as a Transformer feed-forward block does (Shazeer et al. 2017; Switch, Fedus et al. 2021), so it
    fits ``nn.Sequential`` or any block that computes ``x + self.ffn(x)``.

    The auxiliary losses and statistics the MoE returns with its output are kept aside:
    ``last`` is the :class:`MoEOutput` of the most recent call (``last.aux_loss``, ``last.losses``,
    ``last.stats``), and :func:`aux_loss` collects the weighted auxiliary loss of every call since
    the previous collection, in every such layer of a model, to be added to the training loss::

        ffn = MoEFeedForward(MoEConfig(dim=512, hidden_dim=1024))
        model = nn.Sequential(nn.Linear(64, 512), ffn, nn.Linear(512, 10))
        loss = F.cross_entropy(model(x), y) + moekit.aux_loss(model)
        loss.backward()

    What is kept until collected: every call's loss (a layer used twice in a forward counts twice,
    two forwards before one backward count both), except that at the layer's next call it forgets
    the calls whose loss can no longer be trained on: those a backward pass has already gone
    through, and those made in eval mode or without autograd (of these only the last is kept, for
    reading). So a loop that never collects, or an evaluation loop, does not pile up graphs. Two
    bounds hold whatever the loop does: with every loss weight 0 (the loss is a constant 0) no call
    is kept, only ``last``; and at most ``max_uncollected`` (128) calls are kept: beyond that the
    layer warns once and forgets the oldest (forwards in training mode that are never
    backpropagated nor collected, e.g. under ``torch.compile``, which does not report backward
    passes to the layer).
    Re-runs of the forward inside a backward pass (non-reentrant activation checkpointing) are not
    new calls; reentrant checkpointing runs the forward without autograd, so its loss would carry
    no gradient: use ``use_reentrant=False``. The kept outputs are left out of ``copy.deepcopy``
    and pickling.

    Args:
        cfg: the layer's :class:`~moekit.MoEConfig`, or an already built :class:`MoE` to wrap
            (e.g. ``MoE.from_dense(ffn, cfg)``).
        experts: heterogeneous expert modules, as for :class:`MoE` (only with a config).
    """

    max_uncollected = 128  # calls kept for aux_loss at most; beyond, the oldest are forgotten (with a warning)

    def __init__(self, cfg: Union[MoEConfig, MoE], experts: Optional[Sequence[nn.Module]] = None):
        super().__init__()
        if isinstance(cfg, MoE):
            if experts is not None:
                raise ValueError("experts cannot be given with an already built MoE: pass them to MoE(cfg, experts)")
            self.moe = cfg
        elif isinstance(cfg, MoEConfig):
            self.moe = MoE(cfg, experts)
        else:
            raise TypeError(f"cfg must be a MoEConfig or a MoE; got {type(cfg).__name__}")
        self.last: Optional[MoEOutput] = None
        self._uncollected: list[_Call] = []
        self._warned_uncollected = False

    @property
    def cfg(self) -> MoEConfig:
        return self.moe.cfg

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        """Args:
            x: (..., dim) input.
            **kwargs: ``top_k``, ``token_ids``, ``capacity_factor``, as for :meth:`MoE.forward`.

        Returns:
            (..., dim) output; the call's :class:`MoEOutput` is in ``self.last``.
        """
        res = self.moe(x, **kwargs)
        if in_backward():
            return res.out
        self.last = res
        if not any(getattr(self.cfg, w) for w in LOSS_WEIGHTS.values()):  # the aux loss is a constant 0
            self._uncollected = []
            return res.out
        self._uncollected = [c for c in self._uncollected if c.trainable and not c.backpropagated]
        call = _Call(res, self.training and res.out.requires_grad)
        if call.trainable and not torch.compiler.is_compiling():
            call.watch_backward()
        self._uncollected.append(call)
        if len(self._uncollected) > self.max_uncollected:
            self._forget_oldest()
        return res.out

    def _forget_oldest(self) -> None:
        """Keep the newest ``max_uncollected`` calls; warn the first time."""
        if not getattr(self, "_warned_uncollected", False):  # (a layer unpickled from an older moekit lacks it)
            self._warned_uncollected = True
            warnings.warn(
                f"moekit: a MoEFeedForward layer holds the auxiliary losses of {self.max_uncollected} calls "
                "that were neither collected with moekit.aux_loss(model) nor backpropagated; it now forgets the "
                "oldest. Collect them after each forward, or set every loss weight to 0 if you do not train on them",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )
        del self._uncollected[: len(self._uncollected) - self.max_uncollected]

    def pop_aux_loss(self) -> Optional[Tensor]:
        """The summed aux loss of this layer's calls since the last collection (None if none), forgotten here."""
        calls, self._uncollected = self._uncollected, []
        total = None
        for c in calls:
            total = c.output.aux_loss if total is None else total + c.output.aux_loss
        return total

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["last"], state["_uncollected"] = None, []  # outputs hold autograd graphs and closures
        return state


def aux_loss(model: nn.Module) -> Tensor:
    """Collect the auxiliary losses of the :class:`MoEFeedForward` layers in ``model``.

    Returns the sum of ``aux_loss`` (the weighted balance / z / ... losses, see :class:`MoEOutput`)
    over every call of every such layer since the previous collection, and forgets them: a second
    collection without a new forward returns 0, so nothing is counted twice. Call it once per
    forward, before backward, and add it to the loss. A model without such layers gives 0.

    Returns:
        scalar float32 tensor (on the model's device).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    total = None
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            part = m.pop_aux_loss()
            if part is not None:
                total = part if total is None else total + part.to(total.device)
    if total is None:
        ref = next(model.parameters(), None)
        total = torch.zeros((), dtype=torch.float32, device=None if ref is None else ref.device)
    return total
