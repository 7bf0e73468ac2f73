"""Experts on a memory budget (the expert store): a model whose experts stay in their file and
come into a fixed pool of slots per layer as routing asks for them.

``apply_expert_store(model, weights, budget_bytes)`` turns the MoE layers of a moekit model into
budgeted ones; :func:`load_run_with_store` builds a trained run's model that way without ever
holding all its experts (the rest of the model is read tensor by tensor into place). The byte
model: every MoE layer gets ``budget // (layers * expert_bytes)`` slots (at least ``top_k``, or
decoding would re-read experts within one token); a miss costs one expert's bytes read from the
file (``StoreStats``); nothing else grows with the number of experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union, cast

import torch
from torch import Tensor, nn

from ..layer.experts import GATED, GroupedExperts
from ..layer.moe import MoE
from .experts import ExpertSource, PrefetchStats, StoredExperts, StoreStats
from .files import SafetensorsFiles, StoreFileError
from .policies import LFRU, LFU, LRU, POLICIES, Policy, belady, make_policy, replay
from .prefetch import Prefetcher, prefetch_stats

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: Union[str, int]) -> int:
    """``"1GB"``, ``"512MiB"``, ``"3e9"`` or an int -> bytes (ValueError naming the form otherwise)."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"expected a size such as 512MB, 1.5GiB or 2000000000; got {text!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ValueError(f"a size must be positive; got {text!r}")
    return n


class StackedSource:
    """moekit's layout: each MoE layer's experts as stacked ``(E, D, H)`` / ``(E, F, D)`` tensors,
    named per layer (a run's checkpoint file: ``model.<layer path>.experts.w_up``)."""

    def __init__(self, files: SafetensorsFiles, names: dict[int, tuple[str, str]]):
        self.files, self.names = files, names

    def check(self, layer: int, num_experts: int, up_DH: tuple[int, ...], down_FD: tuple[int, ...]) -> None:
        up, down = self.names[layer]
        self.files.check_shape(up, (num_experts, *up_DH))
        self.files.check_shape(down, (num_experts, *down_FD))

    def read_expert(self, layer: int, e: int, up_DH: Tensor, down_FD: Tensor) -> None:
        up, down = self.names[layer]
        self.files.read_rows(up, up_DH, e)
        self.files.read_rows(down, down_FD, e)


@dataclass(frozen=True)
class Budget:
    """How a byte budget splits: slots per MoE layer and what they cost."""

    budget_bytes: int
    expert_bytes: int
    layers: int
    slots: int

    @property
    def used_bytes(self) -> int:
        return self.slots * self.layers * self.expert_bytes

    def line(self) -> str:
        return (
            f"expert memory {self.used_bytes / 2**20:.1f} MiB of {self.budget_bytes / 2**20:.1f} MiB: "
            f"{self.slots} slots per layer x {self.layers} layers, {self.expert_bytes / 2**20:.2f} MiB per expert"
        )


def plan_budget(budget_bytes: int, expert_bytes: int, layers: int, num_experts: int, top_k: int) -> Budget:
    """Slots per layer for ``budget_bytes`` (ValueError when it cannot hold ``top_k`` per layer)."""
    slots = min(num_experts, budget_bytes // (expert_bytes * layers))
    need = top_k * expert_bytes * layers
    if slots < top_k:
        raise ValueError(
            f"expert memory of {budget_bytes} bytes holds {slots} expert(s) per MoE layer; decoding needs at "
            f"least top_k={top_k} per layer: {need} bytes ({need / 2**20:.1f} MiB; {layers} layers x {top_k} x "
            f"{expert_bytes} bytes per expert)"
        )
    return Budget(budget_bytes, expert_bytes, layers, slots)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(module path, layer) of each MoE layer with stacked experts, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE) and isinstance(m.experts, GroupedExperts)]


def apply_expert_store(
    model: nn.Module,
    source: ExpertSource,
    budget_bytes: int,
    policy: str = "lfru",
    dtype: torch.dtype = torch.float32,
) -> Budget:
    """Replace the stacked experts of every MoE layer of ``model`` by a pool of slots filled from
    ``source`` (layer ``i`` = the i-th MoE layer in model order), within ``budget_bytes`` in all.
    The experts' own weights are dropped (on a meta-built model they were never allocated)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layer with stacked experts: nothing to put in an expert store")
    first = cast(GroupedExperts, layers[0][1].experts)
    h = first.hidden_dim * (2 if GATED[first.kind] else 1)
    expert_bytes = (first.dim * h + first.hidden_dim * first.dim) * torch.empty((), dtype=dtype).element_size()
    top_k = max(m.cfg.top_k for _, m in layers)
    plan = plan_budget(budget_bytes, expert_bytes, len(layers), first.num_experts, top_k)
    for i, (_, moe) in enumerate(layers):
        ex = cast(GroupedExperts, moe.experts)
        moe.experts = StoredExperts(
            source, i, ex.num_experts, ex.dim, ex.hidden_dim, ex.kind, plan.slots, make_policy(policy), dtype
        )
    return plan


def materialize_with_store(
    model: nn.Module, source: ExpertSource, budget_bytes: int, policy: str, dtype: torch.dtype, prefetch: bool
) -> nn.Module:
    """A meta-built model with its experts in a store (:func:`apply_expert_store`), the rest
    allocated on the CPU in ``dtype`` with its buffers initialised (its weights left for the
    caller to read into place); ``prefetch`` attaches a :class:`Prefetcher` (``model.prefetcher``)."""
    apply_expert_store(model, source, budget_bytes, policy, dtype)
    model.to(dtype).to_empty(device="cpu")
    model.reset_buffers()  # type: ignore[operator]  # MoETransformer's
    if prefetch:
        setattr(model, "prefetcher", Prefetcher(model))  # noqa: B010 (nn.Module types its attributes as tensors or modules)
    return model


def store_stats(model: nn.Module) -> StoreStats:
    """Every budgeted layer's counts summed (hits, misses, bytes and seconds read)."""
    total = StoreStats()
    for m in model.modules():
        if isinstance(m, StoredExperts):
            s = m.stats
            total.hits, total.misses = total.hits + s.hits, total.misses + s.misses
            total.bytes_read, total.read_s = total.bytes_read + s.bytes_read, total.read_s + s.read_s
    return total


def record_traces(model: nn.Module, on: bool = True) -> None:
    """Start (or stop) recording, per budgeted layer, the experts each call needed (``stats.trace``)."""
    for m in model.modules():
        if isinstance(m, StoredExperts):
            m.stats.trace = [] if on else None


def load_run_with_store(
    checkpoint: Union[str, Path], cfg, budget_bytes: int, policy: str = "lfru", prefetch: bool = False
) -> nn.Module:
    """The model of a run's single-file checkpoint with its experts in a store of ``budget_bytes``,
    in eval mode: built on the meta device, every non-expert tensor read into place (checked
    against the checkpoint's SHA-256 digests), the experts left in the file. Peak memory: the
    non-expert weights plus the pool. ``prefetch``: a :class:`Prefetcher` reads each next layer's
    guessed experts while the current one computes (kept as ``model.prefetcher``)."""
    import json

    from ..models.lm import MoETransformer
    from ..train.checkpoint import CHECKSUMS, MODEL, CheckpointError, tensor_sha256

    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(
            f"{path} is a sharded (torchrun) checkpoint; an expert store reads a single-file checkpoint "
            "(load the run once in one process and save it with moekit's checkpoint writer)"
        )
    files = SafetensorsFiles.of(path)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    names = {
        i: (f"{MODEL}{n}.experts.w_up", f"{MODEL}{n}.experts.w_down") for i, (n, _) in enumerate(moe_layers(model))
    }
    dtype = files.entry(next(iter(names.values()))[0]).dtype
    materialize_with_store(model, StackedSource(files, names), budget_bytes, policy, dtype, prefetch)
    digests = json.loads(next(iter(files.metadata.values())).get(CHECKSUMS, "{}"))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            key = MODEL + name
            files.check_shape(key, tuple(t.shape))
            files.read_rows(key, t)
            if key in digests and tensor_sha256(t) != digests[key]:
                raise CheckpointError(f"checkpoint {path} is corrupt: tensor {key!r} does not match its SHA-256 digest")
    return model.eval()


__all__ = [
    "Budget",
    "ExpertSource",
    "LFRU",
    "LFU",
    "LRU",
    "POLICIES",
    "Policy",
    "PrefetchStats",
    "Prefetcher",
    "SafetensorsFiles",
    "StackedSource",
    "StoreFileError",
    "StoreStats",
    "StoredExperts",
    "apply_expert_store",
    "belady",
    "load_run_with_store",
    "materialize_with_store",
    "moe_layers",
    "parse_bytes",
    "plan_budget",
    "prefetch_stats",
    "record_traces",
    "replay",
    "store_stats",
]
