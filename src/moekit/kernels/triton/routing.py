"""Routing metadata on the device: a stable counting sort of the (token, k) slots by expert.

``routing_plan`` builds the same :class:`moekit.kernels.plan.DispatchPlan` as
``plan_dispatch`` (``argsort(stable=True)``, ``slot_counts``, the inverse permutation) in one to
three launches instead of several torch ops: at decode sizes each launch costs more than its
work. As in the fused MoE kernels of ScatterMoE (Tan et al. 2024) and SonicMoE (2025), nothing
waits for the host: grids and block sizes depend only on (T, K, E) and nothing is read back
(with ``validate=False``), so the launches can be captured in a CUDA graph.

* S <= ``FUSED_MAX_S`` (decode): one program, one launch. For each chunk of experts it
  one-hot compares the slots against the chunk's ids; the column sums are the counts, their
  running prefix the experts' first rows, and the cumulative sum down each column the rank of a
  slot among the earlier slots of its expert. Row of a slot = first row of its expert + rank.
* Larger S: ``_count_kernel`` writes each block's per-expert counts into an expert-major table,
  whose flat inclusive ``cumsum`` is then, at (e, b), the end of block b's rows of expert e
  (experts before e and earlier blocks of e come first: exactly the stable order);
  ``_place_kernel`` ranks each block's slots as above from that table. Three launches (the
  cumsum is torch's).

Empty slots (id E) are sorted last like any other id and not counted. Ids outside [0, E] are
rejected by ``routing_plan`` (``validate=True``); unvalidated, the kernels treat them as empty
slots, so no store ever lands outside the outputs.

Shape legend: T tokens, K slots per token, S = T*K slots, E experts (E + 1 ids with the empty
id), R = min(S, max_rows) rows handed to the experts, B slot blocks of BLOCK_S, C = E_CHUNK ids
per one-hot tile.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..plan import DispatchPlan
from .gemm import INTERPRETED

# Up to this many slots one program sorts everything (T = 128 tokens at K = 8); beyond it, blocks
# of BLOCK_S slots. TILE bounds a one-hot tile's BLOCK_S * E_CHUNK entries (E_CHUNK >= 16).
# Untuned guesses: the kernels have run only under TRITON_INTERPRET=1 and been compiled for sm_90.
FUSED_MAX_S = 1024
BLOCK_S = 256
TILE = 8192


@triton.jit
def _block_ids(experts_ptr, pid, S, E, BLOCK_S: tl.constexpr):
    """Slot numbers, in-range mask and int32 ids of block ``pid``; ids outside [0, E] become E,
    lanes past S become -1 (they match no id)."""
    slots = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    in_S = slots < S
    raw = tl.load(experts_ptr + slots, mask=in_S, other=0)
    ids = tl.where((raw >= 0) & (raw <= E), raw, E).to(tl.int32)  # compare before narrowing
    return slots, in_S, tl.where(in_S, ids, -1)


@triton.jit
def _count_kernel(experts_ptr, table_ptr, S, E, num_blocks, BLOCK_S: tl.constexpr, E_CHUNK: tl.constexpr):
    """``table[e, b]`` = slots of block b with id e, for e in [0, E]."""
    pid = tl.program_id(0)
    _, _, ids = _block_ids(experts_ptr, pid, S, E, BLOCK_S)
    for c in range(0, E + 1, E_CHUNK):
        cols = c + tl.arange(0, E_CHUNK)
        hit = (ids[:, None] == cols[None, :]).to(tl.int32)
        tl.store(table_ptr + cols * num_blocks + pid, tl.sum(hit, axis=0), mask=cols <= E)


@triton.jit
def _place_kernel(
    experts_ptr,
    ends_ptr,
    order_ptr,
    inverse_ptr,
    counts_ptr,
    S,
    E,
    R,
    num_blocks,
    FUSED: tl.constexpr,
    WRITE_INVERSE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    E_CHUNK: tl.constexpr,
):
    """``order[row] = slot``, ``inverse[slot] = row`` for block ``pid``'s slots, and ``counts``
    (written by the last program). FUSED: a single program that finds the experts' rows itself;
    otherwise ``ends[e, b]`` is the inclusive prefix of the count table."""
    pid = tl.program_id(0)
    slots, in_S, ids = _block_ids(experts_ptr, pid, S, E, BLOCK_S)
    row_S = tl.zeros((BLOCK_S,), dtype=tl.int32)
    done = 0  # rows of the ids before this chunk (FUSED)
    for c in range(0, E + 1, E_CHUNK):
        cols = c + tl.arange(0, E_CHUNK)
        hit_SC = ids[:, None] == cols[None, :]
        hit_i_SC = hit_SC.to(tl.int32)
        rank_SC = tl.cumsum(hit_i_SC, axis=0) - 1  # earlier slots of the same id in this block
        own_C = tl.sum(hit_i_SC, axis=0)
        if FUSED:
            ends_C = done + tl.cumsum(own_C, axis=0)
            done += tl.sum(own_C, axis=0)
            tl.store(counts_ptr + cols, own_C.to(tl.int64), mask=cols < E)
        else:
            ends_C = tl.load(ends_ptr + cols * num_blocks + pid, mask=cols <= E, other=0)
            if pid == num_blocks - 1:
                # ends_C holds the rows of all ids <= e; those of ids <= e - 1 end at flat (e-1)*B + B-1
                ends_prev_C = tl.load(ends_ptr + cols * num_blocks - 1, mask=(cols >= 1) & (cols < E), other=0)
                tl.store(counts_ptr + cols, (ends_C - ends_prev_C).to(tl.int64), mask=cols < E)
        first_C = ends_C - own_C  # this block's first row of each id
        row_S += tl.sum(tl.where(hit_SC, first_C[None, :] + rank_SC, 0), axis=1)
    tl.store(order_ptr + row_S, slots.to(tl.int64), mask=in_S & (row_S < R))
    if WRITE_INVERSE:
        tl.store(inverse_ptr + slots, row_S.to(tl.int64), mask=in_S)


def _e_chunk(block_s: int, num_ids: int) -> int:
    return max(16, min(triton.next_power_of_2(num_ids), TILE // block_s))


def _num_warps(block_s: int, e_chunk: int) -> int:
    # ptxas for sm_90: the 1024 x 16 tile spills registers at 4 warps, not at 8
    return 8 if block_s * e_chunk > TILE else 4


def routing_plan(
    experts_TK: Tensor,
    num_experts: int,
    *,
    max_rows: Optional[int] = None,
    has_empty: bool = False,
    validate: bool = True,
    block_s: Optional[int] = None,
) -> DispatchPlan:
    """``plan_dispatch`` on the device with Triton kernels: the same plan, exactly.

    Args:
        experts_TK: (T, K) int32/int64 expert id of each slot; id ``num_experts`` = empty slot.
        num_experts: E.
        max_rows: static bound on the rows handed to the experts (E*C under a capacity C).
        has_empty: whether empty slots can occur (recorded in the plan, as ``plan_dispatch`` does).
        validate: check that every id is in [0, E]. This reads a flag back to the host, a
            synchronisation on CUDA that CUDA-graph capture does not allow: pass ``False`` on
            the hot path (unchecked out-of-range ids are then treated as empty slots).
        block_s: slots per program of the multi-block path (a power of two); ``None``: one
            program up to ``FUSED_MAX_S`` slots, else ``BLOCK_S``. For tests.

    Returns:
        DispatchPlan with ``order_R`` (R,) int64, ``counts_E`` (E,) int64, ``inverse_S`` (S,)
        int64 when R == S else None.
    """
    experts_S, R = _checked_slots(experts_TK, num_experts, max_rows, block_s, validate)
    T, K = experts_TK.shape
    S, E, dev = T * K, num_experts, experts_TK.device
    i64 = torch.int64
    order_R = torch.empty(R, dtype=i64, device=dev)
    counts_E = torch.empty(E, dtype=i64, device=dev)
    inverse_S = torch.empty(S, dtype=i64, device=dev) if R == S else None
    if S == 0:
        counts_E.zero_()
    else:
        _launch_plan(experts_S, order_R, counts_E, inverse_S, E, R, block_s)
    return DispatchPlan(order_R, counts_E, inverse_S, T, K, has_empty or R < S)


def _checked_slots(
    experts_TK: Tensor, num_experts: int, max_rows: Optional[int], block_s: Optional[int], validate: bool
) -> tuple[Tensor, int]:
    """(the slots' expert ids as one contiguous (S,) tensor, the rows R of the plan), after
    checking every argument of :func:`routing_plan`."""
    if (
        not isinstance(experts_TK, Tensor)
        or experts_TK.dim() != 2
        or experts_TK.dtype not in (torch.int32, torch.int64)
    ):
        what = (
            f"{tuple(experts_TK.shape)} {experts_TK.dtype}"
            if isinstance(experts_TK, Tensor)
            else type(experts_TK).__name__
        )
        raise ValueError(f"experts_TK must be a 2-D int32/int64 tensor (T, K); got {what}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1; got {num_experts!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
        raise ValueError(f"max_rows must be None or an int >= 0; got {max_rows!r}")
    if block_s is not None and (not isinstance(block_s, int) or block_s < 16 or block_s & (block_s - 1)):
        raise ValueError(f"block_s must be a power of two >= 16; got {block_s!r}")
    dev = experts_TK.device
    if dev.type != "cuda" and not INTERPRETED:
        raise ValueError(f"moekit's Triton kernels need a CUDA device (or TRITON_INTERPRET=1); experts_TK is on {dev}")
    T, K = experts_TK.shape
    S, E = T * K, num_experts
    if S >= 2**31:
        raise ValueError(f"experts_TK has {S} slots; the kernels count rows in int32 (at most 2**31 - 1)")
    R = S if max_rows is None else min(S, max_rows)
    experts_S = experts_TK.reshape(-1).contiguous()
    if validate and S and not bool(((experts_S >= 0) & (experts_S <= E)).all()):
        bad = experts_S[(experts_S < 0) | (experts_S > E)]
        raise ValueError(f"experts_TK ids must lie in [0, num_experts={E}] (E = empty slot); found {bad[:5].tolist()}")

    return experts_S, R


def _launch_plan(
    experts_S: Tensor,
    order_R: Tensor,
    counts_E: Tensor,
    inverse_S: Optional[Tensor],
    E: int,
    R: int,
    block_s: Optional[int],
) -> None:
    """The counting sort on the device: one fused program up to ``FUSED_MAX_S`` slots, else a
    count kernel per block, a prefix sum, and a place kernel per block."""
    S, dev = experts_S.numel(), experts_S.device
    fused = block_s is None and S <= FUSED_MAX_S
    bs = max(16, triton.next_power_of_2(S)) if fused else (block_s or BLOCK_S)
    chunk = _e_chunk(bs, E + 1)
    B = triton.cdiv(S, bs)
    warps = _num_warps(bs, chunk)
    inv = inverse_S if inverse_S is not None else order_R  # a placeholder pointer, never written
    if fused:
        ends = counts_E  # unused
    else:
        table = torch.empty(E + 1, B, dtype=torch.int32, device=dev)
        _count_kernel[(B,)](experts_S, table, S, E, B, BLOCK_S=bs, E_CHUNK=chunk, num_warps=warps)
        ends = table.view(-1).cumsum(0, dtype=torch.int32)
    _place_kernel[(B,)](
        experts_S,
        ends,
        order_R,
        inv,
        counts_E,
        S,
        E,
        R,
        B,
        FUSED=fused,
        WRITE_INVERSE=inverse_S is not None,
        BLOCK_S=bs,
        E_CHUNK=chunk,
        num_warps=warps,
    )
