"""Layers on low-precision weights for inference (:mod:`moekit.kernels.lowbit`): a linear map and
the stacked experts' seam with each expert in its own format (per-expert precision), forward only.

:class:`QuantizedExperts` computes what :class:`~moekit.layer.experts.GroupedExperts` computes,
each expert's projections through its own :class:`~moekit.kernels.lowbit.LowBitWeight` kept in
the checkpoints' ``(out, in)`` layout (the one the CPU's 16-bit and low-bit kernels read fastest).

Shape legend: R rows in expert order, T tokens, K slots per token, D width, F expert width, H
up-projection width (2F when gated), E experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, cast

import torch
from torch import Tensor, nn

from ..kernels import as_dtype, compute_dtype, native
from ..kernels.lowbit import LowBitWeight, check_format
from ..kernels.threads import block_threads, split_sum
from .experts import ACTIVATIONS, GATED, FeedForward, GroupedExperts, StackedExperts


class LowBitTensors(nn.Module):
    """One :class:`LowBitWeight`'s tensors as buffers: in ``state_dict`` (so a quantized model
    saves and loads like any other) and allocated by ``to_empty``; :meth:`weight` views them."""

    data: Tensor
    scales: Optional[Tensor]
    zeros: Optional[Tensor]

    def __init__(self, w: LowBitWeight):
        super().__init__()
        self.fmt, self.group_size = w.fmt, w.group_size
        self.register_buffer("data", w.data)
        self.register_buffer("scales", w.scales)
        self.register_buffer("zeros", w.zeros)
        self._view: tuple[tuple[int, int], LowBitWeight] = ((w.data.data_ptr(), w.data._version), w)

    def weight(self) -> LowBitWeight:
        """The weight over the current buffers (rebuilt after they move: e.g. a checkpoint read;
        compiled, made from them as traced: the address check cannot be traced)."""
        if torch.compiler.is_compiling():
            return LowBitWeight(self.fmt, self.data, self.scales, self.zeros, self.group_size)
        key = (self.data.data_ptr(), self.data._version)  # moved, or written in place (a checkpoint read)
        if self._view[0] != key:
            self._view = (key, LowBitWeight(self.fmt, self.data, self.scales, self.zeros, self.group_size))
        return self._view[1]

    @property
    def name(self) -> str:
        return self.weight().name

    @property
    def nbytes(self) -> int:
        return self.weight().nbytes

    def extra_repr(self) -> str:
        return f"format={self.name}, shape=({self.weight().out_features}, {self.weight().in_features})"


class LowBitLinear(nn.Module):
    """``nn.Linear``'s forward on a :class:`LowBitWeight` (the bias, if any, stays float32)."""

    def __init__(self, weight: LowBitWeight, bias: Optional[Tensor] = None):
        super().__init__()
        self.q = LowBitTensors(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = weight.in_features, weight.out_features

    @classmethod
    def of(cls, linear: nn.Linear, fmt: str, group_size: int = 64) -> LowBitLinear:
        return cls(LowBitWeight.quantize(linear.weight, fmt, group_size), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.q.weight().linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"


class LowBitFeedForward(nn.Module):
    """:class:`~moekit.layer.experts.FeedForward`'s forward (a dense FFN: a shared expert, a dense
    layer) on low-precision weights."""

    def __init__(self, up: LowBitWeight, down: LowBitWeight, kind: str):
        super().__init__()
        self.kind, self.dim, self.hidden_dim = kind, up.in_features, down.in_features
        self.up, self.down = LowBitTensors(up), LowBitTensors(down)
        self._act = ACTIVATIONS[kind]

    @classmethod
    def of(cls, ffn: FeedForward, fmt: str, group_size: int = 64) -> LowBitFeedForward:
        up = LowBitWeight.quantize(ffn.fused_up.detach().t(), fmt, group_size)
        return cls(up, LowBitWeight.quantize(ffn.w_down.t(), fmt, group_size), ffn.kind)

    def forward(self, x: Tensor) -> Tensor:
        x_RD = x.reshape(-1, x.shape[-1])
        y_RD = self.down.weight().linear(self._act(self.up.weight().linear(x_RD)))
        return y_RD.reshape(*x.shape[:-1], self.dim)


class QuantizedExperts(StackedExperts):
    """E FFN experts, expert ``e``'s up ``(H, D)`` and down ``(D, F)`` projections in its own
    format (forward only: for decoding and evaluation)."""

    def __init__(self, ups: Sequence[LowBitWeight], downs: Sequence[LowBitWeight], kind: str):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"expert must be one of {', '.join(map(repr, ACTIVATIONS))}; got {kind!r}")
        if len(ups) != len(downs) or not ups:
            raise ValueError(f"need one up and one down projection per expert; got {len(ups)} and {len(downs)}")
        self.up = nn.ModuleList(LowBitTensors(w) for w in ups)
        self.down = nn.ModuleList(LowBitTensors(w) for w in downs)
        self.kind = kind
        self.num_experts, self.dim, self.hidden_dim = len(ups), ups[0].in_features, downs[0].in_features
        self._act = ACTIVATIONS[kind]
        self._table: Optional[native.ExpertTable] = None  # the native kernels' addresses, made on first use

    @classmethod
    def of(cls, experts: GroupedExperts, formats: Sequence[str], group_size: int = 64) -> QuantizedExperts:
        """``experts``' weights with expert ``e`` in ``formats[e]``."""
        if len(formats) != experts.num_experts:
            raise ValueError(f"formats: one per expert ({experts.num_experts}); got {len(formats)}")
        for f in formats:
            check_format(f, "expert format")
        w_up, w_down = experts._local_weights()
        ups = [LowBitWeight.quantize(w_up[e].t(), f, group_size) for e, f in enumerate(formats)]
        downs = [LowBitWeight.quantize(w_down[e].t(), f, group_size) for e, f in enumerate(formats)]
        return cls(ups, downs, experts.kind)

    @classmethod
    def empty(
        cls, num_experts: int, dim: int, hidden_dim: int, kind: str, formats: Sequence[str], group_size: int = 64
    ) -> QuantizedExperts:
        """Uninitialised, of the shapes ``formats`` give (a quantized checkpoint is read into them)."""
        h = hidden_dim * (2 if GATED[kind] else 1)
        ups = [LowBitWeight.empty(f, h, dim, group_size) for f in formats]
        return cls(ups, [LowBitWeight.empty(f, dim, hidden_dim, group_size) for f in formats], kind)

    @property
    def ups(self) -> list[LowBitWeight]:
        return [cast(LowBitTensors, m).weight() for m in self.up]

    @property
    def downs(self) -> list[LowBitWeight]:
        return [cast(LowBitTensors, m).weight() for m in self.down]

    @property
    def formats(self) -> list[str]:
        return [w.name for w in self.ups]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.ups) + sum(w.nbytes for w in self.downs)

    def extra_repr(self) -> str:
        counts = {f: self.formats.count(f) for f in dict.fromkeys(self.formats)}
        return f"experts={self.num_experts}, dim={self.dim}, hidden={self.hidden_dim}, formats={counts}"

    def expert(self, e: int, x_RD: Tensor) -> Tensor:
        """Expert ``e`` on rows ``x_RD``."""
        up, down = cast(LowBitTensors, self.up[e]).weight(), cast(LowBitTensors, self.down[e]).weight()
        return down.linear(self._act(up.linear(x_RD)))

    def forward(self, x_RD: Tensor, counts_E: Tensor, backend: str = "grouped") -> Tensor:
        return experts_on_rows(self.expert, self.dim, x_RD, counts_E)

    def few_slots(
        self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, into_TD: Optional[Tensor] = None
    ) -> Tensor:
        """``into_TD + sum_k weights_TK * expert_k(x)`` for a few tokens, each chosen expert once;
        one float32 token whose chosen experts the native kernels hold takes one call of them."""
        if x_TD.shape[0] == 1 and x_TD.dtype == torch.float32 and x_TD.device.type == "cpu" and native.available():
            y_TD = self._native_token(x_TD, experts_TK, weights_TK, into_TD)
            if y_TD is not None:
                return y_TD
        return experts_on_tokens(self.expert, self.num_experts, self.dim, x_TD, experts_TK, weights_TK, into_TD)

    def prepare_decoding_(self) -> QuantizedExperts:
        """Make the native kernels' table now, anew (a compiled decode step only reads it; the
        buffers may have moved, e.g. onto huge pages)."""
        self._table = None
        if native.available():
            self._native_table([])
        return self

    def _native_token(
        self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, into_TD: Optional[Tensor]
    ) -> Optional[Tensor]:
        """:meth:`few_slots` for one float32 token in one call of the native kernels (the ids stay
        on the tensor: compiled, the call stays in the graph); None when an expert it needs is in a
        format they do not compute (int4): eagerly the token's experts, compiled every expert."""
        ids = None if torch.compiler.is_compiling() else [e for e in experts_TK[0].tolist() if e < self.num_experts]
        table = self._native_table(ids)
        if table is None:
            return None
        out_D = x_TD.new_zeros(self.dim) if into_TD is None else as_dtype(into_TD, torch.float32).reshape(-1).clone()
        native.experts(table, experts_TK[0], weights_TK[0], x_TD[0], self.hidden_dim, self.kind, out_D, block_threads())
        return out_D.view(1, self.dim)

    def _native_table(self, ids: Optional[list[int]] = None) -> Optional[native.ExpertTable]:
        """The native kernels' table of every expert's tensors, or None when an expert of ``ids``
        (None: of all) is not in a format they compute. Eagerly, ``ids``' buffers are checked to be
        the table's and the table remade when one was replaced (e.g. by ``.to()``)."""
        t = self._table
        if t is None and ids is None:  # compiling: tables are made eagerly (prepare_decoding_)
            return None
        if t is None or (ids is not None and not self._table_current(t, ids)):
            ws = list(zip(self.ups, self.downs))
            t = self._table = native.ExpertTable([(u.fmt, u.data, u.scales, d.data, d.scales) for u, d in ws])
        return t if (t.all_native if ids is None else all(t.native[e] >= 0 for e in ids)) else None

    def _table_current(self, t: native.ExpertTable, ids: list[int]) -> bool:
        ups, downs = self.up._modules, self.down._modules
        return all(
            cast(LowBitTensors, ups[str(e)])._buffers["data"] is t.tensors[e][0]
            and cast(LowBitTensors, ups[str(e)])._buffers["scales"] is t.tensors[e][1]
            and cast(LowBitTensors, downs[str(e)])._buffers["data"] is t.tensors[e][2]
            and cast(LowBitTensors, downs[str(e)])._buffers["scales"] is t.tensors[e][3]
            for e in ids
        )


def lowbit_linears(x: Tensor, modules: Sequence[nn.Module]) -> Optional[list[Tensor]]:
    """Several :class:`LowBitLinear` maps of one input in one call of the native kernels (an
    attention's q, k and v: one operator and one thread fork instead of three, ~35 us each at
    decode: benchmarks/RESULTS.md); None unless every module is a LowBitLinear without bias in a
    native format and ``x`` is a few float32 rows on the CPU."""
    if x.dtype != torch.float32 or not all(isinstance(m, LowBitLinear) and m.bias is None for m in modules):
        return None
    x_RI = x.reshape(-1, x.shape[-1])
    qs = [cast(LowBitLinear, m).q for m in modules]
    if not all(native.handles(q.fmt, x_RI, q.data) for q in qs):
        return None
    fmts, ws = [q.fmt for q in qs], [q.data for q in qs]
    scales = [q.scales if q.fmt == "int8" else None for q in qs]
    if torch.compiler.is_compiling():
        ys = native.linear_many_op(x_RI, ws, scales, [native.format_code(f) for f in fmts])
    else:
        ys = native.linear_many(x_RI, list(zip(fmts, ws, scales)), threads=block_threads())
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


def check_compilable(module: nn.Module) -> None:
    """ValueError naming the format unless every low-precision weight in ``module`` is one moekit's
    native CPU kernels compute (a compiled decode step calls them as operators; PyTorch's int4
    kernel and the per-expert loop break the graph)."""
    formats = {m.name for m in module.modules() if isinstance(m, LowBitTensors)}
    if not formats:
        return
    bad = sorted(f for f in formats if f not in native.FORMATS)
    if bad or not native.available():
        why = f"holds {', '.join(bad)} weights" if bad else "has low-bit weights and no C compiler built the kernels"
        raise ValueError(
            f"compiled decoding takes weights in {', '.join(native.FORMATS)} (moekit's native CPU kernels); "
            f"this model {why}: decode it without compile"
        )


ExpertFn = Callable[[int, Tensor], Tensor]  # (expert, rows) -> that expert's output on the rows


def experts_on_rows(expert: ExpertFn, dim: int, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    """The experts' seam's ``forward``, one expert call at a time: rows in expert order, ``counts_E`` per expert."""
    x_RD = as_dtype(x_RD, compute_dtype(x_RD))
    y_RD = x_RD.new_zeros(x_RD.shape[0], dim)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            y_RD[start : start + n] = expert(e, x_RD[start : start + n])
        start += n
    return y_RD


def experts_on_tokens(
    expert: ExpertFn,
    num_experts: int,
    dim: int,
    x_TD: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    into_TD: Optional[Tensor] = None,
) -> Tensor:
    """The seam's ``few_slots``, one call per chosen expert in order of first use (token-major):
    ``into_TD + sum_k weights_TK * expert_k(x)``; ids ``>= num_experts`` are empty slots."""
    x_TD = as_dtype(x_TD, compute_dtype(x_TD))
    out_TD = x_TD.new_zeros(x_TD.shape[0], dim) if into_TD is None else as_dtype(into_TD, x_TD.dtype)
    if x_TD.shape[0] == 1:  # decoding at batch 1: no gather or scatter
        jobs = [(e, w) for e, w in zip(experts_TK[0].tolist(), weights_TK[0].tolist()) if e < num_experts]
        return split_sum(jobs, lambda job, acc_TD: acc_TD.add_(expert(job[0], x_TD), alpha=job[1]), out_TD)
    rows: dict[int, list[tuple[int, int]]] = {}
    for t, row in enumerate(experts_TK.tolist()):
        for k, e in enumerate(row):
            if e < num_experts:
                rows.setdefault(e, []).append((t, k))
    w_TK = weights_TK.to(x_TD.dtype)
    for e, tk in rows.items():
        t_idx = torch.tensor([t for t, _ in tk])
        k_idx = torch.tensor([k for _, k in tk])
        out_TD.index_add_(0, t_idx, expert(e, x_TD[t_idx]) * w_TK[t_idx, k_idx].unsqueeze(-1))
    return out_TD


__all__ = [
    "LowBitFeedForward",
    "LowBitLinear",
    "LowBitTensors",
    "QuantizedExperts",
    "check_compilable",
    "experts_on_rows",
    "lowbit_linears",
    "experts_on_tokens",
]
