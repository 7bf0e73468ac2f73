"""Experts on a memory budget (the expert store): a model whose experts stay in their file and
come into a fixed pool of slots per layer as routing asks for them.

``apply_expert_store(model, weights, budget_bytes)`` turns the MoE layers of a moekit model into
budgeted ones; :func:`load_run_with_store` builds a trained run's model that way without ever
holding all its experts (the rest of the model is read tensor by tensor into place). The byte
model: one pool of ``budget // expert_bytes`` slots, shared by every MoE layer (at least one
layer's ``top_k``, or decoding would re-read experts within one token); a miss costs one expert's
bytes read from the file (``StoreStats``); nothing else grows with the number of experts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Union, cast

import torch
from torch import Tensor, nn

from ..kernels.lowbit import LowBitWeight, parse_format
from ..layer.experts import GATED, GroupedExperts
from ..layer.moe import MoE
from .experts import ExpertPool, ExpertSource, PrefetchStats, StoredExperts, StoreStats, quantize_into
from .files import SafetensorsFiles, StoreFileError
from .mixed import MixedPool, format_expert_bytes, plan_mixed
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
        for part in self.read_parts(layer, e, up_DH, down_FD):
            part()

    def read_parts(self, layer: int, e: int, up_DH: Tensor, down_FD: Tensor) -> list[Callable[[], object]]:
        """Expert ``e``'s up and down rows, one independent read each."""
        up, down = self.names[layer]
        return [partial(self.files.read_rows, up, up_DH, e), partial(self.files.read_rows, down, down_FD, e)]

    @property
    def expert_file_bytes(self) -> int:
        """Bytes of one expert in the file (its up and down rows, layer 0's)."""
        return sum(self.files.entry(n).row_bytes for n in self.names[0])

    def read_lowbit(self, layer: int, e: int, up: dict[str, Tensor], down: dict[str, Tensor]) -> None:
        """Expert ``e`` transposed into ``(out, in)`` slots: float ones copied, int8 / int4 ones
        quantized as they are read."""
        for name, dst in zip(self.names[layer], (up, down)):
            entry = self.files.entry(name)
            raw = self.files.read_rows(name, torch.empty(entry.shape[1:], dtype=entry.dtype), e)
            quantize_into(dst, raw.t())


class LowBitRunSource:
    """A quantized run's experts (``moekit convert --quantize``), each projection's low-bit
    tensors named ``model.<layer path>.experts.<up|down>.<e>.<data|scales|zeros>``, one format."""

    def __init__(self, files: SafetensorsFiles, prefixes: dict[int, str], formats: dict[int, list[str]]):
        """``formats``: each MoE layer's experts' formats (one for all, or mixed: ``--quantize auto``)."""
        self.files, self.prefixes, self.formats = files, prefixes, formats

    def check(self, layer: int, num_experts: int, up_DH: tuple[int, ...], down_FD: tuple[int, ...]) -> None:
        (D, H), F = up_DH, down_FD[0]
        if len(self.formats[layer]) != num_experts:
            raise StoreFileError(f"the run's plan has {len(self.formats[layer])} expert formats for layer {layer}")
        for e, fmt in enumerate(self.formats[layer]):
            for role, (n_out, n_in) in (("up", (H, D)), ("down", (D, F))):
                for k, t in LowBitWeight.empty(fmt, n_out, n_in).tensors().items():
                    self.files.check_shape(f"{self.prefixes[layer]}{role}.{e}.{k}", tuple(t.shape))

    def read_expert(self, layer: int, e: int, up_DH: Tensor, down_FD: Tensor) -> None:
        raise TypeError("a low-bit source fills a low-bit pool (read_lowbit)")

    def read_lowbit(self, layer: int, e: int, up: dict[str, Tensor], down: dict[str, Tensor]) -> None:
        for role, tensors in (("up", up), ("down", down)):
            for k, t in tensors.items():
                self.files.read_rows(f"{self.prefixes[layer]}{role}.{e}.{k}", t)


AUTO_NEEDS_QUANTIZED_RUN = (
    "expert_dtype auto with an expert store reads a run quantized per expert: it chooses each expert's format "
    "from routing and quantization error, which needs every expert read once; quantize first "
    "(moekit convert --run RUN --quantize auto), then decode that run with --expert-memory"
)


@dataclass(frozen=True)
class Budget:
    """How a byte budget is spent: one pool of ``slots`` experts shared by ``layers`` MoE layers."""

    budget_bytes: int
    expert_bytes: int
    layers: int
    num_experts: int
    slots: int

    @property
    def used_bytes(self) -> int:
        return self.slots * self.expert_bytes

    def line(self) -> str:
        total = self.layers * self.num_experts
        return (
            f"expert memory {self.used_bytes / 2**20:.1f} MiB of {self.budget_bytes / 2**20:.1f} MiB: "
            f"{self.slots} of {total} experts resident ({self.slots / self.layers:.1f} per layer on average, "
            f"{self.layers} layers share the slots), {self.expert_bytes / 2**20:.2f} MiB per expert"
        )


def plan_budget(budget_bytes: int, expert_bytes: int, layers: int, num_experts: int, top_k: int) -> Budget:
    """The shared pool's size for ``budget_bytes`` (ValueError when it cannot hold one layer's ``top_k``)."""
    slots = min(num_experts * layers, budget_bytes // expert_bytes)
    if slots < top_k:
        need = top_k * expert_bytes
        raise ValueError(
            f"expert memory of {budget_bytes} bytes holds {slots} expert(s); decoding needs at least one layer's "
            f"top_k={top_k} resident at once: {need} bytes ({need / 2**20:.1f} MiB; {expert_bytes} bytes per expert)"
        )
    return Budget(budget_bytes, expert_bytes, layers, num_experts, slots)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(module path, layer) of each MoE layer with stacked experts, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE) and isinstance(m.experts, GroupedExperts)]


def apply_expert_store(
    model: nn.Module,
    source: ExpertSource,
    budget_bytes: int,
    policy: str = "lfru",
    dtype: torch.dtype = torch.float32,
    fmt: Union[str, dict[int, list[str]], None] = None,
) -> Budget:
    """Replace the stacked experts of every MoE layer of ``model`` by one pool of slots shared by
    all of them, filled from ``source`` (layer ``i`` = the i-th MoE layer in model order), within
    ``budget_bytes``. The experts' own weights are dropped (on a meta-built model they were never
    allocated). Every layer's experts must have one shape (true of every moekit LM and HF family).
    ``fmt``: the slots hold experts in this low-bit format (:mod:`moekit.kernels.lowbit`; the
    source must then read them so, e.g. :class:`LowBitRunSource`), each costing its own bytes."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layer with stacked experts: nothing to put in an expert store")
    stacks = [cast(GroupedExperts, m.experts) for _, m in layers]
    shapes = {(ex.num_experts, ex.dim, ex.hidden_dim, GATED[ex.kind]) for ex in stacks}
    if len(shapes) > 1:
        raise ValueError(
            f"an expert store needs every MoE layer's experts of one shape; the model has {sorted(shapes)}"
        )
    first = stacks[0]
    h = first.hidden_dim * (2 if GATED[first.kind] else 1)
    top_k = max(m.cfg.top_k for _, m in layers)
    pool: Union[ExpertPool, MixedPool]
    if isinstance(fmt, dict):  # each layer's experts' formats: one pool per format
        sizes = {
            f: format_expert_bytes(f, first.dim, h, first.hidden_dim) for f in {f for v in fmt.values() for f in v}
        }
        slots = plan_mixed(budget_bytes, [fmt[i] for i in range(len(layers))], sizes, top_k)
        pool = MixedPool(source, fmt, slots, first.dim, h, first.hidden_dim, lambda: make_policy(policy, len(layers)))
        plan = Budget(budget_bytes, pool.expert_bytes, len(layers), first.num_experts, pool.slots)
    else:
        if fmt is None:
            expert_bytes = (first.dim * h + first.hidden_dim * first.dim) * torch.empty((), dtype=dtype).element_size()
        else:
            expert_bytes = format_expert_bytes(fmt, first.dim, h, first.hidden_dim)
        plan = plan_budget(budget_bytes, expert_bytes, len(layers), first.num_experts, top_k)
        policy_ = make_policy(policy, len(layers))
        pool = ExpertPool(source, plan.slots, first.dim, h, first.hidden_dim, policy_, dtype, fmt)
    for i, ((_, moe), ex) in enumerate(zip(layers, stacks)):
        moe.experts = StoredExperts(pool, i, ex.num_experts, ex.dim, ex.hidden_dim, ex.kind)
    return plan


def expert_pools(model: nn.Module) -> list[Union[ExpertPool, MixedPool]]:
    """The distinct slot pools of a model's budgeted layers (a :class:`MixedPool` holds one per format)."""
    pools: dict[int, Union[ExpertPool, MixedPool]] = {}
    for m in model.modules():
        if isinstance(m, StoredExperts):
            pools.setdefault(id(m.pool), m.pool)
    return list(pools.values())


def materialize_with_store(
    model: nn.Module,
    source: ExpertSource,
    budget_bytes: int,
    policy: str,
    dtype: Optional[torch.dtype],
    prefetch: Union[bool, int],
    fmt: Union[str, dict[int, list[str]], None] = None,
) -> nn.Module:
    """A meta-built model with its experts in a store (:func:`apply_expert_store`), the rest
    allocated on the CPU in ``dtype`` with its buffers initialised (its weights left for the
    caller to read into place); ``prefetch`` attaches a :class:`Prefetcher` (``model.prefetcher``;
    ``True`` guesses each next layer's ``top_k`` experts, an int that many).
    ``dtype=None`` (a quantized run) keeps the dtypes the model was built with (its low-bit
    buffers must stay as they are); ``fmt``: the pool's low-bit format (:func:`apply_expert_store`)."""
    apply_expert_store(model, source, budget_bytes, policy, dtype or torch.float32, fmt)
    (model.to(dtype) if dtype is not None else model).to_empty(device="cpu")
    model.reset_buffers()  # type: ignore[operator]  # MoETransformer's
    if prefetch is not False:  # True: each next layer's top_k; an int: that many guesses
        width = None if prefetch is True else int(prefetch)
        setattr(model, "prefetcher", Prefetcher(model, width=width))  # noqa: B010 (nn.Module types its attributes as tensors or modules)
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


def pool_trace(model: nn.Module) -> list[list[tuple[int, int]]]:
    """The recorded per-layer traces (:func:`record_traces`) as the shared pool saw them: calls in
    model order (every forward calls each layer once), experts keyed (layer, expert), ready for
    :func:`replay` and :func:`belady` with the pool's slot count."""
    layers = [m for m in model.modules() if isinstance(m, StoredExperts) and m.stats.trace is not None]
    calls = zip(*(m.stats.trace for m in layers))
    return [[(m.layer, e) for e in call] for step in calls for m, call in zip(layers, step)]


def record_traces(model: nn.Module, on: bool = True) -> None:
    """Start (or stop) recording, per budgeted layer, the experts each call needed (``stats.trace``)."""
    for m in model.modules():
        if isinstance(m, StoredExperts):
            m.stats.trace = [] if on else None


def load_run_with_store(
    checkpoint: Union[str, Path],
    cfg,
    budget_bytes: int,
    policy: str = "lfru",
    prefetch: Union[bool, int] = False,
    fmt: Optional[str] = None,
) -> nn.Module:
    """The model of a run's single-file checkpoint with its experts in a store of ``budget_bytes``,
    in eval mode: built on the meta device, every non-expert tensor read into place (checked
    against the checkpoint's SHA-256 digests), the experts left in the file. Peak memory: the
    non-expert weights plus the pool. ``prefetch``: a :class:`Prefetcher` reads each next layer's
    guessed experts while the current one computes (kept as ``model.prefetcher``). ``fmt``
    (fp32, fp16, bf16): slots in that dtype and the ``(out, in)`` layout (``F.linear``); a
    quantized run's experts are held in their own format."""
    from ..models.lm import MoETransformer
    from ..train.checkpoint import MODEL, file_meta, read_model_into

    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(
            f"{path} is a sharded (torchrun) checkpoint; an expert store reads a single-file checkpoint "
            "(load the run once in one process and save it with moekit's checkpoint writer)"
        )
    files = SafetensorsFiles.of(path)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    lowbit = file_meta(path).get("lowbit")
    if lowbit:  # a quantized run: its other low-bit modules, and its experts in a low-bit pool
        from ..quantize import apply_lowbit_plan

        per_layer = {i: list(layer) for i, layer in enumerate(lowbit.get("experts", []))}
        formats = sorted({f for layer in per_layer.values() for f in layer})
        if fmt is not None and fmt != "auto" and {parse_format(f) for f in formats} != {parse_format(fmt)}:
            raise ValueError(f"{path} is quantized to {', '.join(formats)}; its experts cannot be held as {fmt}")
        apply_lowbit_plan(model, lowbit, experts=False)
        prefixes = {i: f"{MODEL}{n}.experts." for i, (n, _) in enumerate(moe_layers(model))}
        source = LowBitRunSource(files, prefixes, per_layer)  # dtype None: the low-bit buffers keep theirs
        held = formats[0] if len(formats) == 1 else per_layer  # one pool, or one per format
        materialize_with_store(model, source, budget_bytes, policy, None, prefetch, held)
        read_model_into(path, model, unread_ok=lambda n: ".experts.up." in n or ".experts.down." in n)
        return model.eval()
    if fmt == "auto":
        raise ValueError(AUTO_NEEDS_QUANTIZED_RUN)
    names = {
        i: (f"{MODEL}{n}.experts.w_up", f"{MODEL}{n}.experts.w_down") for i, (n, _) in enumerate(moe_layers(model))
    }
    dtype = files.entry(next(iter(names.values()))[0]).dtype
    materialize_with_store(model, StackedSource(files, names), budget_bytes, policy, dtype, prefetch, fmt)
    experts = {n[len(MODEL) :] for pair in names.values() for n in pair}
    read_model_into(path, model, unread_ok=experts.__contains__)
    return model.eval()


__all__ = [
    "Budget",
    "ExpertPool",
    "ExpertSource",
    "LFRU",
    "LFU",
    "LRU",
    "LowBitRunSource",
    "MixedPool",
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
    "expert_pools",
    "belady",
    "load_run_with_store",
    "make_policy",
    "materialize_with_store",
    "moe_layers",
    "parse_bytes",
    "pool_trace",
    "plan_budget",
    "prefetch_stats",
    "record_traces",
    "replay",
    "store_stats",
]
