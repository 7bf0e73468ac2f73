"""Experts on a memory budget: one fixed pool of slots shared by every MoE layer, filled from the
slow tier (a safetensors file read by byte range) as routing asks for experts, behind the layer's
experts seam (:class:`~moekit.layer.experts.StackedExperts`): the layer and its paths do not know.

The pool is allocated once, so the budget holds by construction. It is shared: decoding runs the
layers one after another, so a token needs only one layer's ``top_k`` experts resident at a time,
and the policy decides across layers which of the others to keep (a budget of ``top_k`` experts
runs any depth; a layer whose routing is skewed keeps fewer slots than one that spreads). A call
first makes every expert it needs resident (a hit costs nothing, a miss one read into a slot the
policy frees), then computes exactly what :class:`~moekit.layer.experts.GroupedExperts` computes,
on the pool's slots instead of the full stack: the same kernels on the same per-expert shapes, so
outputs are bit-identical to the all-in-memory model's. A call that needs more experts than the
pool has slots (a long prompt) is served in chunks of at most that many experts.

Shape legend: R rows in expert order, T tokens, K slots per token, D width, F expert width, H
up-projection width (2F when gated), E experts, S pool slots.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Optional, Protocol, Union, cast

import torch
from torch import Tensor

from ..kernels import as_dtype, compute_dtype
from ..kernels.lowbit import LowBitWeight
from ..kernels.slots import slot_ffn
from ..layer.experts import ACTIVATIONS, GATED, StackedExperts, stacked_ffn
from ..layer.lowbit import experts_on_rows, experts_on_tokens
from .policies import Policy, _chunks

if TYPE_CHECKING:
    from .mixed import MixedPool


class ExpertSource(Protocol):
    """The slow tier: expert ``e`` of MoE layer ``layer`` read into slot tensors ``up_DH`` and
    ``down_FD`` (moekit's layout: ``x @ up`` then ``act(.) @ down``)."""

    def read_expert(self, layer: int, e: int, up_DH: Tensor, down_FD: Tensor) -> None: ...

    def check(self, layer: int, num_experts: int, up_DH: tuple[int, ...], down_FD: tuple[int, ...]) -> None:
        """Raise (naming the tensor) unless ``layer`` has ``num_experts`` experts of these shapes."""
        ...


class LowBitSource(ExpertSource, Protocol):
    """A slow tier of low-bit experts (:mod:`moekit.kernels.lowbit`): expert ``e``'s up and down
    projections' tensors (``data``, ``scales``, ``zeros`` as its format has them, ``(out, in)``)
    read into the slot's ``up`` / ``down`` tensors."""

    def read_lowbit(self, layer: int, e: int, up: dict[str, Tensor], down: dict[str, Tensor]) -> None: ...


def quantize_into(dst: dict[str, Tensor], w_OI: Tensor) -> None:
    """``w_OI`` (float, (out, in)) into a low-bit slot's tensors ``dst`` in the format they are laid
    out for (float ``data``; int8 ``data`` + ``scales``; int4 ``data`` + ``scales`` + ``zeros``, its
    group from their shapes): a float file's expert held in fewer bytes (quantized as it is read)."""
    if set(dst) == {"data"}:
        dst["data"].copy_(w_OI)
        return
    if "zeros" in dst:
        fmt = f"int4:{w_OI.shape[1] // dst['scales'].shape[-1]}"
    else:
        fmt = "int8"
    for k, t in LowBitWeight.quantize(w_OI, fmt).tensors().items():
        dst[k].copy_(t)


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


Key = tuple[int, int]  # (MoE layer ordinal, expert)
# parallel reads of one call's misses: on this project's machine (virtio disk) 4 concurrent
# 4 MiB reads gave 1.08 GB/s against 0.66 GB/s one at a time (benchmarks/RESULTS.md)
READERS = 4


class ExpertPool:
    """``slots`` resident experts of one shape, shared by the layers that read from ``source``,
    keyed (layer, expert); ``policy`` picks the victim across layers. The running call's experts
    are pinned (``resident``) until the next call; a prefetch (another thread) fills free or
    evictable slots with the next layer's guess, one expert per lock hold."""

    def __init__(
        self,
        source: ExpertSource,
        slots: int,
        dim: int,
        up_width: int,
        hidden_dim: int,
        policy: Policy,
        dtype: torch.dtype = torch.float32,
        fmt: Optional[str] = None,
    ):
        if slots < 1:
            raise ValueError(f"slots must be >= 1; got {slots}")
        self.source, self.policy, self.fmt = source, policy, fmt
        self.n_slots = slots
        # plain tensors, not parameters or buffers: not in state_dict, not moved by .to()
        self.up_SDH = torch.zeros(slots if fmt is None else 0, dim, up_width, dtype=dtype)  # zeros: some forms
        self.down_SFD = torch.zeros(slots if fmt is None else 0, hidden_dim, dim, dtype=dtype)  # compute every slot
        self.views = (self.up_SDH.unbind(0), self.down_SFD.unbind(0))  # the pool never moves
        # a low-bit pool (fmt: moekit.kernels.lowbit): each projection's tensors with a leading slot dimension
        self.lowbit: dict[str, dict[str, Tensor]] = {}
        self._weights: dict[int, tuple[LowBitWeight, LowBitWeight]] = {}
        self._staging = threading.local()
        if fmt is not None:  # int4 slots hold the kernel's layout (converted once per read, same bytes)
            self._shapes = {"up": (up_width, dim), "down": (dim, hidden_dim)}
            for role, (n_out, n_in) in self._shapes.items():
                one = LowBitWeight.empty(fmt, n_out, n_in)
                kernel = one.kernel_tensors()  # int4: the kernel's layout; others: as stored
                self.lowbit[role] = {k: torch.zeros(slots, *t.shape, dtype=t.dtype) for k, t in kernel.items()}
            self._format = (one.fmt, one.group_size)
        self.holder_S: list[Optional[Key]] = [None] * slots  # the expert in each slot
        self.slot_of: dict[Key, int] = {}
        self.pinned: frozenset[Key] = frozenset()  # the running call's experts: never evicted
        self.guarded: frozenset[Key] = frozenset()  # a pending prefetch's guess: evicted last
        self.loading: set[Key] = set()  # reserved slots whose read is in flight: never evicted
        self._lock = threading.Lock()
        self._read_done = threading.Condition(self._lock)
        self._pool: Optional[ThreadPoolExecutor] = None

    @property
    def slots(self) -> int:
        return self.n_slots

    @property
    def nbytes(self) -> int:
        return (
            self.up_SDH.nbytes + self.down_SFD.nbytes + sum(t.nbytes for r in self.lowbit.values() for t in r.values())
        )

    @property
    def expert_bytes(self) -> int:
        return self.nbytes // self.n_slots

    @property
    def file_expert_bytes(self) -> int:
        """Bytes one miss reads from the slow tier: the slot's, or the file's when the slot holds
        the expert in fewer bytes than the file (quantized as it is read)."""
        return getattr(self.source, "expert_file_bytes", None) or self.expert_bytes

    def slot_weights(self, s: int) -> tuple[LowBitWeight, LowBitWeight]:
        """A low-bit pool's slot ``s`` as (up, down) weights (views of the pool's tensors)."""
        w = self._weights.get(s)
        if w is None:
            fmt, group = self._format
            up, down = (
                LowBitWeight.of_kernel_tensors(fmt, group, {k: t[s] for k, t in self.lowbit[r].items()})
                for r in ("up", "down")
            )
            w = self._weights[s] = (up, down)
        return w

    def resident(self, layer: int, experts: list[int], stats: StoreStats) -> list[int]:
        """Make ``experts`` of ``layer`` (at most ``slots`` distinct ids) resident and pin them
        until the next call; their slots, in order. Hits and misses go to ``stats``; the misses
        are read together (:meth:`begin`, then waited for)."""
        slots, reads = self.begin(layer, experts, stats, inline=True)
        reads.finish()
        return slots

    def begin(self, layer: int, experts: list[int], stats: StoreStats, inline: bool = False) -> tuple[list[int], Reads]:
        """:meth:`resident` without waiting: the misses' reads are started (their parts several at
        once, in order, on the reader threads) and returned with the slots; the caller waits for
        a slot with ``Reads.wait`` and must end with ``Reads.finish()``. ``inline``: a single
        one-part read runs in this thread (no hand-off)."""
        keys = [(layer, e) for e in experts]
        out, loads = [], []
        with self._lock:
            self.pinned = frozenset(keys)
            for k in keys:
                s = self.slot_of.get(k)
                if s is None:
                    s = self._reserve(k, self.pinned, wait=True)
                    assert s is not None  # pinned <= slots: a slot frees once the reads in flight end
                    loads.append((k, s))
                    stats.misses += 1
                else:
                    stats.hits += 1
                self.policy.touch(k)
                out.append(s)
        return out, Reads(self, loads, stats, inline)

    def prefetch(self, layer: int, guess: list[int], stats: StoreStats) -> tuple[set[int], set[int]]:
        """Make ``guess`` of ``layer`` resident where room is (free slots, or experts neither
        pinned, guessed nor being read), counting bytes read in ``stats`` but no accesses;
        (guess, experts read)."""
        keys = [(layer, e) for e in guess]
        self.guarded = frozenset(keys)
        loads = []
        with self._lock:
            for k in keys:
                if k in self.slot_of:
                    continue
                s = self._reserve(k, self.pinned | self.guarded, wait=False)
                if s is None:
                    break
                loads.append((k, s))
        self._read(loads, stats)
        return set(guess), {k[1] for k, _ in loads}

    def release_guess(self) -> None:
        self.guarded = frozenset()

    def fits(self, layer: int, experts: list[int]) -> bool:
        """Whether ``experts`` of ``layer`` can be resident together."""
        return len(set(experts)) <= self.n_slots

    def bytes_of(self, layer: int, experts: list[int]) -> int:
        """Bytes reading ``experts`` of ``layer`` costs on the slow tier."""
        return len(experts) * self.file_expert_bytes

    def _reserve(self, key: Key, keep: frozenset[Key], wait: bool) -> Optional[int]:
        """A slot for ``key`` (held under the lock): free, or the policy's victim among experts
        neither in ``keep`` nor being read; with ``wait``, waits for reads in flight to end when
        every candidate is one. The slot is marked as being read until :meth:`_read` ends."""
        s = self._free_slot(keep)
        while s is None and wait and self.loading:
            self._read_done.wait()
            s = self._free_slot(keep)
        if s is not None:
            self.holder_S[s], self.slot_of[key] = key, s
            self.loading.add(key)
        return s

    def _free_slot(self, keep: frozenset[Key]) -> Optional[int]:
        if None in self.holder_S:
            return self.holder_S.index(None)
        movable = [k for k in self.slot_of if k not in keep and k not in self.loading]
        candidates = [k for k in movable if k not in self.guarded] or movable
        if not candidates:
            return None
        out = self.policy.victim(candidates)
        self.policy.forget(out)
        s = self.slot_of.pop(out)
        self.holder_S[s] = None
        return s

    def _read(self, loads: list[tuple[Key, int]], stats: StoreStats) -> None:
        Reads(self, loads, stats, inline=True).finish()

    def _parts(self, key: Key, s: int) -> list[Callable[[], object]]:
        """The independent reads that fill slot ``s`` with ``key`` (a float source's tensors one by
        one, when it offers them: ``read_parts``; else the whole expert as one)."""
        parts = getattr(self.source, "read_parts", None)
        if self.fmt is None and parts is not None:
            return parts(key[0], key[1], self.up_SDH[s], self.down_SFD[s])
        return [partial(self._read_one, key, s)]

    def _finish(self, loads: list[tuple[Key, int]]) -> None:
        for k, _ in loads:
            self.loading.discard(k)
        self._read_done.notify_all()

    def _read_one(self, key: Key, s: int) -> None:
        if self.fmt is None:
            self.source.read_expert(key[0], key[1], self.up_SDH[s], self.down_SFD[s])
            return
        fmt, group = self._format
        slot = {r: {k: t[s] for k, t in self.lowbit[r].items()} for r in ("up", "down")}
        if fmt != "int4":
            cast(LowBitSource, self.source).read_lowbit(key[0], key[1], slot["up"], slot["down"])
            return
        staged = {r: self._staged(r) for r in ("up", "down")}  # the stored layout, then the kernel's
        cast(LowBitSource, self.source).read_lowbit(key[0], key[1], staged["up"], staged["down"])
        for r in ("up", "down"):
            fresh = LowBitWeight(fmt, group_size=group, **staged[r])  # its kernel layout made from this expert
            for k, t in fresh.kernel_tensors().items():
                slot[r][k].copy_(t)

    def _staged(self, role: str) -> dict[str, Tensor]:
        """This thread's reusable tensors in the stored int4 layout (reads land here first)."""
        cache = self._staging.__dict__.setdefault("w", {})
        if role not in cache:
            fmt, group = self._format
            cache[role] = LowBitWeight.empty(f"{fmt}:{group}", *self._shapes[role]).tensors()
        return cache[role]

    @property
    def quantizes(self) -> bool:
        """The pool quantizes a float file's experts as it reads them: compute, with float32
        temporaries of a whole projection, done in the caller's thread (on 2 cores, reader threads
        were no faster and held 0.35 GiB more: benchmarks/RESULTS.md)."""
        return (
            self.fmt is not None and self._format[0] in ("int8", "int4") and self.file_expert_bytes > self.expert_bytes
        )

    def _readers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="moekit-read")
        return self._pool

    def residents(self, layer: int) -> list[int]:
        """The experts of ``layer`` resident now."""
        return sorted(e for (i, e) in self.slot_of if i == layer)


class Reads:
    """One call's misses being read into their reserved slots: each miss's parts run on the pool's
    reader threads, in the order the call needs the experts, several at once (the slow tier serves
    parallel reads faster: :data:`READERS`), so the first experts are in while later ones are still
    read and the call can compute on them (:meth:`wait`). :meth:`finish` waits for every part and
    books the reads; a failed part frees every slot of the call's reads and raises."""

    def __init__(self, pool: ExpertPool, loads: list[tuple[Key, int]], stats: StoreStats, inline: bool = False):
        self.pool, self.loads, self.stats = pool, loads, stats
        self.t0 = time.perf_counter()
        self.ends: list[float] = []
        self.futures: dict[int, list[Future]] = {}
        parts = [(s, part) for k, s in loads for part in pool._parts(k, s)]
        here = (inline and len(parts) == 1) or pool.quantizes  # run in this thread, not on the readers
        for s, part in parts:
            if here:
                f: Future = Future()
                try:
                    self._run(part)
                    f.set_result(None)
                except BaseException as err:  # noqa: BLE001 - raised again by wait / finish
                    f.set_exception(err)
            else:
                f = pool._readers().submit(self._run, part)
            self.futures.setdefault(s, []).append(f)

    def _run(self, part: Callable[[], object]) -> None:
        part()
        self.ends.append(time.perf_counter())

    def wait(self, slot: int) -> None:
        """Until slot ``slot``'s expert is in (at once for a hit); its read's error, if it failed."""
        for f in self.futures.get(slot, ()):
            f.result()

    def finish(self) -> None:
        error: Optional[BaseException] = None
        for fs in self.futures.values():
            for f in fs:
                err = f.exception()
                error = error or err
        pool, loads = self.pool, self.loads
        with pool._lock:
            if error is not None:
                for k, s in loads:
                    if pool.slot_of.get(k) == s:
                        del pool.slot_of[k]
                        pool.holder_S[s] = None
                        pool.policy.forget(k)
            else:
                self.stats.read_s += max(self.ends, default=self.t0) - self.t0
                self.stats.bytes_read += len(loads) * pool.file_expert_bytes
            pool._finish(loads)
        self.loads, self.futures = [], {}  # finished once
        if error is not None:
            raise error


class _ReadyViews:
    """A pool's per-slot views whose item waits for that slot's read: an eager decode loop over
    the chosen experts computes on those already in while the rest are read."""

    def __init__(self, views: Sequence[Tensor], reads: Reads):
        self.views, self.reads = views, reads

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, slot: int) -> Tensor:
        self.reads.wait(slot)
        return self.views[slot]


class StoredExperts(StackedExperts):
    """One MoE layer's ``num_experts`` experts, read from ``pool``'s source into its shared slots."""

    def __init__(
        self, pool: Union[ExpertPool, MixedPool], layer: int, num_experts: int, dim: int, hidden_dim: int, kind: str
    ):
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"expert must be one of {', '.join(map(repr, ACTIVATIONS))}; got {kind!r}")
        h = hidden_dim * (2 if GATED[kind] else 1)
        if tuple(pool.up_SDH.shape[1:]) != (dim, h) or tuple(pool.down_SFD.shape[1:]) != (hidden_dim, dim):
            raise ValueError(
                f"the pool's slots hold experts of shapes {tuple(pool.up_SDH.shape[1:])} / "
                f"{tuple(pool.down_SFD.shape[1:])}; layer {layer} has ({dim}, {h}) / ({hidden_dim}, {dim})"
            )
        pool.source.check(layer, num_experts, (dim, h), (hidden_dim, dim))
        self.pool, self.layer = pool, layer
        self.num_experts, self.dim, self.hidden_dim, self.kind = num_experts, dim, hidden_dim, kind
        self.stats = StoreStats()
        self.prefetch_stats = PrefetchStats()
        self._pending: Optional[Future] = None  # a prefetch into the pool, running on another thread

    @property
    def slots(self) -> int:
        """Slots of the (shared) pool: the most experts one call can have resident at once."""
        return self.pool.slots

    @property
    def policy(self) -> Policy:
        return self.pool.policy

    @property
    def expert_bytes(self) -> int:
        return self.pool.expert_bytes

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, pool slots={self.slots}, policy={self.policy.name}"

    # ------------------------------------------------------------------ residency
    def expect(self, prefetch: Future) -> None:
        """A prefetch for this layer has started (``prefetch`` returns its (guess, read) sets)."""
        self._pending = prefetch

    def prefetch(self, guess: list[int]) -> tuple[set[int], set[int]]:
        """Read ``guess`` into the pool where room is, on the prefetch thread (see :class:`ExpertPool`)."""
        return self.pool.prefetch(self.layer, guess, self.stats)

    def _settle(self, needed: list[int]) -> None:
        """Wait for a pending prefetch and score its guess against what this call needs."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            guess, read = pending.result()  # a read error surfaces here, in the caller's thread
        finally:
            self.pool.release_guess()
        st, want = self.prefetch_stats, set(needed)
        st.guessed, st.needed, st.right = st.guessed + len(guess), st.needed + len(want), st.right + len(guess & want)
        st.wasted_bytes += self.pool.bytes_of(self.layer, sorted(read - want))

    def resident(self, experts: list[int]) -> list[int]:
        """Make ``experts`` (at most ``slots`` distinct ids) resident; their slots, in order."""
        return self.pool.resident(self.layer, experts, self.stats)

    def _record(self, experts: list[int]) -> None:
        if self.stats.trace is not None:
            self.stats.trace.append(experts)

    # ------------------------------------------------------------------ the experts seam
    def _lowbit_expert(self, e: int, x_RD: Tensor) -> Tensor:
        """Expert ``e`` on rows ``x_RD`` from a low-bit pool (made resident alone)."""
        return self._lowbit_in(self.resident([e])[0], x_RD)

    def _lowbit_in(self, s: int, x_RD: Tensor) -> Tensor:
        up, down = self.pool.slot_weights(s)
        return down.linear(ACTIVATIONS[self.kind](up.linear(x_RD)))

    def _lowbit_call(self, needed: list[int], run: Callable) -> Tensor:
        """``run(expert)`` for a low-bit pool: when the call's experts fit the pool at once, their
        reads start together and each expert computes as soon as it is in; else one at a time."""
        self._settle(needed)
        self._record(sorted(needed))
        if not self.pool.fits(self.layer, needed):
            return run(self._lowbit_expert)
        slots, reads = self.pool.begin(self.layer, needed, self.stats)
        slot_of = dict(zip(needed, slots))

        def expert(e: int, x_RD: Tensor) -> Tensor:
            reads.wait(slot_of[e])
            return self._lowbit_in(slot_of[e], x_RD)

        try:
            return run(expert)
        finally:
            reads.finish()

    def forward(self, x_RD: Tensor, counts_E: Tensor, backend: str = "grouped") -> Tensor:
        """The stacked FFN of each row's expert (rows in expert order, ``counts_E`` per expert),
        one chunk of at most ``slots`` experts at a time."""
        if self.pool.fmt is not None:
            needed = [e for e, c in enumerate(counts_E.tolist()) if c]
            return self._lowbit_call(needed, lambda expert: experts_on_rows(expert, self.dim, x_RD, counts_E))
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
            y = stacked_ffn(x_RD[rows_R], counts_S, self.pool.up_SDH, self.pool.down_SFD, self.kind, backend)
            if y_RD is None:  # the dtype the kernels gave (autocast's, or the rows')
                y_RD = y.new_zeros(x_RD.shape[0], self.dim)
            y_RD[rows_R] = y[: rows_R.numel()]
        return y_RD if y_RD is not None else x_RD.new_zeros(x_RD.shape[0], self.dim)

    def few_slots(
        self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, into_TD: Optional[Tensor] = None
    ) -> Tensor:
        """``into_TD + sum_k weights_TK * expert_k(x)`` for a few tokens, on the pool's slots."""
        if self.pool.fmt is not None:  # in order of first use: the order the experts are computed
            wanted = list(dict.fromkeys(e for e in experts_TK.reshape(-1).tolist() if e < self.num_experts))
            args = (x_TD, experts_TK, weights_TK, into_TD)
            return self._lowbit_call(
                wanted, lambda expert: experts_on_tokens(expert, self.num_experts, self.dim, *args)
            )
        x_TD = as_dtype(x_TD, compute_dtype(x_TD))
        w_up, w_down = self.pool.up_SDH, self.pool.down_SFD
        views: Optional[tuple] = self.pool.views
        if w_up.dtype != x_TD.dtype:  # under autocast: the matmuls' dtype, as GroupedExperts casts
            w_up, w_down, views = w_up.to(x_TD.dtype), w_down.to(x_TD.dtype), None
        if into_TD is not None:
            into_TD = as_dtype(into_TD, x_TD.dtype)
        # chunks in order of first use (token-major), so the additions into each token's row run
        # in the order the whole stack's loop makes them: bit-identical when chunked too
        wanted = list(dict.fromkeys(e for e in experts_TK.reshape(-1).tolist() if e < self.num_experts))
        self._settle(wanted)
        self._record(sorted(wanted))
        act = ACTIVATIONS[self.kind]
        stack_bytes = self.num_experts * self.expert_bytes
        chunks = _chunks(wanted, self.slots)
        # decoding one token eagerly loops over the chosen experts in order: it computes each as
        # soon as its read is in (the same ops in the same order: the same bits)
        overlap = len(chunks) == 1 and x_TD.shape[0] == 1 and views is not None and not torch.compiler.is_compiling()
        for i, chunk in enumerate(chunks):
            reads: Optional[Reads] = None
            in_views: Optional[tuple] = views
            if overlap and views is not None:
                slots, reads = self.pool.begin(self.layer, chunk, self.stats)
                in_views = (_ReadyViews(views[0], reads), _ReadyViews(views[1], reads))
            else:
                slots = self.resident(chunk)
            try:
                slot_of_E = torch.full((self.num_experts + 1,), self.slots, dtype=experts_TK.dtype)
                slot_of_E[chunk] = torch.tensor(slots, dtype=experts_TK.dtype)
                slots_TK = slot_of_E[experts_TK.clamp(max=self.num_experts)]
                if into_TD is None and i + 1 < len(chunks):
                    into_TD = x_TD.new_zeros(x_TD.shape[0], self.dim)
                into_TD = slot_ffn(x_TD, slots_TK, weights_TK, w_up, w_down, act, into_TD, in_views, stack_bytes)
            finally:
                if reads is not None:
                    reads.finish()
        assert into_TD is not None  # _chunks gives at least one chunk
        return into_TD
