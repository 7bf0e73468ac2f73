"""Expert surgery on a built :class:`~moekit.MoE` layer: disable and re-enable experts, revive
dead ones, add experts, and upcycle a dense FFN into a MoE layer. Each operation changes the
layer in place (``add_experts`` replaces its parameters: build the optimizer afterwards).

Shape legend: E routed experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor

from ..config import MoEConfig, check_positive
from .experts import FeedForward, GroupedExperts
from .router import build_router

if TYPE_CHECKING:  # the layer imports this module
    from .moe import MoE


def _require_grouped(moe: MoE, what: str) -> GroupedExperts:
    if moe.scope.spans_ranks:
        raise ValueError(
            f"{what} is not supported on an expert-parallel layer (each rank holds only some experts): "
            "change the single-process model, then apply expert parallelism again"
        )
    if not isinstance(moe.experts, GroupedExperts):
        raise TypeError(f"{what} needs the stacked FFN experts, not a heterogeneous expert list")
    return moe.experts


def _expert_ids(moe: MoE, ids: Union[int, Sequence[int], Tensor], name: str = "experts") -> list[int]:
    ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < moe.cfg.num_experts]
    if bad:
        raise ValueError(f"{name} must be expert indices in [0, {moe.cfg.num_experts}); got {bad}")
    return ids


def disable_experts(moe: MoE, experts: Union[int, Sequence[int]]) -> None:
    """Mask experts out of routing (inference fault tolerance): the router's choice and
    weights renormalise over the remaining experts."""
    ids = _expert_ids(moe, experts)
    mask = moe.router.disabled_E.clone()
    mask[ids] = True
    if int(mask.sum()) >= moe.cfg.num_experts:
        raise ValueError("cannot disable every expert")
    moe.router.set_disabled(mask)


def enable_experts(moe: MoE, experts: Optional[Union[int, Sequence[int]]] = None) -> None:
    """Undo :func:`disable_experts` (all experts when ``experts`` is None)."""
    ids = list(range(moe.cfg.num_experts)) if experts is None else _expert_ids(moe, experts)
    mask = moe.router.disabled_E.clone()
    mask[ids] = False
    moe.router.set_disabled(mask)
    moe.steps_unused[ids] = 0  # idle while disabled is not dead


@torch.no_grad()
def revive_dead_experts(moe: MoE, min_unused_steps: int, noise: Optional[float] = None) -> list[int]:
    """Re-initialise every expert that got no token for ``min_unused_steps`` training steps from
    a copy of the most used live expert plus noise, and reset its router row. Returns the
    revived experts."""
    if moe.scope.spans_ranks:
        _require_grouped(moe, "revive_dead_experts")  # raises: a sharded layer cannot copy across ranks
    dead = (moe.steps_unused >= min_unused_steps) & ~moe.router.disabled_E
    live = ~dead & ~moe.router.disabled_E
    if not bool(dead.any()) or not bool(live.any()):
        return []
    experts = _require_grouped(moe, "revive_dead_experts")
    dead_ids = dead.nonzero().flatten()
    src = int(moe.expert_usage.masked_fill(~live, -1).argmax())
    experts.copy_expert_(dead_ids, torch.full_like(dead_ids, src), moe.cfg.revive_noise if noise is None else noise)
    moe.router.reset_rows(dead_ids)
    moe.steps_unused[dead_ids] = 0
    moe.expert_usage[dead_ids] = 1.0 / moe.cfg.num_experts
    return dead_ids.tolist()


@torch.no_grad()
def add_experts(moe: MoE, n: int, copy_from: Optional[Union[int, Sequence[int]]] = None, noise: float = 0.0) -> MoE:
    """Grow the layer by ``n`` experts: fresh ones, or copies of ``copy_from`` (one index, or
    one per new expert) with their router rows copied. Parameters are replaced, so build
    the optimizer afterwards."""
    check_positive("n", n, integer=True)
    experts = _require_grouped(moe, "add_experts")
    old_E, new_E = moe.cfg.num_experts, moe.cfg.num_experts + n
    src = None
    if copy_from is not None:
        src = _expert_ids(moe, copy_from, "copy_from")
        src = src * n if len(src) == 1 else src
        if len(src) != n:
            raise ValueError(f"copy_from must name one expert or one per new expert ({n}); got {len(src)}")
    new_ids = torch.arange(old_E, new_E)
    moe.experts = experts.resized(new_E)
    if src is not None:
        moe.experts.copy_expert_(new_ids, torch.tensor(src), noise)
    _grow_router(moe, n, new_ids, src)
    moe.expert_usage = torch.cat([moe.expert_usage, moe.expert_usage.new_full((n,), 1.0 / new_E)])
    moe.steps_unused = torch.cat([moe.steps_unused, moe.steps_unused.new_zeros(n)])
    moe.step_counts = torch.cat([moe.step_counts, moe.step_counts.new_zeros(n)])
    return moe


def _grow_router(moe: MoE, n: int, new_ids: Tensor, src: Optional[list[int]]) -> None:
    """A router for ``n`` more experts: the old rows kept, the new ones fresh or copied from ``src``."""
    old_router, old_E = moe.router, moe.cfg.num_experts
    ref = next(iter(old_router.parameters()), moe.expert_usage)
    moe.cfg = dataclasses.replace(moe.cfg, num_experts=old_E + n)
    moe.router = build_router(moe.cfg).to(device=ref.device, dtype=ref.dtype)
    sd = old_router.state_dict()
    for name, t in moe.router.state_dict().items():
        if name in sd:
            t[:old_E] = sd[name]
    moe.router.set_disabled(torch.cat([old_router.disabled_E, old_router.disabled_E.new_zeros(n)]))
    if src is not None:
        moe.router.reset_rows(new_ids, torch.tensor(src))
    moe.router.train(old_router.training)


def upcycle(ffn: FeedForward, cfg: MoEConfig, noise: float, build: Callable[[MoEConfig], MoE]) -> MoE:
    """Sparse upcycling (Komatsuzaki et al. 2022): a layer ``build(cfg)`` whose experts all start
    as copies of a trained dense FFN (plus relative Gaussian ``noise``); the router is fresh.
    ``cfg`` must match the FFN's width and kind."""
    if not isinstance(ffn, FeedForward):
        raise TypeError(f"ffn must be a moekit FeedForward; got {type(ffn).__name__}")
    if (ffn.dim, ffn.hidden_dim, ffn.kind) != (cfg.dim, cfg.hidden_dim, cfg.expert):
        raise ValueError(
            f"cfg (dim={cfg.dim}, hidden_dim={cfg.hidden_dim}, expert={cfg.expert!r}) must match the dense FFN "
            f"(dim={ffn.dim}, hidden_dim={ffn.hidden_dim}, kind={ffn.kind!r})"
        )
    moe = build(cfg).to(ffn.w_up.device, ffn.w_up.dtype)
    assert isinstance(moe.experts, GroupedExperts)  # built from cfg alone: the stacked FFN experts
    with torch.no_grad():
        for mine, theirs in ((moe.experts.w_up, ffn.fused_up), (moe.experts.w_down, ffn.w_down)):
            mine.copy_(theirs.expand_as(mine))
            if noise:
                mine.add_(noise * theirs.std() * torch.randn_like(mine))
    return moe
