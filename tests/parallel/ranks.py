"""How the multi-process tests start their ranks: ``torch.multiprocessing.start_processes`` with the
``forkserver`` start method, its server having imported torch, moekit and the worker modules once.
A rank then starts as a fork of that server (tens of milliseconds) instead of a fresh interpreter
importing them all again (~2.4 s of CPU per rank; 2-4 ranks per test on two cores). The server
only imports (no tensor work, no process group, no OpenMP region), and a fork of a process that
imported torch is what DataLoader's workers are on Linux; each test still gets its own process
group, store file and rank processes. One difference: a forked
rank ends with ``os._exit`` after its function returns, so tests of what happens while the
interpreter finalizes start theirs with ``spawn``."""

from __future__ import annotations

import multiprocessing
import time

import torch.multiprocessing as tmp

PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.checkpoint",
    "torch.distributed.pipelining",
    "moekit",
    "moekit.parallel",
    "moekit.train.distcp",
    "ep_workers",
    "ep_edge_workers",
    "tp_workers",
    "pp_workers",
    "dcp_workers",
    "fsdp_output_workers",
]
START_METHOD = "forkserver"


def context() -> multiprocessing.context.BaseContext:
    """The start method's context, its server told what to import first (read when it starts)."""
    ctx = multiprocessing.get_context(START_METHOD)
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start(fn, args: tuple, nprocs: int, start_method: str = START_METHOD) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` processes and wait; a rank's exception is raised here.
    ``start_method="spawn"`` where a test needs the interpreter's own exit in each rank (a forked
    process leaves by ``os._exit``: no atexit handlers, no finalization)."""
    context()
    tmp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method=start_method)


def store_path(tmp_path, name: str) -> str:
    """A file-store path of its own for one process group."""
    return str(tmp_path / f"store-{name}-{time.monotonic_ns()}")
