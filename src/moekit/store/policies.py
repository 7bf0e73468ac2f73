"""Which resident expert a full slot pool gives up: LRU, LFU, a frequency-times-recency policy,
and Belady's optimum (offline) to score them against on a recorded routing trace.

A policy sees a pool's accesses in order (``touch``; keys are expert ids, or (layer, expert) in
the pool the store shares across layers) and picks a victim among the resident experts that the
current call does not need (``victim``). Time is counted in accesses, so a
trace replays the same way whatever the machine's speed.

MoE access is skewed (a few experts take most tokens) and bursty (consecutive tokens of a text
share experts): LRU forgets the popular experts after one burst elsewhere, LFU keeps experts that
were popular long ago. LFRU (Lee et al. 1999, "LRFU") weighs each past access by
``2 ** (-age / half_life)``, so it moves between the two with one parameter; cache studies of MoE
decoding (e.g. MoE-Infinity, Xue et al. 2024) report such recency-weighted frequency far ahead of
LRU and LFU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

Key = Any  # an expert id, or (layer, expert) in a pool shared by layers; hashable and ordered


class Policy:
    """Eviction order for a slot pool."""

    name = "policy"

    def __init__(self) -> None:
        self.clock = 0

    def touch(self, expert: Key) -> None:
        """An access to ``expert`` (a hit, or a miss that loaded it)."""
        self.clock += 1

    def forget(self, expert: Key) -> None:
        """``expert`` left the pool."""

    def victim(self, resident: Iterable[Key]) -> Key:
        """The expert to evict among ``resident`` (all evictable)."""
        raise NotImplementedError


class LRU(Policy):
    """Least recently used."""

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[Key, int] = {}

    def touch(self, expert: Key) -> None:
        super().touch(expert)
        self.last[expert] = self.clock

    def victim(self, resident: Iterable[Key]) -> Key:
        return min(resident, key=lambda e: self.last.get(e, -1))


class LFU(Policy):
    """Least frequently used (counts kept while evicted; ties to the least recent)."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[Key, int] = {}
        self.last: dict[Key, int] = {}

    def touch(self, expert: Key) -> None:
        super().touch(expert)
        self.count[expert] = self.count.get(expert, 0) + 1
        self.last[expert] = self.clock

    def victim(self, resident: Iterable[Key]) -> Key:
        return min(resident, key=lambda e: (self.count.get(e, 0), self.last.get(e, -1)))


class LFRU(Policy):
    """Recency-weighted frequency (LRFU): score = sum over past accesses of 2^(-age / half_life),
    kept as one decayed number per expert; the lowest score is evicted.

    In a pool shared by ``layers`` layers (keys ``(layer, expert)``, layers called in turn), a
    resident expert's score is divided by how many layer calls away its layer's next call is
    (1 for the next layer, ``layers`` for the calling layer's other experts): keeping it holds a
    slot that long for one chance of a hit, so the lowest chance per slot-call goes first."""

    name = "lfru"

    def __init__(self, half_life: float = 64.0, layers: int = 1) -> None:
        super().__init__()
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0 accesses; got {half_life}")
        self.rate = math.log(2) / half_life
        self.layers = layers
        self.current: int = 0  # the layer of the latest access (a shared pool's keys)
        self.score: dict[Key, float] = {}  # log-free form: score * exp(rate * time of its update)
        self.last: dict[Key, int] = {}

    def _now(self, e: Key) -> float:
        return self.score.get(e, 0.0) * math.exp(-self.rate * (self.clock - self.last.get(e, self.clock)))

    def touch(self, expert: Key) -> None:
        super().touch(expert)
        self.score[expert] = self._now(expert) + 1.0
        self.last[expert] = self.clock
        if self.layers > 1:
            self.current = expert[0]

    def _calls_away(self, e: Key) -> int:
        return ((e[0] - self.current) % self.layers or self.layers) if self.layers > 1 else 1

    def victim(self, resident: Iterable[Key]) -> Key:
        return min(resident, key=lambda e: (self._now(e) / self._calls_away(e), self.last.get(e, -1)))


POLICIES: dict[str, type[Policy]] = {"lru": LRU, "lfu": LFU, "lfru": LFRU}


def make_policy(name: str, layers: int = 1) -> Policy:
    """The named policy for a pool shared by ``layers`` MoE layers (LFRU's half-life is counted
    in accesses: ``layers`` times one layer's, so it spans the same number of tokens; and it
    weighs each expert by how soon its layer runs again)."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}; got {name!r}")
    return LFRU(64.0 * layers, layers) if name == "lfru" else POLICIES[name]()


def replay(trace: Sequence[Sequence[Key]], slots: int, policy: Policy) -> tuple[int, int]:
    """(hits, misses) of ``policy`` with ``slots`` slots on a pool's ``trace`` (the experts each
    call needed, in order; a call's experts are all resident together, so a call needing more than
    ``slots`` is served in chunks as the store does)."""
    resident: set[Key] = set()
    hits = misses = 0
    for call in trace:
        for chunk in _chunks(sorted(set(call)), slots):
            pinned = set(chunk)
            for e in chunk:
                if e in resident:
                    hits += 1
                else:
                    misses += 1
                    if len(resident) >= slots:
                        out = policy.victim(resident - pinned)
                        resident.discard(out)
                        policy.forget(out)
                    resident.add(e)
                policy.touch(e)
    return hits, misses


def belady(trace: Sequence[Sequence[Key]], slots: int) -> tuple[int, int]:
    """(hits, misses) of Belady's optimal eviction (the resident expert needed again farthest in
    the future; Belady 1966) on the same trace and chunking as :func:`replay`."""
    calls = [chunk for call in trace for chunk in _chunks(sorted(set(call)), slots)]
    next_use: list[dict[Key, int]] = [{} for _ in calls]
    upcoming: dict[Key, int] = {}
    for i in range(len(calls) - 1, -1, -1):
        next_use[i] = dict(upcoming)  # the next call (after i) that needs each expert
        for e in calls[i]:
            upcoming[e] = i
    resident: set[Key] = set()
    hits = misses = 0
    for i, chunk in enumerate(calls):
        pinned = set(chunk)
        for e in chunk:
            if e in resident:
                hits += 1
                continue
            misses += 1
            if len(resident) >= slots:
                resident.discard(max(resident - pinned, key=lambda r: next_use[i].get(r, math.inf)))
            resident.add(e)
    return hits, misses


def _chunks(experts: list, size: int) -> list[list]:
    return [experts[i : i + size] for i in range(0, len(experts), size)] or [[]]
