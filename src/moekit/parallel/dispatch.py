"""The expert-parallel all-to-all (GShard, Lepikhin et al. 2020) as module hooks on a layer's
experts: each routed row goes to the rank holding its expert and comes back combined.

Shape legend: T local tokens, D width, E experts, P EP ranks, El = E / P experts per rank,
R rows of the local dispatch plan, N rows received by this rank's experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .collectives import run_collective


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends the row gradients back the same way."""

    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        run_collective(
            "expert-parallel all-to-all",
            dist.all_to_all_single,
            out,
            x_ND.contiguous(),
            out_splits,
            in_splits,
            group=group,
        )
        return out

    @staticmethod
    def backward(ctx, g_ND):
        out_splits, in_splits = ctx.splits
        gx = g_ND.new_empty((sum(in_splits), *g_ND.shape[1:]))
        run_collective(
            "expert-parallel all-to-all (backward)",
            dist.all_to_all_single,
            gx,
            g_ND.contiguous(),
            in_splits,
            out_splits,
            group=ctx.group,
        )
        return gx, None, None, None


@dataclass(frozen=True)
class _Handle:
    """What the experts' forward hook needs from the matching pre-hook."""

    x_ND: Tensor  # the rows this rank's experts received (in local-expert order)
    inverse_N: Tensor  # row of the received order for each row in local-expert order
    send: list  # rows sent to each EP rank
    recv: list  # rows received from each EP rank
    n_send: int
    R: int  # rows the layer handed to the experts (sum(counts_E) of them real)


class ExpertAllToAll:
    """Expert parallelism as module hooks on a layer's experts (GShard's all-to-all dispatch).

    The layer calls its experts as ``experts(x_RD, counts_E, backend)`` with the rows in global
    expert order. The pre-hook sends each expert's rows to the rank holding it (one uneven
    all-to-all after exchanging the counts) and hands the experts the rows of their El local
    experts, grouped by expert; the forward hook sends the results back the same way, so the layer
    gets ``y_RD`` in its own order. The layer's code is the single-process code."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.P = dist.get_world_size(group)
        self.El = num_experts // self.P
        self._pending: Optional[_Handle] = None  # set by the pre-hook, taken by the forward hook of the same call

    def attach(self, experts: nn.Module) -> None:
        experts.register_forward_pre_hook(self._before)
        experts.register_forward_hook(self._after, always_call=True)

    @torch.compiler.disable  # host-read split sizes and collectives: eager, between compiled graphs
    def _before(self, module: nn.Module, args: tuple) -> tuple:
        x_RD, counts_E, *rest = args
        self._pending = None  # a call that raised before its forward hook ran leaves nothing behind
        x_ND, counts_El, handle = self.dispatch(x_RD, counts_E)
        self._pending = handle
        return (x_ND, counts_El, *rest)

    @torch.compiler.disable  # host-read split sizes and collectives: eager, between compiled graphs
    def _after(self, module: nn.Module, args: tuple, y_ND: Optional[Tensor]) -> Optional[Tensor]:
        """The combine of this call's rows; also run (``always_call``) when the experts or a later
        pre-hook raised, with ``y_ND`` None: then it only drops the call's handle (the received rows
        and their graph), and the error goes on to the caller."""
        h, self._pending = self._pending, None
        if y_ND is None:
            return None
        if h is None:
            raise RuntimeError("expert-parallel experts: the forward hook ran without its pre-hook's dispatch")
        return self.combine(y_ND, h, module)

    def dispatch(self, x_RD: Tensor, counts_E: Tensor) -> tuple[Tensor, Tensor, _Handle]:
        """(rows of this rank's experts in local-expert order, rows per local expert, handle)."""
        P, El = self.P, self.El
        recv_PL = torch.empty_like(counts_E)
        run_collective("expert-parallel count exchange", dist.all_to_all_single, recv_PL, counts_E, group=self.group)
        host = torch.cat([counts_E.view(P, El).sum(1), recv_PL]).tolist()  # one host sync: split sizes
        send, recv_host = host[:P], host[P:]
        recv = [sum(recv_host[p * El : (p + 1) * El]) for p in range(P)]
        n_send, N = sum(send), sum(recv)
        x_ND = _AllToAll.apply(x_RD[:n_send], recv, send, self.group)  # rows by (source rank, local expert)
        # reorder to (local expert, source rank) so each expert's rows are contiguous
        C_PL = recv_PL.view(P, El)
        lens_LP = C_PL.t().reshape(-1)
        src_start_LP = (C_PL.reshape(-1).cumsum(0) - C_PL.reshape(-1)).view(P, El).t().reshape(-1)
        dst_start_LP = lens_LP.cumsum(0) - lens_LP
        perm_N = torch.repeat_interleave(src_start_LP - dst_start_LP, lens_LP, output_size=N)
        perm_N = perm_N + torch.arange(N, device=perm_N.device)
        inverse_N = torch.empty_like(perm_N).scatter_(0, perm_N, torch.arange(N, device=perm_N.device))
        x_ND = x_ND[perm_N]
        return x_ND, C_PL.sum(0), _Handle(x_ND, inverse_N, send, recv, n_send, x_RD.shape[0])

    def combine(self, y_ND: Tensor, h: _Handle, experts: nn.Module) -> Tensor:
        """The experts' rows back on the ranks that sent them, in the layer's row order."""
        if torch.is_grad_enabled():
            # Every rank must run the same collectives in backward. A rank whose experts got no
            # rows may get an output with no graph (or none back to the received rows or to the
            # weights); tie it to both, and make it require grad, so its backward all-to-alls run
            # like everyone else's and FSDP's reduction over the expert's replicas gets (zero)
            # gradients from it too.
            if y_ND.shape[0] == 0:
                held = [p.to_local() if isinstance(p, DTensor) else p for p in experts.parameters() if p.requires_grad]
                ties = ([h.x_ND] if h.x_ND.requires_grad else []) + held
                if ties:
                    y_ND = y_ND + sum(t.sum() for t in ties) * 0
            if not y_ND.requires_grad:
                y_ND = y_ND.detach().requires_grad_()
        y_back = _AllToAll.apply(y_ND[h.inverse_N], h.send, h.recv, self.group)
        return F.pad(y_back, (0, 0, 0, h.R - h.n_send)) if h.R > h.n_send else y_back
