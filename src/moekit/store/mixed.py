"""Experts held in several low-bit formats (a run quantized with ``--quantize auto``, whose busy
experts got more bits: :func:`moekit.quantize.plan_formats`): one slot pool per format, so each
expert is held in its own format and costs its own bytes, behind the interface of one
:class:`~moekit.store.experts.ExpertPool` (global slot ids are the sub-pools' offset by the slots
before them).

The budget is split so that every format holds the same fraction of its experts (each at least one
layer's ``top_k`` experts of that format, or all of them: a call's experts of one format must be
resident together), each pool allocated once: the budget holds by construction, as with one format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

from ..kernels.lowbit import LowBitWeight, format_bytes
from .experts import ExpertPool, ExpertSource, Key, Reads, StoreStats
from .policies import Policy


def plan_mixed(
    budget_bytes: int, formats: Sequence[Sequence[str]], expert_bytes: dict[str, int], top_k: int
) -> dict[str, int]:
    """Slots per format for ``budget_bytes``: ``formats`` holds each MoE layer's experts' formats.
    Every format gets the same fraction of its experts (at least ``top_k`` of them, or all it has in
    the layer holding most); ValueError when even those minimums do not fit."""
    count = {f: sum(layer.count(f) for layer in formats) for f in expert_bytes}
    least = {f: min(count[f], top_k, max(layer.count(f) for layer in formats)) for f in expert_bytes}

    def slots_at(share: float) -> dict[str, int]:
        return {f: max(least[f], int(share * count[f] + 1e-9)) for f in expert_bytes}

    def cost(slots: dict[str, int]) -> int:
        return sum(n * expert_bytes[f] for f, n in slots.items())

    if cost(least) > budget_bytes:
        raise ValueError(
            f"expert memory of {budget_bytes} bytes cannot hold one layer's top_k={top_k} experts in each of "
            f"the run's formats ({', '.join(f'{least[f]} x {expert_bytes[f]} bytes in {f}' for f in expert_bytes)}): "
            f"give at least {cost(least)} bytes"
        )
    shares = sorted({n / count[f] for f in expert_bytes for n in range(count[f] + 1)})
    return slots_at(max(s for s in shares if cost(slots_at(s)) <= budget_bytes))  # the largest that fits


def format_expert_bytes(fmt: str, dim: int, up_width: int, hidden_dim: int) -> int:
    return format_bytes(fmt, up_width, dim) + format_bytes(fmt, dim, hidden_dim)


class MixedReads:
    """The sub-pools' :class:`~moekit.store.experts.Reads` of one call, by global slot."""

    def __init__(self, reads: list[tuple[int, int, Reads]]):
        self.reads = reads  # (first global slot, slot count, reads)

    def wait(self, slot: int) -> None:
        for start, n, r in self.reads:
            if start <= slot < start + n:
                r.wait(slot - start)

    def finish(self) -> None:
        error: Optional[BaseException] = None
        for _, _, r in self.reads:
            try:
                r.finish()
            except BaseException as err:  # noqa: BLE001 - every sub-pool's reads end before raising
                error = error or err
        if error is not None:
            raise error


class MixedPool:
    """One :class:`~moekit.store.experts.ExpertPool` per format, addressed as one."""

    fmt = "mixed"
    quantizes = False

    def __init__(
        self,
        source: ExpertSource,
        formats: dict[int, list[str]],
        slots: dict[str, int],
        dim: int,
        up_width: int,
        hidden_dim: int,
        policy: Callable[[], Policy],
    ):
        self.source, self.formats = source, formats
        self.pools: dict[str, ExpertPool] = {}
        self.start: dict[str, int] = {}
        n = 0
        for f, k in sorted(slots.items()):
            self.pools[f] = ExpertPool(source, k, dim, up_width, hidden_dim, policy(), fmt=f)
            self.start[f], n = n, n + k
        self.n_slots = n
        first = next(iter(self.pools.values()))
        self.policy = first.policy  # each format's pool has its own, of this kind
        self.up_SDH, self.down_SFD = first.up_SDH, first.down_SFD  # empty: for the experts' shape checks

    @property
    def slots(self) -> int:
        return self.n_slots

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools.values())

    @property
    def expert_bytes(self) -> int:
        """The average bytes of a slot (each format's pool holds its own)."""
        return self.nbytes // self.n_slots

    @property
    def file_expert_bytes(self) -> int:
        return self.expert_bytes

    def bytes_of(self, layer: int, experts: Sequence[int]) -> int:
        return sum(self.pools[self.formats[layer][e]].file_expert_bytes for e in experts)

    def _by_format(self, layer: int, experts: Sequence[int]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for e in experts:
            out.setdefault(self.formats[layer][e], []).append(e)
        return out

    def fits(self, layer: int, experts: Sequence[int]) -> bool:
        return all(len(set(es)) <= self.pools[f].slots for f, es in self._by_format(layer, experts).items())

    def begin(
        self, layer: int, experts: list[int], stats: StoreStats, inline: bool = False
    ) -> tuple[list[int], MixedReads]:
        groups = self._by_format(layer, experts)
        slot_of: dict[int, int] = {}
        reads = []
        for f, pool in self.pools.items():
            if f not in groups:
                pool.pinned = frozenset()  # this call needs none of that pool's experts
                continue
            got, r = pool.begin(layer, groups[f], stats, inline)
            slot_of.update((e, self.start[f] + s) for e, s in zip(groups[f], got))
            reads.append((self.start[f], pool.slots, r))
        return [slot_of[e] for e in experts], MixedReads(reads)

    def resident(self, layer: int, experts: list[int], stats: StoreStats) -> list[int]:
        slots, reads = self.begin(layer, experts, stats, inline=True)
        reads.finish()
        return slots

    def prefetch(self, layer: int, guess: list[int], stats: StoreStats) -> tuple[set[int], set[int]]:
        read: set[int] = set()
        for f, es in self._by_format(layer, guess).items():
            read |= self.pools[f].prefetch(layer, es, stats)[1]
        return set(guess), read

    def release_guess(self) -> None:
        for p in self.pools.values():
            p.release_guess()

    def slot_weights(self, s: int) -> tuple[LowBitWeight, LowBitWeight]:
        for f, pool in self.pools.items():
            if self.start[f] <= s < self.start[f] + pool.slots:
                return pool.slot_weights(s - self.start[f])
        raise IndexError(f"slot {s} of {self.n_slots}")

    def residents(self, layer: int) -> list[int]:
        return sorted(e for p in self.pools.values() for e in p.residents(layer))

    @property
    def slot_of(self) -> dict[Key, int]:
        return {k: self.start[f] + s for f, p in self.pools.items() for k, s in p.slot_of.items()}

    @property
    def loading(self) -> set[Key]:
        return set().union(*(p.loading for p in self.pools.values()))


__all__ = ["MixedPool", "MixedReads", "format_expert_bytes", "plan_mixed"]
