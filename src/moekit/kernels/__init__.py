"""Expert compute backends. Each takes rows already sorted by expert and returns their outputs.

The contract shared by every backend (shape legend: R rows, D model width, H = F or 2F hidden
columns of the up projection, F expert width, E experts):

    y_RD = ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act)

rows ``[sum(counts_E[:e]), sum(counts_E[:e+1]))`` belong to expert e; rows past ``sum(counts_E)``
are padding whose output the caller ignores (and masks). ``act`` maps the up projection's
output (R, H) to the down projection's input (R, F): the torch backends take a callable, the
Triton kernels an activation name (the registry in :mod:`.activations`); :func:`expert_ffn`
takes either name or callable and hands each backend what it needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

import torch

from ..config import BACKENDS
from .activations import Act, activation_fn, eager_autograd
from .grouped import grouped_ffn, grouped_mm_supported
from .reference import loop_ffn

__all__ = [
    "expert_ffn",
    "register_backend",
    "resolve_backend",
    "loop_ffn",
    "grouped_ffn",
    "grouped_mm_supported",
    "triton_available",
    "compute_dtype",
    "as_dtype",
    "eager_autograd",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """True when moekit's Triton kernels can run here: Triton installed and a CUDA device, or
    Triton's CPU interpreter switched on (``TRITON_INTERPRET=1``, for tests)."""
    if not (torch.cuda.is_available() or _interpreting()):
        return False
    try:
        from . import triton as _moekit_triton  # noqa: F401
    except ImportError:
        return False
    return True


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, with no op launched when it already is: ``t.to(dtype)`` returns ``t``
    then too, but through the dispatcher, which a decode step of ~40 small ops feels."""
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's for x's device when it is on, else x's
    (float64 included: autocast leaves float64 matmuls in float64)."""
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Turn ``backend`` into the concrete one to run. ``auto`` is ``grouped`` on every device: the
    Triton kernels are opt-in (``backend="triton"``) until a GPU benchmark in benchmarks/RESULTS.md
    shows them ahead (they have not run on a GPU yet). ``dtype`` is accepted for callers that pass it."""
    if backend == "auto":
        return "grouped"
    if backend == "triton" and not ((device.type == "cuda" or _interpreting()) and triton_available()):
        raise ValueError(
            "backend='triton' needs a CUDA device and moekit's Triton kernels (pip install triton); "
            f"input is on {device}. Use backend='auto' to fall back to 'grouped'."
        )
    return backend


Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Act], torch.Tensor]
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, ffn: Backend) -> None:
    """Make ``backend=name`` (MoEConfig, :func:`expert_ffn`) run ``ffn(x_RD, counts_E, w_up_EDH,
    w_down_EFD, act)`` under the contract of this module's docstring (``act``: a name or a
    callable; :func:`.activations.activation_fn` gives the torch function). Adding a backend
    touches this call and its function only."""
    if not callable(ffn):
        raise TypeError(f"a backend must be callable; got {ffn!r}")
    _BACKENDS[name] = ffn
    if name not in BACKENDS:
        BACKENDS.append(name)


def _with_torch_activation(ffn: Callable) -> Backend:
    def run(x_RD, counts_E, w_up_EDH, w_down_EFD, act):
        return ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, activation_fn(act))

    return run


def _triton_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act):
    from .triton import triton_ffn  # Triton is optional: imported when this backend runs

    return triton_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act)


register_backend("loop", _with_torch_activation(loop_ffn))
register_backend("grouped", _with_torch_activation(grouped_ffn))
register_backend("triton", _triton_ffn)


def expert_ffn(
    x_RD: torch.Tensor, counts_E: torch.Tensor, w_up_EDH: torch.Tensor, w_down_EFD: torch.Tensor, act: Act, backend: str
) -> torch.Tensor:
    """Run the stacked expert FFNs with the named concrete backend. ``act``: an activation name
    (:data:`.activations.ACTIVATIONS`), or any callable for the torch backends."""
    ffn = _BACKENDS.get(backend)
    if ffn is None:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}; got {backend!r}")
    return ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act)
