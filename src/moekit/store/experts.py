"""Experts on a memory budget: a fixed pool of slots per MoE layer, filled from the slow tier (a
safetensors file read by byte range) as routing asks for experts, behind the layer's experts
seam (:class:`~moekit.layer.experts.StackedExperts`): the layer and its paths do not know.

The pool is allocated once, so the budget holds by construction. A call first makes every
expert it needs resident (a hit costs nothing, a miss one read into a slot the policy frees),
then computes exactly what :class:`~moekit.layer.experts.GroupedExperts` computes, on the pool's
slots instead of the full stack: the same kernels on the same per-expert shapes, so outputs are
bit-identical to the all-in-memory model's. A call that needs more experts than the pool has
slots (a long prompt) is served in chunks of at most that many experts.

Shape legend: R rows in expert order, T tokens, K slots per token, D width, F expert width, H
up-projection width (2F when gated), E experts, S pool slots.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
from torch import Tensor

from ..kernels import as_dtype, compute_dtype
from ..kernels.slots import slot_ffn
from ..layer.experts import ACTIVATIONS, GATED, StackedExperts, stacked_ffn
from .policies import Policy, _chunks


class ExpertSource(Protocol):
    """The slow tier: expert ``e`` of MoE layer ``layer`` read into slot tensors ``up_DH`` and
    ``down_FD`` (moekit's layout: ``x @ up`` then ``act(.) @ down``)."""

    def read_expert(self, layer: int, e: int, up_DH: Tensor, down_FD: Tensor) -> None: ...

    def check(self, layer: int, num_experts: int, up_DH: tuple[int, ...], down_FD: tuple[int, ...]) -> None:
        """Raise (naming the tensor) unless ``layer`` has ``num_experts`` experts of these shapes."""
        ...


@dataclass
class StoreStats:
    """What one layer's pool did: accesses that found their expert resident, those that read it,
    bytes read and seconds spent reading."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    trace: Optional[list[list[int]]] = field(default=None, repr=False)  # experts of each call, when recording

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else float("nan")


@dataclass
class PrefetchStats:
    """Guessed experts (a prefetch's whole guess) against those the next call needed, summed over
    the calls that had a guess."""

    guessed: int = 0
    needed: int = 0
    right: int = 0  # guessed and needed
    wasted_bytes: int = 0  # read by a prefetch for an expert the next call did not need

    @property
    def precision(self) -> float:
        return self.right / self.guessed if self.guessed else float("nan")

    @property
    def recall(self) -> float:
        return self.right / self.needed if self.needed else float("nan")


class StoredExperts(StackedExperts):
    """One MoE layer's experts as ``slots`` resident copies out of ``num_experts`` on ``source``."""

    def __init__(
        self,
        source: ExpertSource,
        layer: int,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        kind: str,
        slots: int,
        policy: Policy,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"expert must be one of {', '.join(map(repr, ACTIVATIONS))}; got {kind!r}")
        if not 1 <= slots <= num_experts:
            raise ValueError(f"slots must be in 1..num_experts ({num_experts}); got {slots}")
        self.source, self.layer, self.policy = source, layer, policy
        self.num_experts, self.dim, self.hidden_dim, self.kind = num_experts, dim, hidden_dim, kind
        h = hidden_dim * (2 if GATED[kind] else 1)
        source.check(layer, num_experts, (dim, h), (hidden_dim, dim))
        # plain tensors, not parameters or buffers: not in state_dict, not moved by .to()
        self.up_SDH = torch.zeros(slots, dim, h, dtype=dtype)  # zeros: some forms compute every slot (weight 0)
        self.down_SFD = torch.zeros(slots, hidden_dim, dim, dtype=dtype)
        self._views = (self.up_SDH.unbind(0), self.down_SFD.unbind(0))  # the pool never moves
        self.holder_S: list[Optional[int]] = [None] * slots  # the expert in each slot
        self.slot_of: dict[int, int] = {}
        self.stats = StoreStats()
        self.prefetch_stats = PrefetchStats()
        self._pending: Optional[Future] = None  # a prefetch into this pool, running on another thread

    @property
    def slots(self) -> int:
        return self.up_SDH.shape[0]

    @property
    def expert_bytes(self) -> int:
        return (self.up_SDH[0].numel() + self.down_SFD[0].numel()) * self.up_SDH.element_size()

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, slots={self.slots}, policy={self.policy.name}"

    # ------------------------------------------------------------------ residency
    def expect(self, prefetch: Future) -> None:
        """A prefetch into this pool has started (``prefetch`` returns its (guess, read) sets)."""
        self._pending = prefetch

    def prefetch(self, guess: list[int]) -> tuple[set[int], set[int]]:
        """Make ``guess`` (at most ``slots`` ids) resident, on the prefetch thread, without counting
        accesses (the call that follows counts them); (guess, experts read)."""
        pinned, read = set(guess), set()
        for e in guess:
            if e not in self.slot_of:
                self._load(e, self._free_slot(pinned))
                read.add(e)
        return pinned, read

    def _settle(self, needed: list[int]) -> None:
        """Wait for a pending prefetch and score its guess against what this call needs."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        guess, read = pending.result()  # a read error surfaces here, in the caller's thread
        st, want = self.prefetch_stats, set(needed)
        st.guessed, st.needed, st.right = st.guessed + len(guess), st.needed + len(want), st.right + len(guess & want)
        st.wasted_bytes += len(read - want) * self.expert_bytes

    def resident(self, experts: list[int]) -> list[int]:
        """Make ``experts`` (at most ``slots`` distinct ids) resident; their slots, in order."""
        pinned = set(experts)
        out = []
        for e in experts:
            s = self.slot_of.get(e)
            if s is None:
                s = self._free_slot(pinned)
                self._load(e, s)
                self.stats.misses += 1
            else:
                self.stats.hits += 1
            self.policy.touch(e)
            out.append(s)
        return out

    def _free_slot(self, pinned: set[int]) -> int:
        if None in self.holder_S:
            return self.holder_S.index(None)
        out = self.policy.victim(e for e in self.slot_of if e not in pinned)
        self.policy.forget(out)
        s = self.slot_of.pop(out)
        self.holder_S[s] = None
        return s

    def _load(self, e: int, s: int) -> None:
        t0 = time.perf_counter()
        self.source.read_expert(self.layer, e, self.up_SDH[s], self.down_SFD[s])
        self.stats.read_s += time.perf_counter() - t0
        self.stats.bytes_read += self.expert_bytes
        self.holder_S[s], self.slot_of[e] = e, s

    def _record(self, experts: list[int]) -> None:
        if self.stats.trace is not None:
            self.stats.trace.append(experts)

    # ------------------------------------------------------------------ the experts seam
    def forward(self, x_RD: Tensor, counts_E: Tensor, backend: str = "grouped") -> Tensor:
        """The stacked FFN of each row's expert (rows in expert order, ``counts_E`` per expert),
        one chunk of at most ``slots`` experts at a time."""
        counts = counts_E.tolist()
        starts = [0] * len(counts)
        for e in range(1, len(counts)):
            starts[e] = starts[e - 1] + counts[e - 1]
        needed = [e for e, c in enumerate(counts) if c]
        self._settle(needed)
        self._record(needed)
        y_RD: Optional[Tensor] = None
        for chunk in _chunks(needed, self.slots):
            if not chunk:
                continue
            by_slot = sorted(zip(self.resident(chunk), chunk))
            rows_R = torch.cat([torch.arange(starts[e], starts[e] + counts[e]) for _, e in by_slot])
            counts_S = torch.zeros(self.slots, dtype=counts_E.dtype)
            for s, e in by_slot:
                counts_S[s] = counts[e]
            y = stacked_ffn(x_RD[rows_R], counts_S, self.up_SDH, self.down_SFD, self.kind, backend)
            if y_RD is None:  # the dtype the kernels gave (autocast's, or the rows')
                y_RD = y.new_zeros(x_RD.shape[0], self.dim)
            y_RD[rows_R] = y[: rows_R.numel()]
        return y_RD if y_RD is not None else x_RD.new_zeros(x_RD.shape[0], self.dim)

    def few_slots(
        self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, into_TD: Optional[Tensor] = None
    ) -> Tensor:
        """``into_TD + sum_k weights_TK * expert_k(x)`` for a few tokens, on the pool's slots."""
        x_TD = as_dtype(x_TD, compute_dtype(x_TD))
        w_up, w_down = self.up_SDH, self.down_SFD
        views: Optional[tuple] = self._views
        if w_up.dtype != x_TD.dtype:  # under autocast: the matmuls' dtype, as GroupedExperts casts
            w_up, w_down, views = w_up.to(x_TD.dtype), w_down.to(x_TD.dtype), None
        if into_TD is not None:
            into_TD = as_dtype(into_TD, x_TD.dtype)
        wanted = sorted(e for e in set(experts_TK.reshape(-1).tolist()) if e < self.num_experts)
        self._settle(wanted)
        self._record(wanted)
        act = ACTIVATIONS[self.kind]
        chunks = _chunks(wanted, self.slots)
        for i, chunk in enumerate(chunks):
            slot_of_E = torch.full((self.num_experts + 1,), self.slots, dtype=experts_TK.dtype)
            slot_of_E[chunk] = torch.tensor(self.resident(chunk), dtype=experts_TK.dtype)
            slots_TK = slot_of_E[experts_TK.clamp(max=self.num_experts)]
            if into_TD is None and i + 1 < len(chunks):
                into_TD = x_TD.new_zeros(x_TD.shape[0], self.dim)
            into_TD = slot_ffn(x_TD, slots_TK, weights_TK, w_up, w_down, act, into_TD, views)
        assert into_TD is not None  # _chunks gives at least one chunk
        return into_TD
