"""Expert compute backends. Each takes rows already sorted by expert and returns their outputs.

The contract shared by every backend (shape legend: R rows, D model width, H = F or 2F hidden
columns of the up projection, F expert width, E experts):

    y_RD = ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act)

rows ``[sum(counts_E[:e]), sum(counts_E[:e+1]))`` belong to expert e; rows past ``sum(counts_E)``
are padding whose output the caller ignores (and masks). ``act`` maps the up projection's
output (R, H) to the down projection's input (R, F).
"""
from __future__ import annotations

import os

import torch

from .grouped import grouped_ffn, grouped_mm_supported
from .reference import loop_ffn

__all__ = ["expert_ffn", "resolve_backend", "loop_ffn", "grouped_ffn", "grouped_mm_supported", "triton_available"]


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


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` into the concrete one to run: ``auto`` picks the fastest correct path."""
    if backend == "auto":
        # The Triton kernels are verified under the interpreter only, never yet on a GPU: until a
        # GPU run checks and times them, "auto" keeps the grouped_mm path; "triton" opts in.
        return "grouped"
    if backend == "triton" and not ((device.type == "cuda" or _interpreting()) and triton_available()):
        raise ValueError(
            "backend='triton' needs a CUDA device and moekit's Triton kernels (pip install triton); "
            f"input is on {device}. Use backend='auto' to fall back to 'grouped'."
        )
    return backend


def expert_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act, backend: str):
    """Run the stacked expert FFNs with the named concrete backend."""
    if backend == "loop":
        return loop_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act)
    if backend == "grouped":
        return grouped_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act)
    if backend == "triton":
        from .triton import triton_ffn

        return triton_ffn(x_RD, counts_E, w_up_EDH, w_down_EFD, act)
    raise ValueError(f"backend must be one of 'loop', 'grouped', 'triton'; got {backend!r}")
