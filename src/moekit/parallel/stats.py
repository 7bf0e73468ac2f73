"""What one MoE layer sees of the ranks it runs on (its :class:`~moekit.layer.scope.LocalScope`
replacement): the per-call check, the routing statistics summed over a group of ranks (with their
sum's exact adjoint), the rows gathered for global capacity decisions, and the global draws."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..layer.scope import LocalScope
from .collectives import run_collective


def _summed(t: Tensor, what: str, group=None) -> Tensor:
    """A copy of ``t`` summed over the ranks of ``group`` (all ranks when None)."""
    out = t.clone()
    run_collective(what, dist.all_reduce, out, group=group)
    return out


class _AllSum(torch.autograd.Function):
    """All-reduce (sum) of a statistic that every rank of the group then uses the same way.

    The exact adjoint is an all-reduce of the group's gradients; since they are identical on every
    rank (each holds 1/world of the objective: :meth:`ExpertParallel.aux_share`) it equals
    ``grad * group_size``, computed without communicating."""

    @staticmethod
    def forward(ctx, v, group, size):
        ctx.size = size
        return _summed(v, "all-reduce of routing statistics", group)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.size, None, None


class _LayerScope(LocalScope):
    """What one MoE layer sees of the parallel layout (``MoE.scope``): the statistics group's row
    gather and differentiable sums, and a sum over all ranks."""

    spans_ranks = True

    def __init__(self, stats_group, stats_size: int, group, world_size: int):
        """``group``: every rank of the model's mesh (``world_size`` of them), the scope of the call
        check, the global draws and :meth:`world_sum`: not the default group, so a model on part
        of the ranks (a pipeline stage, an evaluation on some) talks to its own ranks only."""
        self.stats_group, self.stats_size = stats_group, stats_size
        self.group, self.world_size = group, world_size
        self._rows: list[int] = []  # tokens of each rank in the current call (mesh order)
        self._rows_of: dict[int, int] = {}  # the same, by global rank

    @torch.compiler.disable  # collectives and host reads: eager, between compiled graphs
    def begin_call(self, num_tokens: int, settings: tuple, device: torch.device) -> None:
        """One small all-gather over all ranks per layer call: every rank's token count (for the
        random draws) and settings, compared before any other collective can hang on a mismatch."""
        code = [num_tokens] + [-1 if v is None else int(round(float(v) * 1e6)) for v in settings]
        mine = torch.tensor(code, dtype=torch.int64, device=device)  # on the input's device: NCCL needs CUDA tensors
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        run_collective("layer-call check", dist.all_gather, every, mine, group=self.group)
        codes = torch.stack(every).tolist()  # the call's one read to the host (a sync on a GPU)
        rows = [c[0] for c in codes]
        if any(c[1:] != code[1:] for c in codes):
            names = ("top_k", "training", "grad enabled", "capacity factor x1e6 (-1: none)")
            table = "; ".join(
                f"rank {r}: " + ", ".join(f"{n}={v}" for n, v in zip(names, c[1:])) for r, c in enumerate(codes)
            )
            raise ValueError(
                f"an expert-parallel MoE layer was called differently on different ranks ({table}): "
                f"every rank must call the model alike (same top_k, train/eval mode, grad mode, "
                f"capacity factor)"
            )
        self._rows = rows
        self._rows_of = dict(zip(dist.get_process_group_ranks(self.group), rows))  # by global rank

    @torch.compiler.disable  # collectives and host reads: eager, between compiled graphs
    def random_rows(self, draw, like_TX: Tensor) -> Tensor:
        """Random values drawn for the global batch (every rank draws the same), this rank's rows
        kept: routing noise then equals one process's on the concatenated batch."""
        if self.world_size == 1 or not self._rows:
            return draw(torch.empty_like(like_TX))
        start = sum(self._rows[: dist.get_rank(self.group)])
        full = draw(like_TX.new_empty((sum(self._rows), *like_TX.shape[1:])))
        return full[start : start + like_TX.shape[0]]

    @torch.compiler.disable  # collectives and host reads: eager, between compiled graphs
    def gather_rows(self, t: Tensor) -> tuple[Tensor, int]:
        """All ranks' rows (one per token of the call) in rank order and where the local ones
        start. The local rows are ``t`` itself (they keep their graph); the others are constants.
        Each rank's row count is its token count, which the call check already brought to the
        host: no count gather and no second read."""
        if self.stats_size == 1:
            return t, 0
        g, W = self.stats_group, self.stats_size
        if self._rows_of:
            sizes = [self._rows_of[r] for r in dist.get_process_group_ranks(g)]
        else:  # called outside a layer call (no call check): gather the counts
            n = torch.tensor([t.shape[0]], device=t.device)
            parts: list = [torch.empty_like(n) for _ in range(W)]
            run_collective("row-count gather", dist.all_gather, parts, n, group=g)
            sizes = torch.cat(parts).tolist()
        pad = max(sizes) - t.shape[0]
        mine = F.pad(t.detach(), (0, 0) * (t.dim() - 1) + (0, pad)) if pad else t.detach().contiguous()
        parts = [torch.empty_like(mine) for _ in range(W)]
        run_collective("routing gather", dist.all_gather, parts, mine, group=g)
        me = dist.get_rank(g)
        rows = [t if i == me else parts[i][: sizes[i]] for i in range(W)]
        return torch.cat(rows), sum(sizes[:me])

    @torch.compiler.disable  # collectives and host reads: eager, between compiled graphs
    def all_sum(self, v: Tensor) -> Tensor:
        if self.stats_size == 1:
            return v
        if v.requires_grad:
            return _AllSum.apply(v, self.stats_group, self.stats_size)
        return _summed(v, "all-reduce of routing statistics", self.stats_group)

    @torch.compiler.disable  # collectives and host reads: eager, between compiled graphs
    def world_sum(self, v: Tensor) -> Tensor:
        """Sum over all ranks (not differentiable): for replicated state, which every rank must
        update alike whatever the statistics group."""
        return _summed(v, "all-reduce over all ranks", self.group) if self.world_size > 1 else v.clone()

    def all_sum_dict(self, sums: dict) -> dict:
        """One all-reduce for a dict of same-dtype tensors."""
        keys = list(sums)
        flat = self.all_sum(torch.cat([sums[k].reshape(-1) for k in keys]))
        return dict(zip(keys, flat.split([sums[k].numel() for k in keys])))
