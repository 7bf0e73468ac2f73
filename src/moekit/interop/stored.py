"""A Hugging Face MoE folder loaded with its experts left in its safetensors shards: only the
non-expert tensors are read at load time; each expert comes into the expert store's pool
(:mod:`moekit.store`) by byte range when routing asks for it.

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
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..config import LMConfig
from ..models.lm import MoETransformer
from ..store import SafetensorsFiles, StoreFileError, materialize_with_store
from .hf import _PER_EXPERT, WeightMismatchError, _check_family, _hf_to_moekit, _load_state, config_from_hf

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.")


class HFExpertSource:
    """Experts of a transformers folder, by (MoE layer ordinal, expert), in moekit's layout."""

    def __init__(self, files: SafetensorsFiles, cfg: LMConfig, family: str):
        self.files = files
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

    def _fused(self, layer: int) -> bool:
        return self.prefix[layer] + "gate_up_proj" in self.files.entries

    def check(self, layer: int, num_experts: int, up_DH: tuple[int, ...], down_FD: tuple[int, ...]) -> None:
        pre, (D, H), F = self.prefix[layer], up_DH, down_FD[0]
        if self._fused(layer):
            self.files.check_shape(pre + "gate_up_proj", (num_experts, H, D))
            self.files.check_shape(pre + "down_proj", (num_experts, D, F))
            return
        for e in range(num_experts):
            self.files.check_shape(f"{pre}{e}.{self.gate}.weight", (F, D))
            self.files.check_shape(f"{pre}{e}.{self.up}.weight", (F, D))
            self.files.check_shape(f"{pre}{e}.{self.down}.weight", (D, F))

    def read_expert(self, layer: int, e: int, up_DH: Tensor, down_FD: Tensor) -> None:
        pre, F = self.prefix[layer], down_FD.shape[0]
        if self._fused(layer):
            up_HD = self.files.read_rows(pre + "gate_up_proj", up_DH.new_empty(up_DH.shape[1], up_DH.shape[0]), e)
            down_DF = self.files.read_rows(pre + "down_proj", down_FD.new_empty(down_FD.shape[1], F), e)
            up_DH.copy_(up_HD.t())
            down_FD.copy_(down_DF.t())
            return
        for name, cols in ((self.gate, slice(0, F)), (self.up, slice(F, 2 * F))):
            w_FD = self.files.read_rows(f"{pre}{e}.{name}.weight", up_DH.new_empty(F, up_DH.shape[0]))
            up_DH[:, cols].copy_(w_FD.t())
        down_FD.copy_(self.files.read_rows(f"{pre}{e}.{self.down}.weight", down_FD.new_empty(down_FD.shape[1], F)).t())


def _non_expert_state(files: SafetensorsFiles, cfg: LMConfig) -> dict:
    """The checkpoint's tensors in transformers' names, experts replaced by stacked placeholders on
    the meta device (so the name mapping runs unchanged and nothing of them is read)."""
    assert cfg.moe is not None
    sd: dict = {}
    for name in files.entries:
        if _EXPERT.match(name):
            continue
        key = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")  # Mixtral's router name
        sd[key] = files.read(name)
    D, F, E = cfg.dim, cfg.moe.hidden_dim, cfg.moe.num_experts
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            pre = f"model.layers.{i}.mlp.experts."
            sd[pre + "gate_up_proj"] = torch.empty(E, 2 * F, D, device="meta")
            sd[pre + "down_proj"] = torch.empty(E, D, F, device="meta")
    return sd


def load_hf_with_store(
    path: str,
    budget_bytes: int,
    *,
    dtype: Optional[torch.dtype] = None,
    training_losses: bool = False,
    policy: str = "lfru",
    prefetch: bool = False,
) -> MoETransformer:
    """:func:`moekit.interop.load_hf` of a folder with its experts in an expert store of
    ``budget_bytes`` (see :mod:`moekit.store`): built on the meta device, the non-expert tensors
    read into place, the experts read by byte range as routing asks. In eval mode."""
    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json (expected a save_pretrained folder)")
    config = json.loads(cfg_path.read_text())
    _check_family(config)
    family, cfg = config_from_hf(config, training_losses=training_losses)
    if cfg.moe is None:
        raise ValueError(f"{folder} has no MoE layers: nothing to put in an expert store")
    try:
        files = SafetensorsFiles.of(folder)
    except StoreFileError as err:
        raise FileNotFoundError(str(err)) from None
    source = HFExpertSource(files, cfg, family)
    first = source.prefix[0] + ("gate_up_proj" if source._fused(0) else f"0.{source.gate}.weight")
    dtype = dtype or files.entry(first).dtype
    with torch.device("meta"):
        model = MoETransformer(cfg)
    materialize_with_store(model, source, budget_bytes, policy, dtype, prefetch)
    new = {k: v for k, v in _hf_to_moekit(_non_expert_state(files, cfg), cfg).items() if not v.is_meta}
    expected = {k for k in model.state_dict()}
    new = {k: v for k, v in new.items() if k in expected}  # the stacked experts are in the store
    with torch.no_grad():
        _load_state(model, new)
    return model.eval()


__all__ = ["HFExpertSource", "load_hf_with_store"]
