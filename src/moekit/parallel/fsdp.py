"""FSDP2 over an expert-parallel model: the experts sharded over the ranks that replicate them,
the rest over all ranks, every gradient reduced with a sum, explicit prefetch block to block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..layer.moe import MoE


def _expert_shard_dim(dp: int):
    """FSDP's placement for a stacked expert weight over ``dp`` ranks: its expert dimension when
    every rank gets a whole number of this EP rank's experts, else its first feature dimension
    (dim 0 would leave some DP ranks with no expert at all and others with all of them, weights,
    gradients and AdamW moments alike, as torchtitan notes)."""
    from torch.distributed.tensor import Shard

    def placement(p: Tensor):
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.dim() < 2 or local.shape[0] % dp == 0:
            return Shard(0)
        return Shard(1) if local.shape[1] % dp == 0 else None

    return placement


def _fully_shard(
    model: nn.Module,
    mesh,
    world,
    moes: list[MoE],
    param_dtype: Optional[torch.dtype],
    tp_groups: Sequence[list[nn.Module]] = (),
    tp_mesh=None,
) -> None:
    """FSDP2 (``fully_shard``, ZeRO-3): each MoE layer's experts over the ranks that replicate
    them (mesh ``dp``), then each transformer block and the rest over all ranks, as torchtitan
    composes EP with FSDP. Every gradient is reduced with a plain sum (a divide factor of 1, and
    sum-type collectives, which gloo has: torch's default for a factor would be NCCL's
    PREMUL_SUM): the ranks' loss terms are already divided by the global token count
    (:meth:`ExpertParallel.loss`). Tensor-parallel maps (``tp_groups``, DTensors on
    ``tp_mesh["tp"]``) are sharded over ``tp_mesh["fsdp"]``, the ranks holding the same shards
    (FSDP2's 2-D layout), before their blocks."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None else None
    kw: dict[str, Any] = {"mp_policy": mp} if mp is not None else {}
    dp = mesh["dp"].size()
    sharded: list[Any] = []  # FSDPModule subclasses of the modules' own classes
    for moe in moes:
        sharded.append(fully_shard(moe.experts, mesh=mesh["dp"], shard_placement_fn=_expert_shard_dim(dp), **kw))
    for group in tp_groups:  # one FSDP unit each (a list's modules share it)
        fully_shard(group if len(group) > 1 else group[0], mesh=tp_mesh["fsdp"], **kw)
        sharded.extend(group)
    for block in getattr(model, "blocks", []):
        sharded.append(fully_shard(block, mesh=world, **kw))
    sharded.append(fully_shard(model, mesh=world, **kw))
    for m in sharded:
        assert isinstance(m, FSDPModule)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    # explicit prefetch (torchtitan's): each block's all-gather is issued by the block before it
    # (in backward: after it), so an MoE layer's host sync for its split sizes does not hold back
    # the next block's parameters
    blocks = [b for b in getattr(model, "blocks", []) if isinstance(b, FSDPModule)]
    for before, after in zip(blocks, blocks[1:]):
        before.set_modules_to_forward_prefetch([after])
        after.set_modules_to_backward_prefetch([before])
