"""Functions that run eagerly between ``torch.compile``'s graphs (``torch.compiler.disable``),
wrapped when first asked for: wrapping at import time imports ``torch._dynamo`` and with it
Triton, which must be imported only after its CPU interpreter is chosen (tests/kernels)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_WRAPPED: dict[Callable, Callable] = {}


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, made once. Ask for it eagerly before code that calls it
    is compiled (compiled code then finds it made)."""
    wrapped = _WRAPPED.get(fn)
    if wrapped is None:
        wrapped = _WRAPPED[fn] = torch.compiler.disable(fn)
    return wrapped
