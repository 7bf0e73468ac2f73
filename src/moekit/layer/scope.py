"""Where a layer's routing statistics are summed: over this process's tokens, or (set by
:func:`moekit.parallel.apply_expert_parallel`) over the tokens of every rank.

The layer calls these operations unconditionally; on one process they do nothing, so the math
modules never test for parallel state. Whatever must be global under expert/data parallelism
(balance losses and stats, the capacity limit, expert choice's selection, the sigmoid router's
bias) goes through this one small object.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._graphs import eager


class LocalScope:
    """The statistics of this process's tokens alone (the default of every layer)."""

    spans_ranks = False  # True when the operations below communicate (their results are then global)

    def begin_call(self, num_tokens: int, settings: tuple, device: torch.device) -> None:
        """Called once at the start of each layer call with this rank's token count and the
        call's settings (top_k, train/eval, grad mode, capacity factor): across ranks, a clear
        error when the settings differ (the ranks would run different collectives and hang), and
        the token counts for :meth:`random_rows`. Nothing to do on one process."""

    def random_rows(self, draw: Callable[[Tensor], Tensor], like_TX: Tensor) -> Tensor:
        """Random values for this rank's rows, ``draw(empty tensor) -> filled tensor``: across
        ranks drawn for the whole global batch and sliced, so they equal one process's."""
        return draw(torch.empty_like(like_TX))

    def gather_rows(self, t: Tensor) -> tuple[Tensor, int]:
        """Every rank's rows in rank order and where this rank's start (here: ``t``, 0)."""
        return t, 0

    def all_sum(self, v: Tensor) -> Tensor:
        """``v`` summed over the ranks whose statistics are pooled (differentiable)."""
        return v

    def all_sum_dict(self, sums: dict) -> dict:
        """:meth:`all_sum` of each tensor of a dict (one collective for all)."""
        return sums

    def world_sum(self, v: Tensor) -> Tensor:
        """``v`` summed over all ranks (for replicated state every rank must update alike)."""
        return v


LOCAL_SCOPE = LocalScope()


def count_once(update: Callable[[], None], between_graphs: bool = False) -> None:
    """Run a training forward's bookkeeping (routing counts into buffers) unless this forward is
    activation checkpointing's re-run inside the backward. ``between_graphs`` (a model under
    activation checkpointing, :meth:`moekit.MoE.count_between_graphs_`): run it eagerly between
    compiled graphs, since a compiled graph holds its buffer updates unconditionally and its
    recomputation would count them again (measured: ``expert_usage`` counted twice). Otherwise a
    compiled graph keeps the update (no graph break: ``fullgraph=True`` stays possible)."""
    if between_graphs:
        eager(_count_unless_recomputing)(update)
    else:
        _count_unless_recomputing(update)


def _count_unless_recomputing(update: Callable[[], None]) -> None:
    if not in_backward():
        with torch.no_grad():
            update()


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread: activation checkpointing then
    re-runs forwards, which are not new calls (no bookkeeping is counted twice). False while
    torch.compile traces (the query is not traceable; a compiled region's re-run is compiled too)."""
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1
