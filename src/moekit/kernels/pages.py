"""Decode weights on 2 MiB pages (Linux transparent huge pages).

A batch-1 decode step streams every chosen weight once; on 4 KiB pages the walk costs one TLB
miss per 4 KiB read, on 2 MiB pages one per 2 MiB. On this project's CPU the same 64 int8 experts
read 1.43x as fast at 1 thread and 1.19x at 2 from a buffer advised ``MADV_HUGEPAGE``
(benchmarks/RESULTS.md, "Native decode kernels"). PyTorch's CPU allocator does this only when
``THP_MEM_ALLOC_ENABLE=1`` is set before its first allocation; this module does it for the
weights a decode step reads, whatever the process environment.

:func:`on_huge_pages` copies tensors into one private anonymous mapping, aligned to 2 MiB and
advised ``MADV_HUGEPAGE`` before any page of it is touched, so the kernel backs it with huge pages
as the copy first writes them (where ``/sys/kernel/mm/transparent_hugepage/enabled`` allows it:
``always`` or ``madvise``). Each copy is a tensor with a storage of its own (a view of the
mapping, which it keeps alive): state dicts, ``safetensors`` and ``torch.save`` see independent
tensors, not views of one shared storage.
"""

from __future__ import annotations

import mmap
import os
import sys
import weakref
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Optional, cast

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
MIN_BYTES = 1 << 16  # smaller tensors are not worth a copy
_regions: dict[int, tuple[int, int]] = {}  # live mappings made here: id -> (first address, end)


@cache
def available() -> bool:
    """True on Linux when transparent huge pages can back an advised mapping (``always`` or
    ``madvise``) and ``MOEKIT_HUGE_PAGES`` is not ``0``."""
    if os.environ.get("MOEKIT_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def _dense(t: Tensor) -> bool:
    """True when ``t``'s elements fill ``numel`` consecutive places of its storage in some order
    of its dimensions (contiguous, or a permutation of a contiguous tensor)."""
    span = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != span:
            return False
        span *= size
    return True


def on_huge_pages(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of CPU ``tensors`` (same values, dtype, shape and strides; detached) in one mapping
    backed by huge pages where the system allows (see the module doc). ValueError naming the
    tensor unless each is on the CPU and dense (no gaps or overlaps: :func:`_dense`)."""
    for i, t in enumerate(tensors):
        if t.device.type != "cpu":
            raise ValueError(f"tensors[{i}] is on {t.device}; huge pages hold CPU tensors")
        if not _dense(t):
            raise ValueError(f"tensors[{i}] has strides {t.stride()} with gaps or overlaps; expected a dense tensor")
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    if end == 0:
        return [t.detach().clone() for t in tensors]
    size = -(-end // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = (-torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()) % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, start, size)
    lo = torch.frombuffer(region, dtype=torch.uint8, count=1, offset=start).data_ptr()
    _regions[id(region)] = (lo, lo + size)
    weakref.finalize(region, _regions.pop, id(region), None)
    out = []
    for t, off in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        if n == 0:
            out.append(t.detach().clone())
            continue
        raw = torch.frombuffer(region, dtype=torch.uint8, count=n, offset=start + off)
        copy = raw.view(t.dtype).as_strided(t.shape, t.stride()) if t.dim() else raw.view(t.dtype)[0]
        copy.copy_(t.detach())
        out.append(copy)
    return out


def on_huge_pages_already(t: Tensor) -> bool:
    """True when ``t``'s data lies in a mapping made by :func:`on_huge_pages`."""
    addr = t.data_ptr()
    return any(lo <= addr < hi for lo, hi in _regions.values())


def _movable(t: Optional[Tensor]) -> bool:
    return (
        t is not None
        and not isinstance(t, DTensor)
        and t.device.type == "cpu"
        and t.numel() * t.element_size() >= MIN_BYTES
        and _dense(t)
        and not on_huge_pages_already(t)
    )


@torch.no_grad()
def move_to_huge_pages_(modules: Sequence[nn.Module]) -> int:
    """Each module's CPU parameters and buffers of at least :data:`MIN_BYTES` (dense, not yet on
    huge pages) moved into one mapping per module (:func:`on_huge_pages`), values unchanged: a
    parameter keeps its identity (its ``.data`` is replaced: optimizers and tied weights see the
    move), a buffer is replaced in every module that holds it. Modules later in ``modules`` skip
    what an earlier one moved (e.g. the blocks, then the whole model). Returns the bytes moved."""
    moved = 0
    for module in modules:
        found: dict[int, Tensor] = {}
        for m in module.modules():
            for t in (*m._parameters.values(), *m._buffers.values()):
                if _movable(t):
                    found.setdefault(id(t), cast(Tensor, t))
        if not found:
            continue
        olds = list(found.values())
        news = dict(zip(found, on_huge_pages([t.data for t in olds])))
        for m in module.modules():
            for name, t in m._buffers.items():
                if t is not None and id(t) in news:
                    m._buffers[name] = news[id(t)]
        for t in olds:
            if isinstance(t, nn.Parameter):
                t.data = news[id(t)]
            moved += t.numel() * t.element_size()
    return moved


def mapping_info(t: Tensor) -> dict[str, str]:
    """The ``/proc/self/smaps`` fields of the mapping that holds ``t`` (e.g. ``VmFlags``, holding
    ``hg`` when advised ``MADV_HUGEPAGE``; ``AnonHugePages``, the bytes on huge pages); empty where
    unknown."""
    addr, info, inside = t.data_ptr(), {}, False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "lo-hi perms ..."
            if inside:
                break
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside:
            key, _, value = line.partition(":")
            info[key] = value.strip()
    return info
