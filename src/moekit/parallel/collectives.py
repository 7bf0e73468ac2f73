"""The collectives moekit issues itself, run so that a failure is one clear error and no tensor
outlives its call inside the backend's threads.

Why the second point matters: a gloo collective is executed by one of the process group's worker
threads, which keeps the call's ``Work`` object (holding every tensor of the call) a little after
the waiting caller has been woken. If Python drops its last reference to such a tensor first, the
worker later frees the tensor's Python object and must take the GIL to do it; when that happens
during interpreter shutdown (an error raised right after a collective, then exit), CPython ends
the worker with a forced unwind through C++ and the process aborts ("terminate called without an
active exception", SIGABRT instead of the error's exit code). So every synchronous collective
here returns only once the backend has let go of the tensors it was given. Collectives that
torch runs for moekit (FSDP's all-gathers and reduce-scatters, DCP) are not issued here: for those,
:func:`drain_at_exit` (registered once by moekit's parallel entry points) frees at exit, while the
interpreter is still whole, the process groups that only reference cycles keep alive (their
destructor joins the worker threads with the GIL released), then releases the GIL briefly so a
worker of a group still in use can finish.
"""

from __future__ import annotations

import atexit
import gc
import pickle
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

_RELEASE_TIMEOUT_S = 5.0  # the backend drops a finished call within microseconds; this is a backstop
_EXIT_GIL_RELEASE_S = 0.05
_drain_registered = False


class ExpertParallelError(RuntimeError):
    """A collective failed: a peer rank raised, died or did not answer within the timeout."""


def _host_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """The CPU tensors handed to a collective (directly or in a list), which gloo's threads hold."""
    found: list[Tensor] = []
    for a in (*args, *kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else (a,)
        found.extend(t for t in items if isinstance(t, Tensor) and t.device.type == "cpu")
    return found


def _owners(t: Tensor) -> int:
    """How many C++ references the tensor has (the Python object's is one of them)."""
    return t._use_count()  # type: ignore[attr-defined]  # public on Tensor, missing from its stubs


def _wait_released(tensors: list[Tensor], counts: list[int]) -> None:
    """Return once no tensor is referenced by more C++ owners than before the call (the GIL is
    released while waiting, so a worker that needs it can finish)."""
    deadline = time.monotonic() + _RELEASE_TIMEOUT_S
    for t, n in zip(tensors, counts):
        while _owners(t) > n and time.monotonic() < deadline:
            time.sleep(1e-5)


@torch.compiler.disable  # a compiled block breaks its graph here: the collective runs eagerly
def run_collective(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a synchronous collective ``fn(*args, **kwargs)``; turn a backend failure into one
    :class:`ExpertParallelError` naming the rank, and return only after the backend has released
    the call's tensors (see the module docstring)."""
    if kwargs.get("async_op"):
        raise ValueError("run_collective runs synchronous collectives only (async_op=False)")
    tensors = _host_tensors(args, kwargs)
    counts = [_owners(t) for t in tensors]
    try:
        out = fn(*args, **kwargs)
    except ExpertParallelError:
        raise
    except RuntimeError as err:
        msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise ExpertParallelError(
            f"{what} failed on rank {rank}: a peer rank stopped, crashed or did not answer "
            f"within the process-group timeout ({msg})"
        ) from err
    _wait_released(tensors, counts)
    return out


def all_gather_objects(what: str, obj: Any, group: Optional[Any] = None) -> list:
    """Every rank's picklable ``obj``, in rank order (``dist.all_gather_object``'s result, through
    :func:`run_collective` so its tensors are released before it returns)."""
    world = dist.get_world_size(group)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    run_collective(what, dist.all_gather, sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    padded = F.pad(data, (0, max(lengths) - data.numel()))
    parts = [torch.empty_like(padded) for _ in range(world)]
    run_collective(what, dist.all_gather, parts, padded, group=group)
    return [pickle.loads(p[:n].cpu().numpy().tobytes()) for p, n in zip(parts, lengths)]


def _drain() -> None:
    gc.collect()  # process groups held only by cycles (FSDP's hooks, meshes): freed now, threads joined
    if dist.is_available() and not dist.is_initialized():
        # the groups were destroyed, yet DTensor's sharding caches keep device meshes alive, and a
        # mesh keeps its groups in a registry: empty it, so the groups go (threads joined) now
        from torch.distributed.device_mesh import DeviceMesh

        for obj in gc.get_objects():  # type(), not isinstance(): no attribute of a stranger is read
            if issubclass(type(obj), DeviceMesh) and isinstance(getattr(obj, "__dict__", {}).get("_pg_registry"), dict):
                obj._pg_registry.clear()
    time.sleep(_EXIT_GIL_RELEASE_S)  # a worker of a group still in use, waiting for the GIL, gets it


def drain_at_exit() -> None:
    """Register (once per process) the exit step of the module docstring."""
    global _drain_registered
    if not _drain_registered:
        atexit.register(_drain)
        _drain_registered = True
