"""Activation memory of a forward pass, counted from what autograd keeps: the bytes of every
distinct storage saved for backward (``torch.autograd.graph.saved_tensors_hooks``) plus the
outputs, minus storages that existed before the call (inputs, parameters). On CUDA this equals
``memory_allocated`` after the forward minus before (the benchmark's "activations" column) up to
allocator rounding; here it works on any device, the Triton interpreter included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def _storage_key(t: Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr(), s.nbytes())


def saved_activation_bytes(fn: Callable[[], object], existing: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages that ``fn()``'s autograd graph keeps alive, outputs
    included, not counting the storages of ``existing`` (inputs and parameters)."""
    before = {_storage_key(t) for t in existing}
    kept: dict[tuple, int] = {}

    def pack(t: Tensor):
        if t.device.type != "meta" and t.untyped_storage().nbytes():
            key = _storage_key(t)
            if key not in before:
                kept[key] = key[2]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    outs = out if isinstance(out, (tuple, list)) else [out]
    for o in outs:
        if isinstance(o, Tensor):
            key = _storage_key(o)
            if key not in before:
                kept[key] = key[2]
    return sum(kept.values())
