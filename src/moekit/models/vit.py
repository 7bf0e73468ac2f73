"""A small Vision Transformer whose MLPs are MoE layers: V-MoE (Riquelme et al. 2021,
"Scaling Vision with Sparse Mixture of Experts"), or Soft MoE (Puigcerver et al. 2023).

Pre-norm ViT (Dosovitskiy et al. 2021): non-overlapping patches -> linear embedding + learned
positions -> blocks of (LayerNorm, multi-head self-attention, LayerNorm, MLP) -> mean pool ->
linear head. Every ``moe_every``-th block (V-MoE: every other one) replaces its MLP by a
``moekit.MoE`` (top-k routing with a capacity factor and Batch Prioritized Routing,
``capacity_priority="score"``) or a ``moekit.SoftMoE``.

At inference ``model(x, top_k=..., capacity_factor=...)`` changes k and the capacity of every
sparse MoE layer without retraining (V-MoE's compute/accuracy trade-off), and
:meth:`VisionTransformer.flops_per_image` counts what that call computed.

Shape legend: B images, C channels, Hi/Wi image height/width, N patches, P pixel values per
patch, D model width, H heads, Dh head width, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import MoEConfig, _DictMixin
from ..layer import FeedForward, MoE
from ..layer.experts import GATED, GroupedExperts
from ..layer.moe import _UNSET
from ..layer.soft import SoftMoE

FFN_KINDS = ("dense", "moe", "soft")


@dataclass
class ViTConfig(_DictMixin):
    """A small ViT for square images."""

    image_size: int = 8  # image height = width (pixels)
    patch_size: int = 2  # patch height = width; N = (image_size / patch_size)^2 patches
    channels: int = 1  # input channels C
    num_classes: int = 10  # classes K
    dim: int = 64  # model width D
    depth: int = 4  # transformer blocks
    heads: int = 4  # attention heads H
    mlp_hidden: int = 128  # hidden width of the dense MLPs
    mlp_kind: str = "gelu"  # activation of the dense MLPs (ViT: GELU)
    ffn: str = "moe"  # the MLP of every moe_every-th block: "moe" (V-MoE), "soft" (Soft MoE) or "dense"
    moe: MoEConfig | None = None  # the sparse MoE layer (ffn="moe"); None: 8 GELU experts, top-2, BPR, capacity 1.0
    moe_every: int = 2  # an MoE MLP in every n-th block, the last block included (V-MoE: every other block)
    soft_experts: int = 8  # ffn="soft": experts E
    soft_slots_per_expert: int = 1  # ffn="soft": slots S per expert
    soft_hidden: int | None = None  # ffn="soft": expert hidden width (None: mlp_hidden)
    dropout: float = 0.0  # dropout on the attention/MLP outputs

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}; got {self.ffn!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size must divide image_size ({self.image_size}); got {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"heads must divide dim ({self.dim}); got {self.heads}")
        if self.ffn == "moe" and self.moe is None:
            self.moe = MoEConfig(
                dim=self.dim,
                hidden_dim=self.mlp_hidden,
                num_experts=8,
                top_k=2,
                expert="gelu",
                renormalize=False,
                capacity_factor=1.0,
                capacity_priority="score",
                z_loss_weight=0.0,
            )
        if self.moe is not None and self.moe.dim != self.dim:
            raise ValueError(f"moe.dim must equal dim ({self.dim}); got {self.moe.dim}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def is_moe_block(self, i: int) -> bool:
        return self.ffn != "dense" and (self.depth - 1 - i) % self.moe_every == 0


@dataclass
class ViTOutput:
    logits: Tensor  # (B, K)
    aux_loss: Tensor  # sum of the MoE layers' auxiliary losses
    moe: list = field(default_factory=list)  # per MoE block, its MoEOutput / SoftMoEOutput


def patchify(x_BCHW: Tensor, p: int) -> Tensor:
    """(B, C, Hi, Wi) -> (B, N, P) non-overlapping p x p patches in row-major order, P = C*p*p."""
    B, C, Hi, Wi = x_BCHW.shape
    x = x_BCHW.reshape(B, C, Hi // p, p, Wi // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (Hi // p) * (Wi // p), C * p * p)


class Block(nn.Module):
    mlp: MoE | SoftMoE | FeedForward

    def __init__(self, cfg: ViTConfig, moe_block: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.kind = cfg.ffn if moe_block else "dense"
        if self.kind == "moe":
            assert cfg.moe is not None  # ViTConfig sets a default for ffn="moe"
            self.mlp = MoE(cfg.moe)
        elif self.kind == "soft":
            self.mlp = SoftMoE(
                cfg.dim,
                cfg.soft_hidden or cfg.mlp_hidden,
                cfg.soft_experts,
                cfg.soft_slots_per_expert,
                expert=cfg.mlp_kind,
            )
        else:
            self.mlp = FeedForward(cfg.dim, cfg.mlp_hidden, cfg.mlp_kind)

    def forward(self, x_BND: Tensor, top_k, capacity_factor):
        h = self.norm1(x_BND)
        x_BND = x_BND + self.drop(self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(x_BND)
        res = None
        if self.kind == "moe":
            res = self.mlp(h, top_k=top_k, capacity_factor=capacity_factor)
            y = res.out
        elif self.kind == "soft":
            res = self.mlp(h)
            y = res.out
        else:
            y = self.mlp(h)
        return x_BND + self.drop(y), res


class VisionTransformer(nn.Module):
    """ViT / V-MoE / Soft-MoE ViT classifier (see the module docstring).

    Example::

        model = VisionTransformer(ViTConfig(image_size=8, patch_size=2, ffn="moe"))
        res = model(images_B1HW)
        loss = F.cross_entropy(res.logits, labels) + res.aux_loss
        res = model(images_B1HW, top_k=1, capacity_factor=0.5)   # cheaper inference
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        P = cfg.channels * cfg.patch_size**2
        self.embed = nn.Linear(P, cfg.dim)
        self.pos_ND = nn.Parameter(torch.randn(cfg.num_patches, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList([Block(cfg, cfg.is_moe_block(i)) for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, x_BCHW: Tensor, *, top_k: int | None = None, capacity_factor=_UNSET) -> ViTOutput:
        if x_BCHW.dim() == 3:
            x_BCHW = x_BCHW.unsqueeze(1)
        x_BND = self.embed(patchify(x_BCHW, self.cfg.patch_size)) + self.pos_ND
        aux = x_BND.new_zeros((), dtype=torch.float32)
        outs = []
        for block in self.blocks:
            x_BND, res = block(x_BND, top_k, capacity_factor)
            if res is not None:
                aux = aux + res.aux_loss
                outs.append(res)
        logits_BK = self.head(self.norm(x_BND).mean(1))
        return ViTOutput(logits_BK, aux, outs)

    def flops_per_image(self, res: ViTOutput, batch: int) -> float:
        """Multiply-adds x 2 per image of the call that returned ``res``: the dense parts
        (embedding, attention, dense MLPs, router, head) plus the expert FFNs of the slots that
        were kept (dropped slots cost nothing). LayerNorms, softmaxes and activations are ignored."""
        c = self.cfg
        N, D, P = c.num_patches, c.dim, c.channels * c.patch_size**2
        fl: float = 2 * N * P * D + 2 * D * c.num_classes
        moe_outs = iter(res.moe)
        for block in self.blocks:
            assert isinstance(block, Block)
            fl += 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D  # qkv, scores + mix, output proj
            if block.kind == "dense":
                up = c.mlp_hidden * (2 if GATED[c.mlp_kind] else 1)
                fl += 2 * N * (D * up + c.mlp_hidden * D)
                continue
            r = next(moe_outs)
            assert isinstance(block.mlp, (MoE, SoftMoE)) and isinstance(block.mlp.experts, GroupedExperts)
            ex = block.mlp.experts
            per_row = 2 * (D * ex.w_up.shape[-1] + ex.hidden_dim * D)
            if isinstance(block.mlp, MoE):  # block.kind == "moe"
                rows = float(r.stats["tokens_per_expert"].sum()) / batch
                fl += 2 * N * D * block.mlp.num_experts + rows * per_row  # router + kept slots
            else:  # soft: logits, dispatch and combine mixes, M slot rows
                M = block.mlp.num_slots
                fl += 2 * N * D * M * 3 + M * per_row
        return float(fl)


__all__ = ["ViTConfig", "ViTOutput", "VisionTransformer", "patchify"]
