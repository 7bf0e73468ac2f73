"""A Hugging Face MoE folder read by byte range, tensor by tensor, into a model built on the meta
device: peak memory while loading is what the model keeps (plus one tensor in flight). Without a
budget every tensor is read into place in the folder's own dtype; with one (``expert_memory``)
only the non-expert tensors are, and each expert comes into the expert store's pool
(:mod:`moekit.store`) when routing asks for it.

transformers checkpoints keep each expert's projections as ``nn.Linear`` weights, ``(out, in)``:
per expert (``experts.{e}.{gate,up,down}_proj.weight``, Mixtral's ``w1, w3, w2``) or stacked
(``experts.gate_up_proj`` ``(E, 2F, D)``, ``experts.down_proj`` ``(E, D, F)``). moekit's expert is
``x @ w_up`` then ``act(.) @ w_down`` with ``w_up = [gate.T | up.T]`` ``(D, 2F)`` and ``w_down =
down.T`` ``(F, D)``: a read lands in a small staging tensor and is copied transposed into the
slot, the same values the all-in-memory load puts in its stacked parameters.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Optional, Union, cast

import torch
from torch import Tensor

from ..config import LMConfig
from ..layer.experts import GroupedExperts
from ..models.lm import MoETransformer
from ..store import AUTO_NEEDS_QUANTIZED_RUN, SafetensorsFiles, StoreFileError, materialize_with_store
from ..store.experts import quantize_into
from .hf import _PER_EXPERT, WeightMismatchError, _check_family, config_from_hf, hf_to_moekit_items

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.")


class HFExpertSource:
    """Experts of a transformers folder, by (MoE layer ordinal, expert), in moekit's layout."""

    def __init__(self, files: SafetensorsFiles, cfg: LMConfig, family: str):
        self.files = files
        self._local = threading.local()
        self.gate, self.up, self.down = _PER_EXPERT[family]
        self.prefix: dict[int, str] = {}  # MoE layer ordinal -> "model.layers.{i}.<mlp|block_sparse_moe>.experts."
        moe_blocks = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        for j, i in enumerate(moe_blocks):
            for part in ("block_sparse_moe", "mlp"):
                pre = f"model.layers.{i}.{part}.experts."
                if any(n.startswith(pre) for n in files.entries):
                    self.prefix[j] = pre
                    break
            else:
                raise WeightMismatchError(f"no expert tensors for layer {i} (model.layers.{i}.mlp.experts.*)")

    @property
    def expert_file_bytes(self) -> int:
        """Bytes of one expert in the folder (its three projections, layer 0's)."""
        pre = self.prefix[0]
        if self._fused(0):
            return sum(self.files.entry(pre + n).row_bytes for n in ("gate_up_proj", "down_proj"))
        return sum(
            self.files.entry(f"{pre}0.{n}.weight").row_bytes * self.files.entry(f"{pre}0.{n}.weight").shape[0]
            for n in (self.gate, self.up, self.down)
        )

    def _fused(self, layer: int) -> bool:
        return self.prefix[layer] + "gate_up_proj" in self.files.entries

    def check(self, layer: int, num_experts: int, up_DH: tuple[int, ...], down_FD: tuple[int, ...]) -> None:
        pre, (D, H), F = self.prefix[layer], up_DH, down_FD[0]
        if self._fused(layer):
            self._need(pre + "gate_up_proj", (num_experts, H, D))
            self._need(pre + "down_proj", (num_experts, D, F))
            return
        for e in range(num_experts):
            self._need(f"{pre}{e}.{self.gate}.weight", (F, D))
            self._need(f"{pre}{e}.{self.up}.weight", (F, D))
            self._need(f"{pre}{e}.{self.down}.weight", (D, F))

    def _need(self, name: str, shape: tuple[int, ...]) -> None:
        entry = self.files.entries.get(name)
        if entry is None:
            raise WeightMismatchError(f"missing tensor {name!r} in the transformers checkpoint")
        if entry.shape != shape:
            raise WeightMismatchError(f"tensor {name!r}: expected shape {shape}, got {entry.shape}")

    def read_expert(self, layer: int, e: int, up_DH: Tensor, down_FD: Tensor) -> None:
        for part in self.read_parts(layer, e, up_DH, down_FD):
            part()

    def read_parts(self, layer: int, e: int, up_DH: Tensor, down_FD: Tensor) -> list[Callable[[], object]]:
        """Expert ``e``'s projections, one independent read each (the pool runs them on several
        threads at once): read into the running thread's staging tensor, then copied transposed
        into the slot (through a contiguous transpose: a transposed copy straight into the slot's
        column half is ~3x slower)."""
        pre, D, F = self.prefix[layer], up_DH.shape[0], down_FD.shape[0]
        if self._fused(layer):
            return [
                partial(self._read_t, pre + "gate_up_proj", up_DH, e, (up_DH.shape[1], D)),
                partial(self._read_t, pre + "down_proj", down_FD, e, (D, F)),
            ]
        return [
            partial(self._read_t, f"{pre}{e}.{self.gate}.weight", up_DH[:, :F], 0, (F, D)),
            partial(self._read_t, f"{pre}{e}.{self.up}.weight", up_DH[:, F:], 0, (F, D)),
            partial(self._read_t, f"{pre}{e}.{self.down}.weight", down_FD, 0, (D, F)),
        ]

    def _read_t(self, name: str, dst_IO: Tensor, row: int, shape: tuple[int, ...]) -> None:
        """Tensor ``name`` (its row ``row`` of a stacked one; 0 for a whole 2-D one) transposed into ``dst_IO``."""
        w_OI = self.files.read_rows(name, self._staging("read", shape, dst_IO), row)
        if dst_IO.is_contiguous():
            dst_IO.copy_(w_OI.t())
        else:  # a column block of the slot: through a contiguous transpose
            dst_IO.copy_(self._staging("t", tuple(dst_IO.shape), dst_IO).copy_(w_OI.t()))

    def read_lowbit(self, layer: int, e: int, up: dict[str, Tensor], down: dict[str, Tensor]) -> None:
        """Expert ``e`` into slots of the checkpoint's own ``(out, in)`` layout: float slots read
        straight into their rows (no transpose); int8 / int4 slots quantized from the read rows."""
        packed = 2 if "zeros" in up else 1  # int4 holds two values per byte
        pre = self.prefix[layer]
        H, D = up["data"].shape[0], up["data"].shape[1] * packed
        F = down["data"].shape[1] * packed
        if set(up) == {"data"} and set(down) == {"data"}:
            up_HD, down_DF = up["data"], down["data"]
        else:  # the file's rows first, then quantized into the slot
            entry = self.files.entry(pre + ("gate_up_proj" if self._fused(layer) else f"{e}.{self.gate}.weight"))
            like = torch.empty((), dtype=entry.dtype)
            up_HD, down_DF = self._staging("lowbit-up", (H, D), like), self._staging("lowbit-down", (D, F), like)
        if self._fused(layer):
            self.files.read_rows(pre + "gate_up_proj", up_HD, e)
            self.files.read_rows(pre + "down_proj", down_DF, e)
        else:
            half = up_HD.shape[0] // 2
            self.files.read_rows(f"{pre}{e}.{self.gate}.weight", up_HD[:half])
            self.files.read_rows(f"{pre}{e}.{self.up}.weight", up_HD[half:])
            self.files.read_rows(f"{pre}{e}.{self.down}.weight", down_DF)
        if up_HD is not up["data"]:
            quantize_into(up, up_HD)
            quantize_into(down, down_DF)

    def _staging(self, role: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """This thread's reusable tensor for ``role`` (reallocating 4 MiB per read costs page faults)."""
        cache = self._local.__dict__.setdefault("staging", {})
        key = (role, shape, like.dtype)
        if key not in cache:
            cache[key] = torch.empty(shape, dtype=like.dtype)
        return cache[key]


class FolderState(Mapping[str, Tensor]):
    """A folder's non-expert tensors under transformers' in-memory names, each read from its shard
    when asked for (and not kept); the experts as stacked placeholders on the meta device, so the
    name mapping (:func:`~moekit.interop.hf.hf_to_moekit_items`) runs unchanged and reads none."""

    def __init__(self, files: SafetensorsFiles, cfg: LMConfig):
        assert cfg.moe is not None
        self.files = files
        self.names = {
            n.replace(".block_sparse_moe.gate.", ".mlp.gate."): n  # Mixtral's router name
            for n in files.entries
            if not _EXPERT.match(n)
        }
        D, F, E = cfg.dim, cfg.moe.hidden_dim, cfg.moe.num_experts
        self.placeholders: dict[str, Tensor] = {}
        for i in range(cfg.n_layers):
            if cfg.is_moe_layer(i):
                pre = f"model.layers.{i}.mlp.experts."
                self.placeholders[pre + "gate_up_proj"] = torch.empty(E, 2 * F, D, device="meta")
                self.placeholders[pre + "down_proj"] = torch.empty(E, D, F, device="meta")

    def __getitem__(self, key: str) -> Tensor:
        if key in self.placeholders:
            return self.placeholders[key]
        return self.files.read(self.names[key])

    def __iter__(self) -> Iterator[str]:
        yield from self.names
        yield from self.placeholders

    def __len__(self) -> int:
        return len(self.names) + len(self.placeholders)

    def __contains__(self, key: object) -> bool:
        return key in self.names or key in self.placeholders


def _open_folder(path: str, training_losses: bool) -> tuple[SafetensorsFiles, LMConfig, HFExpertSource]:
    """The folder's shards (headers only), its moekit config and its experts' source."""
    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json (expected a save_pretrained folder)")
    config = json.loads(cfg_path.read_text())
    _check_family(config)  # before reading any weights
    family, cfg = config_from_hf(config, training_losses=training_losses)
    try:
        files = SafetensorsFiles.of(folder)
    except StoreFileError as err:
        raise FileNotFoundError(str(err)) from None
    return files, cfg, HFExpertSource(files, cfg, family)


def read_non_experts(model: MoETransformer, files: SafetensorsFiles, cfg: LMConfig) -> None:
    """Every tensor of ``model`` but the stacked experts, read from the folder into place one at a
    time (shapes checked; missing and unexpected tensors named)."""
    expected = model.state_dict()
    done = set()
    with torch.no_grad():
        for key, value in hf_to_moekit_items(FolderState(files, cfg), cfg):
            if value.is_meta:
                continue  # the experts: read by HFExpertSource
            if key not in expected:
                raise WeightMismatchError(f"tensor {key!r} has no place in the moekit model")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise WeightMismatchError(
                    f"tensor {key!r}: expected shape {tuple(expected[key].shape)}, got {tuple(value.shape)}"
                )
            expected[key].copy_(value)
            done.add(key)
    skip = ("expert_usage", "steps_unused", "experts.w_up", "experts.w_down")
    missing = sorted(k for k in expected if k not in done and not k.endswith(skip))
    if missing:
        raise WeightMismatchError(f"missing tensor(s) for the moekit model: {', '.join(missing)}")


def load_hf_streaming(
    path: str, *, dtype: Optional[torch.dtype] = None, training_losses: bool = False
) -> MoETransformer:
    """:func:`moekit.interop.load_hf` of a folder, read into place: the model is built on the meta
    device and allocated once in ``dtype`` (default: the folder's, as its embedding has it), then
    each tensor and each expert is read into its parameter. Peak memory: the model plus one tensor
    (the page cache is told to drop what was read). In eval mode."""
    files, cfg, source = _open_folder(path, training_losses)
    dtype = dtype or files.entry("model.embed_tokens.weight").dtype
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model.to(dtype).to_empty(device="cpu")
    model.reset_buffers()
    stacks = [cast(GroupedExperts, moe.experts) for moe in model.moe_layers]
    for j, ex in enumerate(stacks):  # the shapes of every expert, before any read
        source.check(j, ex.num_experts, tuple(ex.w_up.shape[1:]), tuple(ex.w_down.shape[1:]))
    read_non_experts(model, files, cfg)
    with torch.no_grad():
        for j, ex in enumerate(stacks):
            for e in range(ex.num_experts):
                source.read_expert(j, e, ex.w_up[e], ex.w_down[e])
    files.close()
    return model.eval()


def load_hf_with_store(
    path: str,
    budget_bytes: int,
    *,
    dtype: Optional[torch.dtype] = None,
    training_losses: bool = False,
    policy: str = "lfru",
    prefetch: Union[bool, int] = False,
    fmt: Optional[str] = None,
) -> MoETransformer:
    """:func:`moekit.interop.load_hf` of a folder with its experts in an expert store of
    ``budget_bytes`` (see :mod:`moekit.store`): built on the meta device, the non-expert tensors
    read into place, the experts read by byte range as routing asks. ``fmt`` (fp32, fp16 or
    bf16): the slots keep the checkpoint's ``(out, in)`` layout in that dtype, read without a
    transpose and computed by ``F.linear`` (faster on CPUs; not bit-identical to the
    all-in-memory model, whose experts are ``(in, out)``). In eval mode."""
    if fmt == "auto":
        raise ValueError(AUTO_NEEDS_QUANTIZED_RUN)
    files, cfg, source = _open_folder(path, training_losses)
    if cfg.moe is None:
        raise ValueError(f"{path} has no MoE layers: nothing to put in an expert store")
    first = source.prefix[0] + ("gate_up_proj" if source._fused(0) else f"0.{source.gate}.weight")
    dtype = dtype or files.entry(first).dtype
    with torch.device("meta"):
        model = MoETransformer(cfg)
    materialize_with_store(model, source, budget_bytes, policy, dtype, prefetch, fmt)
    read_non_experts(model, files, cfg)
    return model.eval()


__all__ = ["FolderState", "HFExpertSource", "load_hf_streaming", "load_hf_with_store", "read_non_experts"]
