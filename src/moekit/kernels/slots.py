"""The few-slot inference path: only the chosen experts' weights are read, with no sort, no
dispatch plan and no gather of the token rows into expert order (the way gpt-fast's Mixtral
decodes). Used for decoding, where a call routes a handful of slots and the grouped path's
fixed cost (sort, plan, per-expert loop over all E groups, combine) dominates.

Three forms with one contract, ``out_TD = sum_k weights_TK[t, k] * ffn_{experts_TK[t, k]}(x_t)``
(slots whose expert id is E, i.e. empty, add nothing):

* eager on the CPU: one small matmul pair per expert that was chosen, on its tokens, after one
  read of the (host-resident) expert ids: the fewest ops, so the least framework overhead;
* under ``torch.compile`` on the CPU: a gather-multiply-reduce that inductor fuses into loops
  reading the chosen weights in place;
* elsewhere (CUDA): the chosen weights gathered and two batched matmuls, with no host sync, so
  decoding stays capturable in a CUDA graph.

Forward only: the layer takes this path when autograd is off. Shape legend: T tokens, K slots per
token, D model width, H up-projection width (2F when gated), F expert width, E experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from .threads import split_sum

SMALL_SLOTS = 64  # at most this many routed slots per call take this path (measured: benchmarks/RESULTS.md)
# CPU eager, T > 1: every expert on every token in two batched matmuls (E/K times the FLOPs, ~10 ops)
# beats one matmul pair per chosen expert (~10 ops each) while all experts' weights are at most T x
# this many bytes. Measured at 1 thread (D, F, E) = (128,128,16), (128,128,64), (256,128,32),
# (512,256,16), T = 2..16: the crossover sat at 2.5-4 MiB per token; see benchmarks/RESULTS.md.
ALL_EXPERTS_BYTES_PER_TOKEN = 3 * 2**20


def slot_ffn(
    x_TD: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    w_up_EDH: Tensor,
    w_down_EFD: Tensor,
    act: Callable[[Tensor], Tensor],
    into_TD: Optional[Tensor] = None,
    views: Optional[tuple[Sequence[Tensor], Sequence[Tensor]]] = None,
    stack_bytes: Optional[int] = None,
) -> Tensor:
    """The routed experts' output for a few tokens, reading only the chosen experts' weights,
    added to ``into_TD`` (in place, when given: e.g. the shared experts' output). ``views``:
    ``(w_up_EDH[e] for e, w_down_EFD[e] for e)`` made beforehand, so eager decoding indexes no weights.
    ``stack_bytes``: the bytes of the whole expert stack these weights stand for (an expert store's
    slots hold a few of them), so the form is the one the whole stack would get: the same sums."""
    if x_TD.device.type == "cpu" and not torch.compiler.is_compiling():
        out_TD = into_TD if into_TD is not None else x_TD.new_zeros(x_TD.shape[0], w_down_EFD.shape[-1])
        expert_bytes = stack_bytes or (w_up_EDH.numel() + w_down_EFD.numel()) * w_up_EDH.element_size()
        if x_TD.shape[0] > 1 and expert_bytes <= x_TD.shape[0] * ALL_EXPERTS_BYTES_PER_TOKEN:
            return out_TD.add_(_all_experts(x_TD, experts_TK, weights_TK, w_up_EDH, w_down_EFD, act))
        ups, downs = views if views is not None else (w_up_EDH, w_down_EFD)
        return _host_loop(x_TD, experts_TK, weights_TK, ups, downs, act, out_TD)
    form = (
        _reduce_form if x_TD.device.type == "cpu" else _gathered_bmm
    )  # compiled, the fused reduce wins at T = 1..8 too
    y_TD = form(x_TD, experts_TK, weights_TK, w_up_EDH, w_down_EFD, act)
    return y_TD if into_TD is None else into_TD + y_TD


def _valid(experts_TK: Tensor, weights_TK: Tensor, E: int) -> tuple[Tensor, Tensor]:
    """Expert ids clamped into range and weights zeroed where the slot is empty (id E)."""
    empty_TK = experts_TK >= E
    return experts_TK.clamp(max=E - 1), weights_TK.masked_fill(empty_TK, 0)


def _host_loop(x_TD, experts_TK, weights_TK, w_up_EDH, w_down_EFD, act, out_TD: Tensor) -> Tensor:
    """``w_up_EDH`` / ``w_down_EFD``: the stacked weights, or sequences of each expert's."""
    E, T = len(w_up_EDH), x_TD.shape[0]
    ids = experts_TK.tolist()
    slots: dict[int, list[tuple[int, int]]] = {}
    for t, row in enumerate(ids):
        for k, e in enumerate(row):
            if e < E:
                slots.setdefault(e, []).append((t, k))
    if T == 1:  # decode at batch 1: no row gather or scatter; the down projection accumulates in place
        w_K = weights_TK[0].tolist()
        jobs = [(e, sum(w_K[k] for _, k in tk)) for e, tk in slots.items()]

        def run(job: tuple[int, float], acc_TD: Tensor) -> None:
            acc_TD.addmm_(act(x_TD @ w_up_EDH[job[0]]), w_down_EFD[job[0]], alpha=job[1])

        return split_sum(jobs, run, out_TD)
    w_TK = weights_TK.to(x_TD.dtype)
    for e, tk in slots.items():
        t_idx = torch.tensor([t for t, _ in tk], device=x_TD.device)
        k_idx = torch.tensor([k for _, k in tk], device=x_TD.device)
        y_ND = act(x_TD[t_idx] @ w_up_EDH[e]) @ w_down_EFD[e]
        out_TD.index_add_(0, t_idx, y_ND * w_TK[t_idx, k_idx].unsqueeze(-1))
    return out_TD


def _all_experts(x_TD, experts_TK, weights_TK, w_up_EDH, w_down_EFD, act) -> Tensor:
    """Every expert on every token, each output weighted by the token's routing weight for that
    expert (0 where not chosen): few, large ops, for small T and small experts."""
    E, T = w_up_EDH.shape[0], x_TD.shape[0]
    w_TE = x_TD.new_zeros(T, E + 1).scatter_add_(1, experts_TK, weights_TK.to(x_TD.dtype))[:, :E]  # id E: empty slot
    a_ETF = act(torch.matmul(x_TD, w_up_EDH)) * w_TE.t().unsqueeze(-1)
    return torch.bmm(a_ETF, w_down_EFD).sum(0)


def _reduce_form(x_TD, experts_TK, weights_TK, w_up_EDH, w_down_EFD, act) -> Tensor:
    ids_TK, w_TK = _valid(experts_TK, weights_TK, w_up_EDH.shape[0])
    h_TKH = (x_TD[:, None, :, None] * w_up_EDH[ids_TK]).sum(2)
    a_TKF = act(h_TKH) * w_TK.to(h_TKH.dtype)[..., None]
    return (a_TKF[..., None] * w_down_EFD[ids_TK]).sum((1, 2))


def _gathered_bmm(x_TD, experts_TK, weights_TK, w_up_EDH, w_down_EFD, act) -> Tensor:
    T, K = experts_TK.shape
    ids_S, w_TK = _valid(experts_TK, weights_TK, w_up_EDH.shape[0])
    ids_S = ids_S.reshape(-1)
    x_S1D = x_TD.repeat_interleave(K, dim=0).unsqueeze(1)
    y_S1D = torch.bmm(act(torch.bmm(x_S1D, w_up_EDH[ids_S])), w_down_EFD[ids_S])
    return torch.bmm(w_TK.to(y_S1D.dtype).unsqueeze(1), y_S1D.view(T, K, -1)).squeeze(1)
