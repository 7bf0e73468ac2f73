"""Grouped GEMM kernels over rows sorted by expert, with fused gathers, scatters and epilogues.

Row-tiled kernels (one program per (row tile, column tile); the tile table of
:mod:`.schedule` says which expert and rows a tile owns, spare tiles return at once):

* ``_up_kernel``: ``pre = x[src] @ w_up[e]``, ``h = act(pre)`` in the epilogue (gated kinds
  keep one accumulator for the gate columns and one for the up columns). ``src`` is the row
  itself, or ``token_idx_R[row]`` when the gather is fused into the A loads.
* ``_mm_kernel``: ``out[dst] = scale[row] * (a[src] @ b[e])`` with ``b`` read through strides
  (so ``w_up[e]^T`` needs no copy), an optional row scale and an optional output scatter.
  Forward down projection and the input gradient.
* ``_down_bwd_kernel``: ``dh = g[dst] @ w_down[e]^T`` and, in the epilogue, the row scale's
  gradient partials ``sum(dh * h)``, the scale, and the activation backward from the saved
  pre-activation; it also recomputes ``h`` for the down projection's weight gradient, so the
  forward caches neither ``h`` nor ``y``.

Per-expert kernel (one program per (expert, P tile, Q tile), looping over the expert's rows):

* ``_wgrad_kernel``: ``dW[e] = a[rows_e]^T @ (scale * b[rows_e])`` with optional gathers on
  either operand: ``dW_up`` from ``(x[src], d_pre)``, ``dW_down`` from ``(h, g[dst])``.

Accumulation is fp32 (fp64 for fp64 inputs); outputs are rounded to the inputs' dtype. The
pre-activation is rounded to that dtype before the activation, as the reference computes it.

Shape legend: T source rows (tokens), R rows in expert order, S output rows of a scatter,
D model width, F expert width, H = F or 2F, E experts, N tiles, P x Q a weight-gradient tile.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .activations import act_bwd, act_fwd
from .schedule import TileTable


@triton.jit
def _row_index(idx_ptr, rows, mask, USE: tl.constexpr):
    """int64 row numbers: ``idx[rows]`` when a gather/scatter index is in use, else ``rows``."""
    if USE:
        return tl.load(idx_ptr + rows, mask=mask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _tile_rows(tile_expert_ptr, tile_start_ptr, tile_end_ptr, pid_t, BLOCK_M: tl.constexpr):
    """The expert (int64), rows and row mask of row tile ``pid_t``, and whether it is a spare
    tile past the real tile count (its program returns at once)."""
    row_lo = tl.load(tile_start_ptr + pid_t)
    row_hi = tl.load(tile_end_ptr + pid_t)
    e = tl.load(tile_expert_ptr + pid_t).to(tl.int64)
    rows_M = row_lo + tl.arange(0, BLOCK_M)
    return e, rows_M, rows_M < row_hi, row_lo >= row_hi


@triton.jit
def _rows_dot(
    acc,
    a_ptr,
    src_M,
    mask_M,
    stride_am,
    stride_ak,
    b_base,
    stride_bk,
    stride_bn,
    cols_N,
    mask_N,
    K,
    PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc + a[src_M, :K] @ b[:K, cols_N]`` in BLOCK_K steps; masked rows and columns read as 0."""
    for k0 in range(0, K, BLOCK_K):
        ks_K = k0 + tl.arange(0, BLOCK_K)
        mask_K = ks_K < K
        a = tl.load(
            a_ptr + src_M[:, None] * stride_am + ks_K[None, :] * stride_ak,
            mask=mask_M[:, None] & mask_K[None, :],
            other=0.0,
        )
        b = tl.load(
            b_base + ks_K[:, None] * stride_bk + cols_N[None, :] * stride_bn,
            mask=mask_K[:, None] & mask_N[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc=acc, input_precision=PRECISION)
    return acc


@triton.jit
def _up_kernel(
    x_ptr,
    idx_ptr,
    w_ptr,
    pre_ptr,
    h_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    D,
    F,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_pm,
    stride_pn,
    stride_hm,
    stride_hn,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    GATHER: tl.constexpr,
    STORE_PRE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The down projection's backward for one (tile of rows, block of F columns): d_pre, and
    optionally the recomputed activation h and the routing-weight gradient ds. One GPU program,
    kept whole on purpose: splitting it into device functions would only move its ~60 lines."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, rows_M, mask_M, spare = _tile_rows(tile_expert_ptr, tile_start_ptr, tile_end_ptr, pid_t, BLOCK_M)
    if spare:
        return
    src_M = _row_index(idx_ptr, rows_M, mask_M, GATHER)
    cols_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_N = cols_N < F
    w_base = w_ptr + e * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        ks_K = k0 + tl.arange(0, BLOCK_K)
        mask_K = ks_K < D
        a = tl.load(
            x_ptr + src_M[:, None] * stride_xm + ks_K[None, :] * stride_xk,
            mask=mask_M[:, None] & mask_K[None, :],
            other=0.0,
        )
        b_mask = mask_K[:, None] & mask_N[None, :]
        b = tl.load(w_base + ks_K[:, None] * stride_wk + cols_N[None, :] * stride_wn, mask=b_mask, other=0.0)
        acc_gate = tl.dot(a, b, acc=acc_gate, input_precision=PRECISION)
        if GATED:
            b_up = tl.load(
                w_base + ks_K[:, None] * stride_wk + (cols_N + F)[None, :] * stride_wn, mask=b_mask, other=0.0
            )
            acc_up = tl.dot(a, b_up, acc=acc_up, input_precision=PRECISION)
    out_dtype = h_ptr.dtype.element_ty
    out_mask = mask_M[:, None] & mask_N[None, :]
    rows64_M = rows_M.to(tl.int64)
    pre_gate = acc_gate.to(out_dtype)
    if STORE_PRE:
        tl.store(pre_ptr + rows64_M[:, None] * stride_pm + cols_N[None, :] * stride_pn, pre_gate, mask=out_mask)
    h = act_fwd(pre_gate.to(ACC_DTYPE), ACT)
    if GATED:
        pre_up = acc_up.to(out_dtype)
        if STORE_PRE:
            tl.store(pre_ptr + rows64_M[:, None] * stride_pm + (cols_N + F)[None, :] * stride_pn, pre_up, mask=out_mask)
        h = h * pre_up.to(ACC_DTYPE)
    tl.store(h_ptr + rows64_M[:, None] * stride_hm + cols_N[None, :] * stride_hn, h.to(out_dtype), mask=out_mask)


@triton.jit
def _mm_kernel(
    a_ptr,
    a_idx_ptr,
    b_ptr,
    scale_ptr,
    out_idx_ptr,
    out_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    K,
    N,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    A_GATHER: tl.constexpr,
    SCALE: tl.constexpr,
    SCATTER: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, rows_M, mask_M, spare = _tile_rows(tile_expert_ptr, tile_start_ptr, tile_end_ptr, pid_t, BLOCK_M)
    if spare:
        return
    src_M = _row_index(a_idx_ptr, rows_M, mask_M, A_GATHER)
    cols_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_N = cols_N < N
    acc = _rows_dot(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE),
        a_ptr,
        src_M,
        mask_M,
        stride_am,
        stride_ak,
        b_ptr + e * stride_be,
        stride_bk,
        stride_bn,
        cols_N,
        mask_N,
        K,
        PRECISION,
        BLOCK_K,
    )
    out_dtype = out_ptr.dtype.element_ty
    if SCALE:
        # round the product first, as the reference scales the projection's (rounded) output
        s_M = tl.load(scale_ptr + rows_M, mask=mask_M, other=0.0).to(ACC_DTYPE)
        acc = acc.to(out_dtype).to(ACC_DTYPE) * s_M[:, None]
    dst_M = _row_index(out_idx_ptr, rows_M, mask_M, SCATTER)
    tl.store(
        out_ptr + dst_M[:, None] * stride_om + cols_N[None, :] * stride_on,
        acc.to(out_dtype),
        mask=mask_M[:, None] & mask_N[None, :],
    )


@triton.jit
def _down_bwd_kernel(
    g_ptr,
    g_idx_ptr,
    w_ptr,
    pre_ptr,
    scale_ptr,
    dpre_ptr,
    h_ptr,
    ds_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    D,
    F,
    stride_gm,
    stride_gk,
    stride_we,
    stride_wf,
    stride_wd,
    stride_pm,
    stride_pn,
    stride_dm,
    stride_dn,
    stride_hm,
    stride_hn,
    stride_sm,
    stride_sn,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    G_GATHER: tl.constexpr,
    SCALE: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_DS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, rows_M, mask_M, spare = _tile_rows(tile_expert_ptr, tile_start_ptr, tile_end_ptr, pid_t, BLOCK_M)
    if spare:
        return
    rows64_M = rows_M.to(tl.int64)
    src_M = _row_index(g_idx_ptr, rows_M, mask_M, G_GATHER)  # the forward scattered row r to dst[r]: read there
    cols_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_N = cols_N < F
    # dh_unscaled = g[src] @ w_down[e]^T, (BLOCK_M, BLOCK_N) over F, reduced over D
    acc = _rows_dot(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE),
        g_ptr,
        src_M,
        mask_M,
        stride_gm,
        stride_gk,
        w_ptr + e * stride_we,
        stride_wd,
        stride_wf,
        cols_N,
        mask_N,
        D,
        PRECISION,
        BLOCK_K,
    )
    io_dtype = pre_ptr.dtype.element_ty
    out_mask = mask_M[:, None] & mask_N[None, :]
    # recompute h = act(pre) (* up) from the saved pre-activation, rounded as in the forward
    pre_gate = tl.load(
        pre_ptr + rows64_M[:, None] * stride_pm + cols_N[None, :] * stride_pn, mask=out_mask, other=0.0
    ).to(ACC_DTYPE)
    a_gate = act_fwd(pre_gate, ACT)
    if GATED:
        pre_up = tl.load(
            pre_ptr + rows64_M[:, None] * stride_pm + (cols_N + F)[None, :] * stride_pn, mask=out_mask, other=0.0
        ).to(ACC_DTYPE)
        h = (a_gate * pre_up).to(io_dtype)
    else:
        h = a_gate.to(io_dtype)
    if STORE_H:
        tl.store(h_ptr + rows64_M[:, None] * stride_hm + cols_N[None, :] * stride_hn, h, mask=out_mask)
    dh = acc.to(io_dtype).to(ACC_DTYPE)  # the reference's rounded gradient of h @ w_down
    if STORE_DS:
        # d scale_r = <g_r, h_r @ w_down[e]> = sum_f dh_unscaled[r, f] * h[r, f]; one partial per column tile
        part_M = tl.sum(acc * h.to(ACC_DTYPE), axis=1)
        tl.store(ds_ptr + rows64_M * stride_sm + pid_n * stride_sn, part_M, mask=mask_M)
    if SCALE:
        s_M = tl.load(scale_ptr + rows_M, mask=mask_M, other=0.0).to(ACC_DTYPE)
        dh = (acc * s_M[:, None]).to(io_dtype).to(ACC_DTYPE)
    d_gate = dh * act_bwd(pre_gate, ACT)
    if GATED:
        tl.store(
            dpre_ptr + rows64_M[:, None] * stride_dm + (cols_N + F)[None, :] * stride_dn,
            (dh * a_gate).to(io_dtype),
            mask=out_mask,
        )
        d_gate = d_gate * pre_up
    tl.store(dpre_ptr + rows64_M[:, None] * stride_dm + cols_N[None, :] * stride_dn, d_gate.to(io_dtype), mask=out_mask)


@triton.jit
def _wgrad_kernel(
    a_ptr,
    a_idx_ptr,
    b_ptr,
    b_idx_ptr,
    scale_ptr,
    out_ptr,
    starts_ptr,
    ends_ptr,
    P,
    Q,
    stride_am,
    stride_ap,
    stride_bm,
    stride_bq,
    stride_oe,
    stride_op,
    stride_oq,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    e = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    row_lo = tl.load(starts_ptr + e)
    row_hi = tl.load(ends_ptr + e)
    ps_P = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs_Q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_P = ps_P < P
    mask_Q = qs_Q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC_DTYPE)
    for r0 in range(row_lo, row_hi, BLOCK_R):  # no rows: the loop is empty and dW[e] = 0
        rows_R = r0 + tl.arange(0, BLOCK_R)
        mask_R = rows_R < row_hi
        a_src_R = _row_index(a_idx_ptr, rows_R, mask_R, A_GATHER)
        b_src_R = _row_index(b_idx_ptr, rows_R, mask_R, B_GATHER)
        a_t = tl.load(
            a_ptr + a_src_R[None, :] * stride_am + ps_P[:, None] * stride_ap,
            mask=mask_P[:, None] & mask_R[None, :],
            other=0.0,
        )  # (BLOCK_P, BLOCK_R)
        b = tl.load(
            b_ptr + b_src_R[:, None] * stride_bm + qs_Q[None, :] * stride_bq,
            mask=mask_R[:, None] & mask_Q[None, :],
            other=0.0,
        )  # (BLOCK_R, BLOCK_Q)
        if SCALE:  # the reference's rounded gradient of the unscaled output: scale * g
            s_R = tl.load(scale_ptr + rows_R, mask=mask_R, other=0.0).to(ACC_DTYPE)
            b = (b.to(ACC_DTYPE) * s_R[:, None]).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a_t, b, acc=acc, input_precision=PRECISION)
    tl.store(
        out_ptr + e.to(tl.int64) * stride_oe + ps_P[:, None] * stride_op + qs_Q[None, :] * stride_oq,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_P[:, None] & mask_Q[None, :],
    )


try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover - layout of other Triton versions
    _Interpreted = ()

# Whether ``triton.jit`` built interpreter kernels: TRITON_INTERPRET=1 must be set before this
# module is first imported, since the decorator reads it.
INTERPRETED: bool = isinstance(_up_kernel, _Interpreted)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_opts(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _dummy(ref: Tensor) -> Tensor:
    """A placeholder pointer for an operand a constexpr switch leaves unread."""
    return ref.new_empty(1)


def grouped_up(
    x_TD: Tensor,
    idx_R: Optional[Tensor],
    w_up_EDH: Tensor,
    tiles: TileTable,
    act_code: int,
    gated: bool,
    num_rows: int,
    store_pre: bool,
    cfg: dict,
) -> tuple[Optional[Tensor], Tensor]:
    """``(pre_RH, h_RF)`` for the rows of the tile table (other rows are left unwritten)."""
    E, D, H = w_up_EDH.shape
    F = H // 2 if gated else H
    h_RF = x_TD.new_empty(num_rows, F)
    pre_RH = x_TD.new_empty(num_rows, H) if store_pre else None
    if tiles.num_tiles == 0 or F == 0:
        return pre_RH, h_RF
    pre = pre_RH if pre_RH is not None else _dummy(x_TD)  # pre_RH exists iff store_pre
    grid = (tiles.num_tiles, triton.cdiv(F, cfg["BLOCK_N"]))
    _up_kernel[grid](
        x_TD,
        idx_R if idx_R is not None else _dummy(tiles.start_N),
        w_up_EDH,
        pre,
        h_RF,
        tiles.expert_N,
        tiles.start_N,
        tiles.end_N,
        D,
        F,
        x_TD.stride(0),
        x_TD.stride(1),
        *w_up_EDH.stride(),
        pre.stride(0) if store_pre else 0,
        pre.stride(1) if store_pre else 0,
        h_RF.stride(0),
        h_RF.stride(1),
        ACT=act_code,
        GATED=gated,
        GATHER=idx_R is not None,
        STORE_PRE=store_pre,
        ACC_DTYPE=_acc_dtype(x_TD.dtype),
        PRECISION=cfg["input_precision"],
        BLOCK_M=tiles.block_m,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        **_launch_opts(cfg),
    )
    return pre_RH, h_RF


def grouped_mm(
    a_RK: Tensor,
    a_idx_R: Optional[Tensor],
    b_EKN: Tensor,
    tiles: TileTable,
    out: Tensor,
    scale_R: Optional[Tensor],
    out_idx_R: Optional[Tensor],
    cfg: dict,
) -> Tensor:
    """``out[dst] = scale * (a[src] @ b[e])`` for the rows of the tile table, written into ``out``
    (other rows keep their values). ``b_EKN`` may be any strided view, e.g. a transpose."""
    E, K, N = b_EKN.shape
    if tiles.num_tiles == 0 or N == 0:
        return out
    grid = (tiles.num_tiles, triton.cdiv(N, cfg["BLOCK_N"]))
    idx_dummy = _dummy(tiles.start_N)
    _mm_kernel[grid](
        a_RK,
        a_idx_R if a_idx_R is not None else idx_dummy,
        b_EKN,
        scale_R if scale_R is not None else _dummy(a_RK),
        out_idx_R if out_idx_R is not None else idx_dummy,
        out,
        tiles.expert_N,
        tiles.start_N,
        tiles.end_N,
        K,
        N,
        a_RK.stride(0),
        a_RK.stride(1),
        *b_EKN.stride(),
        out.stride(0),
        out.stride(1),
        A_GATHER=a_idx_R is not None,
        SCALE=scale_R is not None,
        SCATTER=out_idx_R is not None,
        ACC_DTYPE=_acc_dtype(a_RK.dtype),
        PRECISION=cfg["input_precision"],
        BLOCK_M=tiles.block_m,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        **_launch_opts(cfg),
    )
    return out


def grouped_down_bwd(
    g_SD: Tensor,
    g_idx_R: Optional[Tensor],
    w_down_EFD: Tensor,
    pre_RH: Tensor,
    scale_R: Optional[Tensor],
    tiles: TileTable,
    act_code: int,
    gated: bool,
    store_h: bool,
    store_ds: bool,
    cfg: dict,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(d_pre_RH, h_RF or None, ds_R or None)``; ``ds_R`` is zero on rows no tile covers. (Long
    only because the kernel launch lists its 40 arguments one per line.)"""
    E, F, D = w_down_EFD.shape
    R, H = pre_RH.shape
    d_pre_RH = pre_RH.new_empty(R, H)
    h_RF = pre_RH.new_empty(R, F) if store_h else None
    block_n = cfg["DBWD_BLOCK_N"]
    n_col = triton.cdiv(F, block_n)
    acc_torch = torch.float64 if pre_RH.dtype == torch.float64 else torch.float32
    ds_RN = pre_RH.new_zeros(R, max(n_col, 1), dtype=acc_torch) if store_ds else None
    if tiles.num_tiles and F:
        h = h_RF if h_RF is not None else _dummy(pre_RH)  # h_RF exists iff store_h
        ds = ds_RN if ds_RN is not None else _dummy(pre_RH).to(acc_torch)  # ds_RN exists iff store_ds
        _down_bwd_kernel[(tiles.num_tiles, n_col)](
            g_SD,
            g_idx_R if g_idx_R is not None else _dummy(tiles.start_N),
            w_down_EFD,
            pre_RH,
            scale_R if scale_R is not None else _dummy(pre_RH),
            d_pre_RH,
            h,
            ds,
            tiles.expert_N,
            tiles.start_N,
            tiles.end_N,
            D,
            F,
            g_SD.stride(0),
            g_SD.stride(1),
            *w_down_EFD.stride(),
            pre_RH.stride(0),
            pre_RH.stride(1),
            d_pre_RH.stride(0),
            d_pre_RH.stride(1),
            h.stride(0) if store_h else 0,
            h.stride(1) if store_h else 0,
            ds.stride(0) if store_ds else 0,
            ds.stride(1) if store_ds else 0,
            ACT=act_code,
            GATED=gated,
            G_GATHER=g_idx_R is not None,
            SCALE=scale_R is not None,
            STORE_H=store_h,
            STORE_DS=store_ds,
            ACC_DTYPE=_acc_dtype(pre_RH.dtype),
            PRECISION=cfg["input_precision"],
            BLOCK_M=tiles.block_m,
            BLOCK_N=block_n,
            BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["DBWD_num_warps"],
            num_stages=cfg["num_stages"],
        )
    ds_R = ds_RN.sum(1) if ds_RN is not None else None  # a fixed-order sum: deterministic, no atomics
    return d_pre_RH, h_RF, ds_R


def grouped_wgrad(
    a_RP: Tensor,
    a_idx_R: Optional[Tensor],
    b_RQ: Tensor,
    b_idx_R: Optional[Tensor],
    scale_R: Optional[Tensor],
    tiles: TileTable,
    out_dtype: torch.dtype,
    cfg: dict,
) -> Tensor:
    """``dW_EPQ[e] = a[src_rows_e]^T @ (scale * b[dst_rows_e])``; experts with no rows get zeros."""
    E = tiles.starts_E.numel()
    P, Q = a_RP.shape[1], b_RQ.shape[1]
    out = a_RP.new_empty(E, P, Q, dtype=out_dtype)
    if E == 0 or P == 0 or Q == 0:
        return out.zero_()
    grid = (E, triton.cdiv(P, cfg["WGRAD_BLOCK_P"]), triton.cdiv(Q, cfg["WGRAD_BLOCK_Q"]))
    idx_dummy = _dummy(tiles.start_N)
    _wgrad_kernel[grid](
        a_RP,
        a_idx_R if a_idx_R is not None else idx_dummy,
        b_RQ,
        b_idx_R if b_idx_R is not None else idx_dummy,
        scale_R if scale_R is not None else _dummy(a_RP),
        out,
        tiles.starts_E,
        tiles.ends_E,
        P,
        Q,
        a_RP.stride(0),
        a_RP.stride(1),
        b_RQ.stride(0),
        b_RQ.stride(1),
        *out.stride(),
        A_GATHER=a_idx_R is not None,
        B_GATHER=b_idx_R is not None,
        SCALE=scale_R is not None,
        ACC_DTYPE=_acc_dtype(a_RP.dtype),
        PRECISION=cfg["input_precision"],
        BLOCK_P=cfg["WGRAD_BLOCK_P"],
        BLOCK_Q=cfg["WGRAD_BLOCK_Q"],
        BLOCK_R=cfg["WGRAD_BLOCK_R"],
        **_launch_opts(cfg),
    )
    return out
