"""Experts: stacked homogeneous FFNs, heterogeneous module lists, and the dense FFN they
generalise (used for shared experts, dense baselines and sparse upcycling).

Shape legend: R rows (routed slots in expert order), D model width, F expert width,
H up-projection width (2F for gated units, else F), E experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..kernels import as_dtype, compute_dtype, expert_ffn, native
from ..kernels.activations import ACTIVATIONS as _REGISTRY
from ..kernels.reference import per_expert
from ..kernels.threads import block_threads, compiled_row

# by name, from the registry below the layer and the kernels (which take the name)
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {name: a.fn for name, a in _REGISTRY.items()}
GATED: dict[str, bool] = {name: a.gated for name, a in _REGISTRY.items()}


def _init_uniform_(w: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(w, -bound, bound)


def stacked_ffn(
    x_RD: Tensor,
    counts_E: Tensor,
    w_up_EDH: Tensor,
    w_down_EFD: Tensor,
    act: Union[str, Callable[[Tensor], Tensor]],
    backend: str,
) -> Tensor:
    """Stacked expert FFNs ``act(x @ w_up[e]) @ w_down[e]`` on rows in expert order (``act``: an
    activation name of :mod:`moekit.kernels.activations`, or any callable for the torch backends), by the named
    concrete backend, with the weights in the rows' dtype (under autocast the rows arrive in bf16).
    The one expert call of :class:`GroupedExperts` and of experts on borrowed weights
    (``moekit.interop``)."""
    if backend == "triton":  # Triton kernels are not autocast-aware: cast as a matmul would be
        x_RD = x_RD.to(compute_dtype(x_RD))
    if w_up_EDH.dtype != x_RD.dtype:
        w_up_EDH, w_down_EFD = w_up_EDH.to(x_RD.dtype), w_down_EFD.to(x_RD.dtype)
    return expert_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act, backend)


class FeedForward(nn.Module):
    """A dense FFN ``act(x @ w_up) @ w_down``; gated kinds compute ``f(x @ w_gate) * (x @ w_up)``
    with the gate and up projections held apart (each ``(D, F)``), so a tensor-parallel layout
    shards them alike (:mod:`moekit.parallel.tensor_parallel`). :attr:`fused_up` gives the
    experts' ``[gate | up]`` layout."""

    w_gate: Optional[nn.Parameter]

    def __init__(self, dim: int, hidden_dim: int, kind: str = "swiglu"):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"expert must be one of {', '.join(map(repr, ACTIVATIONS))}; got {kind!r}")
        self.dim, self.hidden_dim, self.kind = dim, hidden_dim, kind
        self._act = _REGISTRY[kind]
        # drawn as one (D, 2F) block and split, so a seed gives the values the fused layout had
        up = _init_uniform_(torch.empty(dim, hidden_dim * (2 if GATED[kind] else 1)), dim)
        gate_up = up.chunk(2, dim=1) if GATED[kind] else (None, up)
        self.w_gate = None if gate_up[0] is None else nn.Parameter(gate_up[0].contiguous())
        self.w_up = nn.Parameter(gate_up[1].contiguous())
        self.w_down = nn.Parameter(_init_uniform_(torch.empty(hidden_dim, dim), hidden_dim))

    def forward(self, x: Tensor) -> Tensor:
        w_up, w_down = _local(self.w_up), _local(self.w_down)
        if self.w_gate is None:
            return _matmul(self._act.fn(_matmul(x, w_up)), w_down)
        return _matmul(self._act.pair(_matmul(x, _local(self.w_gate)), _matmul(x, w_up)), w_down)

    @property
    def fused_up(self) -> Tensor:
        """The up projection in the experts' layout: ``[gate | up]`` ``(D, 2F)`` for gated kinds."""
        return self.w_up if self.w_gate is None else torch.cat([self.w_gate, self.w_up], dim=1)

    @torch.no_grad()
    def load_fused_up_(self, w_DH: Tensor) -> None:
        """Set the up projection(s) from the experts' ``[gate | up]`` layout."""
        if self.w_gate is None:
            self.w_up.copy_(w_DH)
        else:
            gate, up = w_DH.chunk(2, dim=1)
            self.w_gate.copy_(gate)
            self.w_up.copy_(up)

    def legacy_parts(self, prefix: str, saved: dict) -> dict[str, tuple[str, int, int, int]]:
        """Where a checkpoint written before the gate and up projections were split (2026-12-05)
        holds them: both in one ``w_up`` of ``[gate | up]`` columns (:data:`LegacyParts`).
        ``saved``: the checkpoint's names -> shapes."""
        up, F = prefix + "w_up", self.hidden_dim
        if self.w_gate is None or prefix + "w_gate" in saved or tuple(saved.get(up, ())) != (self.dim, 2 * F):
            return {}
        return {prefix + "w_gate": (up, 1, 0, F), up: (up, 1, F, F)}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        split_legacy_(state_dict, self.legacy_parts(prefix, shapes_of(state_dict)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# A checkpoint written before a module's projections were split: each of today's tensors it holds
# inside a fused one, as {today's name: (the checkpoint's name, dim, start, length)}.
LegacyParts = dict[str, tuple[str, int, int, int]]


def shapes_of(state_dict: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def split_legacy_(state_dict: dict, parts: LegacyParts) -> dict:
    """``state_dict`` with the fused tensors ``parts`` names replaced by today's parts (in place)."""
    fused = {old: state_dict[old] for old, *_ in parts.values()}
    for name, (old, dim, start, length) in parts.items():
        state_dict[name] = fused[old].narrow(dim, start, length)
    for old in fused:
        if old not in parts:  # (the fused [gate | up] had the name today's up has)
            del state_dict[old]
    return state_dict


def _local(w: Tensor) -> Tensor:
    """A tensor-parallel shard's local part (a plain tensor stays as it is)."""
    return w.to_local() if isinstance(w, DTensor) else w


def _matmul(x: Tensor, w_IO: Tensor) -> Tensor:
    """``x @ w_IO``; compiled for one row on the CPU, :func:`moekit.kernels.threads.compiled_row`."""
    y = compiled_row(x, w_IO.t()) if torch.compiler.is_compiling() else None  # eager: no transposed view made
    return x @ w_IO if y is None else y


class StackedExperts(nn.Module):
    """The seam the layer's stacked paths call for E homogeneous FFN experts: ``forward(x_RD,
    counts_E, backend)`` on rows in expert order, and ``few_slots`` for decoding. Where the weights
    live is the subclass's business: :class:`GroupedExperts` holds all of them, the expert store
    (:mod:`moekit.store`) a budgeted pool of slots filled from a file."""

    num_experts: int
    dim: int
    hidden_dim: int
    kind: str

    def few_slots(
        self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, into_TD: Optional[Tensor] = None
    ) -> Tensor:
        raise NotImplementedError


def _storage_key(*ws: Tensor) -> tuple:
    """What views or addresses made from ``ws`` stay valid for: their storage, shapes, strides, dtypes."""
    return tuple((w.data_ptr(), w.shape, w.stride(), w.dtype) for w in ws)


class GroupedExperts(StackedExperts):
    """E homogeneous FFN experts stored as stacked (E, ...) weights, each initialised like a dense
    FFN of the same width, computed in one grouped pass by the chosen backend."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, kind: str = "swiglu"):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"expert must be one of {', '.join(map(repr, ACTIVATIONS))}; got {kind!r}")
        self.num_experts, self.dim, self.hidden_dim, self.kind = num_experts, dim, hidden_dim, kind
        h = hidden_dim * (2 if GATED[kind] else 1)
        self.w_up = nn.Parameter(_init_uniform_(torch.empty(num_experts, dim, h), dim))
        self.w_down = nn.Parameter(_init_uniform_(torch.empty(num_experts, hidden_dim, dim), hidden_dim))

    def forward(self, x_RD: Tensor, counts_E: Tensor, backend: str = "grouped") -> Tensor:
        return stacked_ffn(x_RD, counts_E, *self._local_weights(), self.kind, backend)

    def _local_weights(self) -> tuple[Tensor, Tensor]:
        """``(w_up, w_down)``. Under expert parallelism the weights are DTensors sharded on the
        expert dimension: this rank's experts are their local part (its rows arrive already
        grouped by local expert)."""
        if isinstance(self.w_up, DTensor):
            assert isinstance(self.w_down, DTensor)  # sharded together
            return self.w_up.to_local(), self.w_down.to_local()
        return self.w_up, self.w_down

    def _weights_like(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's ``(w_up, w_down)`` in ``x``'s dtype (e.g. under autocast the rows arrive in bf16)."""
        w_up, w_down = self._local_weights()
        if w_up.dtype == x.dtype:
            return w_up, w_down
        return w_up.to(x.dtype), w_down.to(x.dtype)

    def few_slots(
        self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, into_TD: Optional[Tensor] = None
    ) -> Tensor:
        """``into_TD + sum_k weights_TK * expert_k(x)`` for a few tokens, reading only the chosen
        experts' weights (the decode path, :mod:`moekit.kernels.slots`; forward only, so
        ``into_TD``, e.g. the shared experts' output, may be updated in place)."""
        from ..kernels.slots import slot_ffn

        x_TD = as_dtype(x_TD, compute_dtype(x_TD))  # under autocast: its dtype, as a matmul would get
        if into_TD is not None:
            into_TD = as_dtype(into_TD, x_TD.dtype)
        table = self._native_table(x_TD)
        if table is not None:  # one token, eager, CPU: moekit's native kernels, a layer's experts in one call
            out_D = x_TD.new_zeros(self.dim) if into_TD is None else into_TD.reshape(-1).clone()
            ids_K, w_K = experts_TK[0], weights_TK[0]
            native.experts(table, ids_K, w_K, x_TD[0], self.hidden_dim, self.kind, out_D, block_threads())
            return out_D.view(1, self.dim)
        w_up, w_down = self._weights_like(x_TD)
        views = self._expert_views(w_up, w_down)
        return slot_ffn(x_TD, experts_TK, weights_TK, w_up, w_down, ACTIVATIONS[self.kind], into_TD, views)

    def rows_major_(self) -> GroupedExperts:
        """Each expert's projections laid out in memory as ``(out, in)`` (the checkpoints'
        layout), the shapes and values unchanged: ``w_up`` stays ``(E, D, H)`` with strides
        ``(H*D, 1, D)``. Compiled CPU decoding then sums each output over contiguous weights: 30
        against 13 GB/s at 1 thread (``benchmarks/decode_gemv.py``). Training and the eager paths
        compute the same on either layout."""
        with torch.no_grad():
            for w in (self.w_up, self.w_down):
                if not isinstance(w, DTensor) and w.stride(1) != 1:
                    w.data = w.data.transpose(1, 2).contiguous().transpose(1, 2)
        self._views = None
        return self

    _views: Optional[tuple] = None  # (key, up views, down views), see _expert_views
    _table: Optional[tuple] = None  # (key, native.ExpertTable), see _native_table

    def _native_table(self, x_TD: Tensor) -> Optional[native.ExpertTable]:
        """The native kernels' table of each expert's ``(out, in)`` weights, for one float32 token
        decoded eagerly on the CPU with the experts laid out rows-major (:meth:`rows_major_`, done by
        ``prepare_decoding_``); kept while the weights' storage stays the same. None otherwise."""
        w_up, w_down = self.w_up, self.w_down
        if (
            x_TD.shape[0] != 1
            or x_TD.dtype != torch.float32
            or x_TD.device.type != "cpu"
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or isinstance(w_up, DTensor)
            or native.float_format(w_up.dtype) is None
            or w_up.stride(1) != 1
            or w_down.stride(1) != 1
            or not native.available()
        ):
            return None
        key = _storage_key(w_up, w_down)
        if self._table is None or self._table[0] != key:
            fmt = native.float_format(w_up.dtype) or ""
            ups, downs = w_up.detach().transpose(1, 2), w_down.detach().transpose(1, 2)  # (E, H, D), (E, D, F)
            parts = [(fmt, ups[e], None, downs[e], None) for e in range(self.num_experts)]
            self._table = (key, native.ExpertTable(parts))
        return self._table[1]

    def _apply(self, fn, recurse=True):
        self._views = self._table = None  # .to() / .cuda() / .half(): do not keep the old storage alive
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._views = self._table = None  # load_state_dict(assign=True) replaces the parameters
        super()._load_from_state_dict(*args, **kwargs)

    def _expert_views(self, w_up: Tensor, w_down: Tensor) -> Optional[tuple[Sequence[Tensor], Sequence[Tensor]]]:
        """Each expert's ``(w_up[e], w_down[e])`` as views made once and kept while the weights'
        storage stays the same (in-place updates keep them valid): indexing per call costs one op
        per expert and projection, which a decode step feels (decode batch 1, MoE / dense twin 0.55-0.57
        -> 0.59: benchmarks/RESULTS.md).
        None for weights that are not this module's parameters (e.g. cast under autocast)."""
        if torch.compiler.is_compiling() or w_up.device.type != "cpu" or torch.is_grad_enabled():
            return None  # only the CPU eager no-grad loop indexes experts; the views carry no gradient
        if w_up is not self.w_up or w_down is not self.w_down:
            return None
        key = _storage_key(w_up, w_down)
        if self._views is None or self._views[0] != key:
            with torch.no_grad():
                self._views = (key, w_up.unbind(0), w_down.unbind(0))
        return self._views[1], self._views[2]

    def fused(self, x_TD: Tensor, plan, weights_TK: Tensor) -> Tensor:
        """Dispatch, experts and combine in moekit's Triton kernels (ScatterMoE-style): the token
        gather is fused into the up projection's loads and the routing weight and scatter to slot
        order into the down projection's epilogue, so neither ``x_RD`` nor the per-slot expert
        outputs are kept; the K slots of each token are then summed. ``plan``: a DispatchPlan."""
        from ..kernels.triton import triton_moe_ffn

        x_TD = x_TD.to(compute_dtype(x_TD))  # under autocast: its dtype, as a matmul would get
        w_up, w_down = self._weights_like(x_TD)
        T, K = plan.num_tokens, plan.top_k
        scale_R = weights_TK.reshape(-1)[plan.order_R].to(x_TD.dtype)
        y_SD = triton_moe_ffn(
            x_TD, plan.counts_E, w_up, w_down, self.kind, scale_R=scale_R, out_idx_R=plan.order_R, top_k=K
        )
        return y_SD.view(T, K, -1).sum(1)

    def expert(self, e: int) -> FeedForward:
        """A dense copy of expert ``e``."""
        ffn = FeedForward(self.dim, self.hidden_dim, self.kind).to(self.w_up.device, self.w_up.dtype)
        with torch.no_grad():
            ffn.load_fused_up_(self.w_up[e])
            ffn.w_down.copy_(self.w_down[e])
        return ffn

    @torch.no_grad()
    def copy_expert_(self, dst: Tensor, src: Tensor, noise: float = 0.0) -> None:
        """Overwrite experts ``dst`` with experts ``src`` (+ relative Gaussian noise)."""
        for p in (self.w_up, self.w_down):
            w = p[src].clone()
            if noise:
                w += noise * w.std() * torch.randn_like(w)
            p[dst] = w

    def resized(self, num_experts: int) -> GroupedExperts:
        """A new module with ``num_experts`` experts: the current ones first, fresh ones after."""
        new = GroupedExperts(num_experts, self.dim, self.hidden_dim, self.kind).to(self.w_up.device, self.w_up.dtype)
        n = min(num_experts, self.num_experts)
        with torch.no_grad():
            new.w_up[:n] = self.w_up[:n]
            new.w_down[:n] = self.w_down[:n]
        return new


class ModuleListExperts(nn.Module):
    """Heterogeneous experts: any modules mapping (N, D) -> (N, D) (different widths, activations,
    a conv or an attention block), run one after another on their contiguous rows."""

    def __init__(self, experts: Sequence[nn.Module], dim: int):
        super().__init__()
        if len(experts) == 0:
            raise ValueError("experts must be a non-empty list of nn.Module")
        for i, m in enumerate(experts):
            if not isinstance(m, nn.Module):
                raise TypeError(f"experts[{i}] must be an nn.Module; got {type(m).__name__}")
        self.experts = nn.ModuleList(experts)
        self.num_experts, self.dim = len(experts), dim
        self._probe()

    @torch.no_grad()
    def _probe(self) -> None:
        for i, m in enumerate(self.experts):
            p = next(iter(m.parameters()), None)
            x = torch.zeros(
                2,
                self.dim,
                device=p.device if p is not None else None,
                dtype=p.dtype if p is not None and p.is_floating_point() else None,
            )
            was_training = m.training
            m.eval()
            try:
                y = m(x)
            except Exception as err:  # noqa: BLE001 - the module's own error is kept as the cause
                raise ValueError(
                    f"experts[{i}] ({type(m).__name__}) must map (N, dim={self.dim}) to (N, {self.dim}); calling it "
                    f"on (2, {self.dim}) failed: {err}"
                ) from err
            finally:
                m.train(was_training)
            if not isinstance(y, Tensor) or tuple(y.shape) != (2, self.dim):
                got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(
                    f"experts[{i}] ({type(m).__name__}) must map (N, dim={self.dim}) to (N, {self.dim}); got output "
                    f"{got} for input (2, {self.dim})"
                )

    def forward(self, x_RD: Tensor, counts_E: Tensor, backend: str = "loop") -> Tensor:
        return per_expert(x_RD, counts_E, lambda e, rows: self.experts[e](rows), self.dim)


__all__ = [
    "ACTIVATIONS",
    "GATED",
    "FeedForward",
    "GroupedExperts",
    "LegacyParts",
    "ModuleListExperts",
    "shapes_of",
    "split_legacy_",
    "stacked_ffn",
]
