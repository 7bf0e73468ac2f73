"""The expert FFN as one ``torch.autograd.Function`` over the grouped kernels of :mod:`.gemm`.

Forward (two launches, plus the tile table):
    pre_RH, h_RF = up(x_TD[token_idx_R] @ w_up[e])             gather fused into the A loads
    y_SD[out_idx_R] = scale_R * (h_RF @ w_down[e])              scale and scatter in the epilogue
Saved: x_TD, the weights, scale_R, the index tensors and pre_RH; not h_RF, not y.

Backward (four launches):
    d_pre_RH, h_RF, ds_R = down_bwd(g_SD[out_idx_R] @ w_down[e]^T)   act backward, h recompute,
                                                                   ds_R = rowsum(dh_unscaled * h)
    dx     = d_pre_RH @ w_up[e]^T      slot mode: scattered to slot order, summed over K
                                       (deterministic); any other gather: index_add_ into x_TD
    dW_up[e]   = x[rows_e]^T @ d_pre[rows_e]
    dW_down[e] = h[rows_e]^T @ (scale * g)[rows_e]

Shape legend: T source rows, R rows in expert order, S output rows, D model width, F expert
width, H = F or 2F, E experts.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ...config import check_positive
from ..activations import Act
from . import tune
from .activations import ActKind, act_kind
from .config import KNOWN_KEYS, candidates, check_config, default_config, heuristic_config
from .gemm import INTERPRETED, grouped_down_bwd, grouped_mm, grouped_up, grouped_wgrad
from .schedule import TileTable, tile_table


def _as_index(idx: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    if idx is None:
        return None
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
        raise ValueError(f"index tensors must be 1-D int32/int64; got {tuple(idx.shape)} {idx.dtype}")
    return idx.to(device=device, dtype=torch.int32).contiguous()


class _TritonExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x_TD,
        w_up_EDH,
        w_down_EFD,
        scale_R,
        counts_E,
        token_idx_R,
        out_idx_R,
        num_rows,
        num_out_rows,
        act_code,
        gated,
        top_k,
        cfg,
    ):
        tiles = tile_table(counts_E, num_rows, cfg["BLOCK_M"])
        needs_grad = any(ctx.needs_input_grad[:4])
        pre_RH, h_RF = grouped_up(x_TD, token_idx_R, w_up_EDH, tiles, act_code, gated, num_rows, needs_grad, cfg)
        D = w_down_EFD.shape[-1]
        y_SD = x_TD.new_zeros(num_out_rows, D)  # rows no tile writes (padding, unscattered) stay zero
        grouped_mm(h_RF, None, w_down_EFD, tiles, y_SD, scale_R, out_idx_R, cfg)
        if needs_grad:
            ctx.save_for_backward(
                x_TD,
                w_up_EDH,
                w_down_EFD,
                scale_R,
                token_idx_R,
                out_idx_R,
                pre_RH,
                tiles.expert_N,
                tiles.start_N,
                tiles.end_N,
                tiles.starts_E,
                tiles.ends_E,
            )
            ctx.act_code, ctx.gated, ctx.cfg, ctx.block_m, ctx.top_k = act_code, gated, cfg, tiles.block_m, top_k
        return y_SD

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' backward builds no graph: raise on double backward
    def backward(ctx, g_SD):
        (
            x_TD,
            w_up_EDH,
            w_down_EFD,
            scale_R,
            token_idx_R,
            out_idx_R,
            pre_RH,
            expert_N,
            start_N,
            end_N,
            starts_E,
            ends_E,
        ) = ctx.saved_tensors
        tiles = TileTable(expert_N, start_N, end_N, starts_E, ends_E, ctx.block_m)
        cfg = ctx.cfg
        need_x, need_up, need_down, need_s = ctx.needs_input_grad[:4]
        need_s = need_s and scale_R is not None
        d_pre_RH, h_RF, ds_R = grouped_down_bwd(
            g_SD,
            out_idx_R,
            w_down_EFD,
            pre_RH,
            scale_R,
            tiles,
            ctx.act_code,
            ctx.gated,
            store_h=need_down,
            store_ds=need_s,
            cfg=cfg,
        )
        dx = dw_up = dw_down = ds = None
        if need_x:
            dx = _input_grad(d_pre_RH, w_up_EDH, x_TD, token_idx_R, out_idx_R, ctx.top_k, tiles, cfg)
        if need_up:
            dw_up = grouped_wgrad(x_TD, token_idx_R, d_pre_RH, None, None, tiles, w_up_EDH.dtype, cfg)
        if need_down:
            assert h_RF is not None  # stored: store_h=need_down
            dw_down = grouped_wgrad(h_RF, None, g_SD, out_idx_R, scale_R, tiles, w_down_EFD.dtype, cfg)
        if need_s:
            assert ds_R is not None and scale_R is not None  # stored: store_ds=need_s, which needs scale_R
            ds = ds_R.to(scale_R.dtype)
        return dx, dw_up, dw_down, ds, None, None, None, None, None, None, None, None, None


def _input_grad(d_pre_RH, w_up_EDH, x_TD, token_idx_R, out_idx_R, top_k, tiles, cfg):
    """``dx = d_pre @ w_up[e]^T`` summed into the source rows. In slot mode (row r is slot
    ``out_idx_R[r]`` of token ``out_idx_R[r] // top_k``) the rows are scattered to slot order in
    the kernel's epilogue and each token's K slots summed: a fixed-order sum, no atomics."""
    w_t = w_up_EDH.transpose(1, 2)
    T, D = x_TD.shape
    if top_k is not None:
        dx_SD = x_TD.new_zeros(T * top_k, D)  # slots no row came from (dropped) get zero
        grouped_mm(d_pre_RH, None, w_t, tiles, dx_SD, None, out_idx_R, cfg)
        return dx_SD.view(T, top_k, D).sum(1)
    dx_RD = x_TD.new_zeros(d_pre_RH.shape[0], D)  # padding rows get no gradient
    grouped_mm(d_pre_RH, None, w_t, tiles, dx_RD, None, None, cfg)
    if token_idx_R is None:
        return dx_RD
    # an arbitrary gather: index_add_ (atomic, so not bitwise reproducible on CUDA)
    return torch.zeros_like(x_TD).index_add_(0, token_idx_R.long(), dx_RD)


def triton_moe_ffn(
    x_TD: Tensor,
    counts_E: Tensor,
    w_up_EDH: Tensor,
    w_down_EFD: Tensor,
    act: Act,
    *,
    token_idx_R: Optional[Tensor] = None,
    scale_R: Optional[Tensor] = None,
    out_idx_R: Optional[Tensor] = None,
    num_out_rows: Optional[int] = None,
    top_k: Optional[int] = None,
    config: Optional[dict] = None,
) -> Tensor:
    """The expert FFN with the optional fused gather, row scale and scatter:

        y[out_idx_R[r]] = scale_R[r] * act(x[token_idx_R[r]] @ w_up[e(r)]) @ w_down[e(r)]

    for the rows ``r < sum(counts_E)`` (rows sorted by expert as in the backend contract). ``act``
    is an activation name (a key of :data:`moekit.kernels.activations.ACTIVATIONS`). With
    no ``token_idx_R`` row r reads ``x[r]`` (R = x's rows); with no ``out_idx_R`` it writes
    ``y[r]`` (S = R). Output rows nothing is written to are zero; ``out_idx_R`` must not repeat a
    row among the real rows. Index tensors must hold valid rows for every row, padding included.
    Differentiable in ``x_TD``, both weights and ``scale_R``.

    Slot mode (the MoE layer's case): give ``top_k`` and ``out_idx_R`` (slot ids ``t*K + k``) and
    no ``token_idx_R``; row r then reads ``x[out_idx_R[r] // top_k]`` and writes slot
    ``out_idx_R[r]`` of the ``T*K`` output rows, and the input gradient is summed per token in a
    fixed order (deterministic), instead of the atomic ``index_add_`` a general gather needs.
    """
    rows = _check_arguments(
        x_TD,
        counts_E,
        w_up_EDH,
        w_down_EFD,
        act,
        token_idx_R=token_idx_R,
        scale_R=scale_R,
        out_idx_R=out_idx_R,
        num_out_rows=num_out_rows,
        top_k=top_k,
    )
    return _moe_ffn(x_TD, w_up_EDH, w_down_EFD, rows, top_k, config)


class _Rows(NamedTuple):
    """:func:`triton_moe_ffn`'s arguments after checking: what the kernels read and write."""

    kind: ActKind
    counts_E: Tensor  # on x's device
    token_idx_R: Optional[Tensor]  # int32, contiguous (slot mode: out_idx_R // top_k)
    out_idx_R: Optional[Tensor]  # int32, contiguous
    scale_R: Optional[Tensor]  # contiguous
    num_rows: int  # R
    num_out_rows: int  # S


def _check_arguments(
    x_TD: Tensor,
    counts_E: Tensor,
    w_up_EDH: Tensor,
    w_down_EFD: Tensor,
    act: Act,
    *,
    token_idx_R: Optional[Tensor],
    scale_R: Optional[Tensor],
    out_idx_R: Optional[Tensor],
    num_out_rows: Optional[int],
    top_k: Optional[int],
) -> _Rows:
    """Check :func:`triton_moe_ffn`'s arguments (ValueError naming the first that does not fit) and
    normalise the row indices: slot mode's gather, int32 indices, the output row count."""
    kind = act_kind(act)
    dev = x_TD.device
    if dev.type != "cuda" and not INTERPRETED:
        raise ValueError(f"moekit's Triton kernels need a CUDA device (or TRITON_INTERPRET=1); input is on {dev}")
    if x_TD.dim() != 2 or w_up_EDH.dim() != 3 or w_down_EFD.dim() != 3:
        raise ValueError("expected x (T, D), w_up (E, D, H), w_down (E, F, D)")
    if not (x_TD.dtype == w_up_EDH.dtype == w_down_EFD.dtype):
        raise ValueError(
            f"x, w_up and w_down must share a dtype; got {x_TD.dtype}, {w_up_EDH.dtype}, {w_down_EFD.dtype}"
        )
    E, D, H = w_up_EDH.shape
    F = w_down_EFD.shape[1]
    if x_TD.shape[1] != D or w_down_EFD.shape != (E, F, D) or H != (2 * F if kind.gated else F):
        raise ValueError(
            f"shapes do not fit: x {tuple(x_TD.shape)}, w_up {tuple(w_up_EDH.shape)}, w_down {tuple(w_down_EFD.shape)} "
            f"({'gated: H = 2F' if kind.gated else 'H = F'})"
        )
    if counts_E.numel() != E:
        raise ValueError(f"counts_E has {counts_E.numel()} entries for {E} experts")
    if top_k is not None:
        check_positive("top_k", top_k, integer=True)
        if out_idx_R is None or token_idx_R is not None:
            raise ValueError(
                "top_k (slot mode) needs out_idx_R (slot ids) and no token_idx_R: rows read x[slot // top_k]"
            )
        T = x_TD.shape[0]
        if num_out_rows is not None and num_out_rows != T * top_k:
            raise ValueError(f"in slot mode num_out_rows must be T * top_k = {T * top_k}; got {num_out_rows}")
        num_out_rows = T * top_k
        token_idx_R = torch.div(out_idx_R, top_k, rounding_mode="floor")
    token_idx_R = _as_index(token_idx_R, dev)
    out_idx_R = _as_index(out_idx_R, dev)
    R = token_idx_R.numel() if token_idx_R is not None else x_TD.shape[0]
    if out_idx_R is not None and out_idx_R.numel() != R:
        raise ValueError(f"out_idx_R has {out_idx_R.numel()} rows, expected R = {R}")
    if scale_R is not None:
        if scale_R.shape != (R,):
            raise ValueError(f"scale_R must have shape ({R},); got {tuple(scale_R.shape)}")
        scale_R = scale_R.contiguous()  # the kernels read scale_ptr + row (no stride)
    if num_out_rows is None:
        num_out_rows = R
    elif out_idx_R is None and num_out_rows != R:
        raise ValueError("num_out_rows differs from R but no out_idx_R says where rows go")
    return _Rows(kind, counts_E.to(dev), token_idx_R, out_idx_R, scale_R, R, num_out_rows)


def _moe_ffn(
    x_TD: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor, rows: _Rows, top_k: Optional[int], config: Optional[dict]
) -> Tensor:
    """Choose the launch config (tuning it on first sight of the shape) and run the autograd op."""
    kind, scale_R = rows.kind, rows.scale_R
    train = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_TD, w_up_EDH, w_down_EFD, scale_R)
    )

    def call(inputs, cfg):
        return _TritonExpertFFN.apply(
            *inputs,
            rows.counts_E,
            rows.token_idx_R,
            rows.out_idx_R,
            rows.num_rows,
            rows.num_out_rows,
            kind.code,
            kind.gated,
            top_k,
            cfg,
        )

    def trial(cfg):  # one timed call for the tuner, on detached copies (the caller's graph is untouched)
        # identity hooks: the trial's saved tensors bypass an enclosing activation checkpoint's
        # hooks (whose unpack would recompute the caller's region inside this backward)
        with torch.enable_grad() if train else torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            ins = [
                t.detach().requires_grad_(t.requires_grad) if t is not None else None
                for t in (x_TD, w_up_EDH, w_down_EFD, scale_R)
            ]
            y = call(ins, cfg)
            if train:
                torch.autograd.grad(y, [t for t in ins if t is not None and t.requires_grad], torch.ones_like(y))

    flags = (
        f"{'gather' if rows.token_idx_R is not None else ''}{'scale' if scale_R is not None else ''}"
        f"{'scatter' if rows.out_idx_R is not None else ''}{f'k{top_k}' if top_k else ''}"
    )
    E, D, F = w_up_EDH.shape[0], w_up_EDH.shape[1], w_down_EFD.shape[1]
    cfg = _choose_config(config, x_TD.device, x_TD.dtype, rows.num_rows, E, D, F, kind, flags, train, trial)
    return call((x_TD, w_up_EDH, w_down_EFD, scale_R), cfg)


def _choose_config(config, dev, dtype, R, E, D, F, kind, flags, train, trial) -> dict:
    """The caller's config over the defaults; else a tuned one (measured now if new); else the
    heuristic for this many rows per expert. See :mod:`.config` and :mod:`.tune`."""
    untuned = default_config(True) if INTERPRETED else heuristic_config(R, E)
    if config is not None:
        check_config(config)
        return {**untuned, **config}
    if not tune.autotune_enabled(dev, INTERPRETED):
        return untuned
    key = tune.shape_key(
        dev,
        dtype,
        num_rows=R,
        num_experts=E,
        dim=D,
        hidden=F,
        act_code=kind.code,
        gated=kind.gated,
        flags=flags,
        train=train,
    )
    chosen = tune.tuner().lookup(key)
    if chosen is not None and not _usable(chosen):
        chosen = None  # e.g. written by an older moekit with other keys: measure again
    if chosen is None:
        if tune.capturing(dev):  # no timing inside a CUDA graph capture
            return untuned
        chosen = tune.tuner().tune(key, trial, candidates(R, E), dev)
    return chosen


def _same(t: Tensor) -> Tensor:
    return t


def _usable(cfg: dict) -> bool:
    """Whether a cached config has exactly the current keys and valid block sizes."""
    if set(cfg) != KNOWN_KEYS:
        return False
    try:
        check_config(cfg)
    except ValueError:
        return False
    return True


def triton_ffn(x_RD: Tensor, counts_E: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor, act: Act) -> Tensor:
    """The backend contract of :mod:`moekit.kernels` (same results and gradients as ``loop_ffn``;
    rows past ``sum(counts_E)`` come back as zeros); ``act`` is an activation name."""
    return triton_moe_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act)
