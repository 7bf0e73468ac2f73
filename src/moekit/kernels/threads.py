"""Batch-1 decoding on several CPU threads where torch's own GEMV takes one: the step's float32
weight reads split between threads, each running its share on one intra-op thread (llama.cpp's
way: every thread reads its own rows).

Measured on this project's CPU (``benchmarks/decode_gemv.py``; benchmarks/RESULTS.md, "Decode
threads and compiled decoding on the CPU"): float32 ``F.linear``/``matmul`` GEMVs do not use a
second intra-op thread at all (~17 GB/s at 1 thread and at 2), while two Python threads each
running half the rows on one intra-op thread read 24.6-26.7 GB/s, and a layer's 8 chosen experts
split 4 and 4 read 29.3 against 19.7. torch's ops release the GIL while they run, so one thread's
GEMVs overlap the other's. The 16-bit and low-bit kernels do use their intra-op threads (fp16
30.2 GB/s at 2, 14.6 split): splitting them was slower (int8's decode 65 -> 55 tok/s), so only
models mostly in :data:`SPLIT_DTYPES` split.

:func:`decode_threads` turns it on for a block of code (the generator's one-token steps); inside
it :func:`split_rows` computes one linear map by row blocks and :func:`split_sum` deals out a sum
of terms (a layer's chosen experts), each thread accumulating into its own buffer. Outside it, or
under ``torch.compile``, both run in the calling thread as before. A split adds its terms in
another order than one thread does: equal to rounding, not bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native

J = TypeVar("J")
MIN_SPLIT_BYTES = 1 << 19  # a weight smaller than this is read in one thread (the hand-off costs ~20 µs)
SPLIT_DTYPES = (torch.float32,)  # whose batch-1 GEMV torch runs on one thread here
_executors: dict[int, ThreadPoolExecutor] = {}
_threads = 1  # threads of the decode_threads block being run (1: none)
_share = threading.local()  # .running: this thread runs one share of a split (which splits no further)


def _worker_init() -> None:
    torch.set_num_threads(1)
    _share.running = True


def _executor(n: int) -> ThreadPoolExecutor:
    """``n - 1`` worker threads (the caller is the n-th), made once per ``n`` and kept."""
    if n not in _executors:
        _executors[n] = ThreadPoolExecutor(n - 1, "moekit-decode", initializer=_worker_init)
    return _executors[n]


@contextmanager
def decode_threads(threads: Optional[int] = None) -> Iterator[int]:
    """Within the block, batch-1 linear maps and expert sums are split between ``threads``
    threads (default: torch's intra-op threads), each op on one intra-op thread; yields the
    number used (1: nothing is split, e.g. one thread, or while compiling)."""
    global _threads
    n = torch.get_num_threads() if threads is None else threads
    if n < 1:
        raise ValueError(f"threads must be >= 1; got {n}")
    if n == 1 or _threads > 1 or torch.compiler.is_compiling():
        yield 1
        return
    before = torch.get_num_threads()
    _executor(n)
    torch.set_num_threads(1)
    _threads = n
    try:
        yield n
    finally:
        _threads = 1
        torch.set_num_threads(before)


def splits(module: nn.Module) -> bool:
    """Whether ``module``'s decoding gains from :func:`decode_threads`: on the CPU with several
    intra-op threads, most of its weight bytes in :data:`SPLIT_DTYPES` (the rest then runs on one
    intra-op thread per share too)."""
    if next(module.parameters()).device.type != "cpu" or torch.get_num_threads() == 1:
        return False
    sizes = [(t.dtype, t.nbytes) for t in [*module.parameters(), *module.buffers()]]
    return 2 * sum(b for d, b in sizes if d in SPLIT_DTYPES) > sum(b for _, b in sizes)


def active() -> int:
    """Threads the current :func:`decode_threads` block splits between (1 outside one, and inside
    a thread's share of a split)."""
    return 1 if torch.compiler.is_compiling() or getattr(_share, "running", False) else _threads


def block_threads() -> Optional[int]:
    """Threads for a kernel that splits its own rows (moekit's native kernels): the running
    :func:`decode_threads` block's (torch's intra-op threads are 1 inside it), else None (torch's)."""
    n = active()
    return n if n > 1 else None


def split_sum(jobs: Sequence[J], run: Callable[[J, Tensor], object], out: Tensor) -> Tensor:
    """``out`` after ``run(job, acc)`` for every job, each adding its term into ``acc`` in place.
    Inside :func:`decode_threads` the jobs are dealt round the threads, the first share
    accumulated into ``out`` in this thread, every other share into its own buffer, added last."""
    n = min(active(), len(jobs))
    if n == 1:
        return _accumulate(jobs, run, out)
    shares = [jobs[i::n] for i in range(n)]
    futures = [_executor(_threads).submit(_accumulate, share, run, torch.zeros_like(out)) for share in shares[1:]]
    _own_share(_accumulate, shares[0], run, out)
    for f in futures:
        out.add_(f.result())
    return out


def split_rows(linear: Callable[[int, int], Tensor], rows: int, nbytes: int, align: int = 16) -> Optional[Tensor]:
    """``linear(start, stop)`` (the output's columns ``start:stop``, i.e. the weight's rows) for
    row blocks of ``rows`` computed by the threads and concatenated; None when not split (outside
    :func:`decode_threads`, or ``nbytes`` of weight below :data:`MIN_SPLIT_BYTES`)."""
    n = active()
    if n == 1 or nbytes < MIN_SPLIT_BYTES or rows < 2 * align:
        return None
    step = -(-rows // (n * align)) * align
    bounds = [(a, min(a + step, rows)) for a in range(0, rows, step)]
    futures = [_executor(n).submit(linear, a, b) for a, b in bounds[1:]]
    first = _own_share(linear, *bounds[0])
    return torch.cat([first] + [f.result() for f in futures], dim=-1)


def _own_share(fn: Callable[..., Tensor], *args) -> Tensor:
    """``fn(*args)`` as this thread's share of a split: nothing inside it splits again."""
    _share.running = True
    try:
        return fn(*args)
    finally:
        _share.running = False


def _accumulate(share: Sequence[J], run: Callable[[J, Tensor], object], acc: Tensor) -> Tensor:
    for j in share:
        run(j, acc)
    return acc


def compiled_row(x: Tensor, w_OI: Tensor, bias: Optional[Tensor] = None) -> Optional[Tensor]:
    """``F.linear(x, w_OI, bias)`` as a multiply-and-sum when compiled for one row on the CPU: one
    loop inductor writes and fuses with its neighbours (24.5 GB/s at 1 thread where MKL's GEMV reads 17:
    benchmarks/decode_gemv.py; and no call into ATen's ``mm``, which copies a one-row input whose
    first stride is 0, as inductor lays it out); None anywhere else."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1] and w_OI.dim() == 2:
        y_RO = (x.unsqueeze(-2) * w_OI).sum(-1)
        return y_RO if bias is None else y_RO + bias
    return None


def linear(x: Tensor, w_OI: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear``, by row blocks of ``w_OI`` on the threads inside :func:`decode_threads`;
    compiled for one row on the CPU, :func:`compiled_row`."""
    y_RO = compiled_row(x, w_OI, bias)
    if y_RO is not None:
        return y_RO
    fmt = native.float_format(w_OI.dtype)
    x_RI = x.reshape(-1, x.shape[-1])
    eager = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if eager and x.dtype == torch.float32 and fmt and native.handles(fmt, x_RI, w_OI):
        y_RO = native.linear(x_RI, w_OI, threads=block_threads()).view(*x.shape[:-1], w_OI.shape[0])
        return y_RO if bias is None else y_RO + bias
    part = lambda a, b: F.linear(x, w_OI[a:b], None if bias is None else bias[a:b])  # noqa: E731
    split = split_rows(part, w_OI.shape[0], w_OI.nbytes)
    return F.linear(x, w_OI, bias) if split is None else split


__all__ = [
    "MIN_SPLIT_BYTES",
    "SPLIT_DTYPES",
    "active",
    "block_threads",
    "compiled_row",
    "decode_threads",
    "linear",
    "split_rows",
    "split_sum",
    "splits",
]
