"""A decoder-only MoE Transformer language model, readable top to bottom (after nanoGPT).

RMSNorm, rotary positions, grouped-query attention through ``F.scaled_dot_product_attention``,
and a ``moekit.MoE`` feed-forward in every layer or every n-th (dense FFNs elsewhere, optionally
for the first layers as in DeepSeekMoE). ``moe=None`` gives the dense baseline.

The model is causal: the logits at a position depend on no later position of its sequence, in
training as in evaluation. MoE settings that would break that are refused with a ValueError
(:func:`moekit.config.causal_lm_problem`): expert-choice routing (Zhou et al. 2022) and capacity
limits whose drops a later token can cause (top_k > 1, re-routing, score priority). Top-1 capacity
with token-order drops is kept: a token then competes only with the tokens before it in the batch.

Shape legend: B batch, S sequence, D model width, H heads, Hk key/value heads, Dh head width,
V vocabulary, T = B*S tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # what DCP uses to place shards

from ..config import LMConfig, causal_lm_problem
from ..kernels import native, pages, threads
from ..layer import FeedForward, MoE, MoEOutput
from ..layer.experts import GroupedExperts, LegacyParts, shapes_of, split_legacy_
from ..layer.losses import balance_from_stats
from ..layer.lowbit import QuantizedExperts, check_compilable, lowbit_linears


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x_BHSDh: Tensor, cos_SDh2: Tensor, sin_SDh2: Tensor) -> Tensor:
    """Rotate pairs (x[..., :Dh/2], x[..., Dh/2:]) by position-dependent angles (RoFormer, Su et al. 2021)."""
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos_SDh2 - x2 * sin_SDh2, x1 * sin_SDh2 + x2 * cos_SDh2], dim=-1)
    return out.to(x_BHSDh.dtype)


def _attention_math(q_BHSDh: Tensor, k_BHLDh: Tensor, v_BHLDh: Tensor, mask_SL: Tensor, groups: int) -> Tensor:
    """Masked softmax attention written out, for the compiled CPU decode step: inductor fuses it
    with its neighbours, where its SDPA call is a flash kernel that costs ~150 us per layer at one
    query over 128 cached positions (benchmarks/RESULTS.md, "Native decode kernels")."""
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        k_BHLDh, v_BHLDh = k_BHLDh.repeat_interleave(groups, 1), v_BHLDh.repeat_interleave(groups, 1)
    s_BHSL = (q_BHSDh @ k_BHLDh.transpose(-1, -2)) * q_BHSDh.shape[-1] ** -0.5
    return torch.softmax(s_BHSL.masked_fill(~mask_SL, float("-inf")), -1) @ v_BHLDh


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding."""

    k: list = field(default_factory=list)  # per layer (B, Hk, S_max, Dh)
    v: list = field(default_factory=list)
    length: int = 0  # positions filled

    @classmethod
    def empty(cls, cfg: LMConfig, batch: int, device, dtype, positions: Optional[int] = None) -> KVCache:
        """Zeroed keys and values for ``positions`` (default: the model's ``max_seq_len``)."""
        hk, dh = cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads
        shape = (batch, hk, positions or cfg.max_seq_len, dh)
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            0,
        )


class Linear(nn.Linear):
    """``nn.Linear`` whose batch-1 decoding splits its rows between threads
    (:func:`moekit.kernels.threads.decode_threads`)."""

    def forward(self, x: Tensor) -> Tensor:
        return threads.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    q_norm: Optional[RMSNorm]
    k_norm: Optional[RMSNorm]

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.h, self.hk, self.dh = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads
        self.wq = Linear(cfg.dim, self.h * self.dh, bias=cfg.attn_bias)
        self.wk = Linear(cfg.dim, self.hk * self.dh, bias=cfg.attn_bias)
        self.wv = Linear(cfg.dim, self.hk * self.dh, bias=cfg.attn_bias)
        self.wo = Linear(self.h * self.dh, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        self.q_norm = self.k_norm = None
        if cfg.qk_norm is not None:  # "head": over each head's Dh (Qwen3-MoE); "full": over H*Dh / Hk*Dh (OLMoE)
            full = cfg.qk_norm == "full"
            self.q_norm = RMSNorm(self.h * self.dh if full else self.dh, cfg.norm_eps)
            self.k_norm = RMSNorm(self.hk * self.dh if full else self.dh, cfg.norm_eps)

    def forward(
        self,
        x_BSD: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: Optional[KVCache],
        layer: int,
        positions_S: Optional[Tensor] = None,
    ) -> Tensor:
        B, S, _ = x_BSD.shape
        qkv = lowbit_linears(x_BSD, (self.wq, self.wk, self.wv))  # one native call when decoding low-bit weights
        q, k, v = qkv if qkv is not None else (self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD))
        if self.qk_norm == "full":
            assert self.q_norm is not None and self.k_norm is not None
            q, k = self.q_norm(q), self.k_norm(k)
        # heads counted from the tensors (not -1: a batch may be empty): under tensor parallelism
        # each rank holds a share of them
        q, k = q.view(B, S, q.shape[-1] // self.dh, self.dh), k.view(B, S, k.shape[-1] // self.dh, self.dh)
        if self.qk_norm == "head":
            assert self.q_norm is not None and self.k_norm is not None
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        v = v.view(B, S, v.shape[-1] // self.dh, self.dh).transpose(1, 2)
        if positions_S is not None:  # static cache (compiled decoding): fixed shapes, positions as data
            assert cache is not None  # decode_step always passes its cache
            return self._attend_static(q, k, v, cache, layer, positions_S)
        start = 0
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start : start + S] = k
            cache.v[layer][:, :, start : start + S] = v
            k, v = cache.k[layer][:, :, : start + S], cache.v[layer][:, :, : start + S]
        mask = None
        if start and S > 1:  # a chunk after cached positions: causal within the chunk, all of the past
            mask = torch.ones(S, start + S, dtype=torch.bool, device=x_BSD.device).tril(start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=(start == 0 and S > 1), enable_gqa=self.hk != self.h
        )
        return self.wo(y.transpose(1, 2).reshape(B, S, y.shape[1] * self.dh))

    def _attend_static(
        self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache, layer: int, positions_S: Tensor
    ) -> Tensor:
        """Write k, v at ``positions_S`` and attend over the whole cache, masking positions after
        each query's own: every shape is fixed, so one compiled graph serves every decode step."""
        B, _, S, _ = q.shape
        cache.k[layer].index_copy_(2, positions_S, k)
        cache.v[layer].index_copy_(2, positions_S, v)
        k_all, v_all = cache.k[layer], cache.v[layer]
        mask_SL = torch.arange(k_all.shape[2], device=q.device)[None, :] <= positions_S[:, None]
        if q.device.type == "cpu" and q.dtype == torch.float32:
            y = _attention_math(q, k_all, v_all, mask_SL, self.h // self.hk)
        else:
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask_SL, enable_gqa=self.hk != self.h)
        return self.wo(y.transpose(1, 2).reshape(B, S, y.shape[1] * self.dh))

    def legacy_parts(self, prefix: str, saved: dict) -> LegacyParts:
        """Where a checkpoint written before q, k and v were split (2026-12-05) holds them: the
        rows ``[q; k; v]`` of one ``wqkv`` (:data:`~moekit.layer.experts.LegacyParts`; a
        ``wqkv`` of another shape is left to be reported). ``saved``: the checkpoint's names -> shapes."""
        rows = {"q": self.h * self.dh, "k": self.hk * self.dh, "v": self.hk * self.dh}
        parts: LegacyParts = {}
        for kind, trailing in (("weight", (self.wo.out_features,)), ("bias", ())):
            old = prefix + f"wqkv.{kind}"
            if tuple(saved.get(old, ())) != (sum(rows.values()), *trailing) or prefix + f"wq.{kind}" in saved:
                continue
            start = 0
            for n, length in rows.items():
                parts[prefix + f"w{n}.{kind}"] = (old, 0, start, length)
                start += length
        return parts

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        split_legacy_(state_dict, self.legacy_parts(prefix, shapes_of(state_dict)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Block(nn.Module):
    ffn: nn.Module  # a MoE layer, or a dense FeedForward

    def __init__(self, cfg: LMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.is_moe_layer(layer):  # a balance loss pooled over layers is the model's, not the layer's
            assert cfg.moe is not None  # is_moe_layer is False without it
            moe_cfg = (
                cfg.moe if cfg.balance_pooling == "layer" else dataclasses.replace(cfg.moe, balance_loss_weight=0.0)
            )
            self.ffn = MoE(moe_cfg)
        else:
            self.ffn = FeedForward(cfg.dim, cfg.ffn_hidden_dim, cfg.ffn_kind)

    def forward(
        self, x: Tensor, cos, sin, cache, token_ids, top_k, positions_S=None
    ) -> tuple[Tensor, Optional[MoEOutput]]:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, self.layer, positions_S)
        if isinstance(self.ffn, MoE):
            res = self.ffn(self.ffn_norm(x), top_k=top_k, token_ids=token_ids)
            x = x + res.out
            # The layer's output and combine weights reach the loss through ``x`` (and the router
            # through the auxiliary losses): what the block returns of them is for reading. Detached
            # (no copy) because they are views (the output reshaped from the layer's token rows, the
            # weights sliced from the global routing under expert parallelism): FSDP2 hooks every
            # tensor a wrapped block returns that requires grad, and warns for each view it finds.
            res.out, res.weights_TK = res.out.detach(), _detached(res.weights_TK)
            return x, res
        return x + self.ffn(self.ffn_norm(x)), None


def _detached(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def pooled_balance_loss(moe: Sequence[Optional[MoEOutput]]) -> Optional[Tensor]:
    """The Switch balance loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021) with ``f`` and ``P``
    pooled over the MoE layers: ``f_i`` is expert i's share of all layers' routed slots and
    ``P_i`` its router probability averaged over all layers' tokens. Differentiable through the
    probabilities only, as the per-layer loss. None when no MoE layer saw a token.

    transformers' ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) pools the
    same way over the concatenated router logits of all layers but divides the counts by the
    tokens instead of the slots, so its ``aux_loss`` is ``top_k`` times this value.
    """
    counts, probs = [], []
    for res in moe:
        if res is not None and "mean_router_probs" in res.stats:  # an empty batch has none
            counts.append(res.stats["routed_per_expert"])
            probs.append(res.stats["mean_router_probs"])
    if not counts:
        return None
    return balance_from_stats(torch.stack(counts).sum(0), torch.stack(probs).mean(0))


@dataclass
class LMOutput:
    logits: Tensor  # (B, S, V)
    loss: Optional[Tensor]  # mean next-token cross-entropy (when targets are given)
    moe: list  # per layer: MoEOutput (its out and weights_TK detached) or None (dense layer)
    pooled_balance_weight: Optional[float] = (
        None  # balance_pooling="model": weight of the pooled balance loss (None: per layer)
    )
    loss_sum: Optional[Tensor] = None  # the cross-entropy summed over the counted targets
    n_targets: Optional[Tensor] = None  # targets counted (not ignore_index): loss = loss_sum / n_targets

    @functools.cached_property
    def pooled_balance_loss(self) -> Optional[Tensor]:
        """The unweighted balance loss pooled over the MoE layers (:func:`pooled_balance_loss`)
        when the model pools it (``LMConfig.balance_pooling="model"``), else None."""
        return None if self.pooled_balance_weight is None else pooled_balance_loss(self.moe)

    @functools.cached_property
    def aux_loss(self) -> Tensor:
        """Sum over MoE layers of their weighted auxiliary losses, plus the weighted pooled balance
        loss when the model pools it (summed on first access, so decoding, which never reads it,
        leaves the layers' deferred losses uncomputed)."""
        aux = self.logits.new_zeros((), dtype=torch.float32)
        for res in self.moe:
            if res is not None:
                aux = aux + res.aux_loss
        if self.pooled_balance_weight and self.pooled_balance_loss is not None:
            aux = aux + self.pooled_balance_weight * self.pooled_balance_loss
        return aux


IGNORE_INDEX = -100  # a target that counts for nothing (masked)


def summed_cross_entropy(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    """Next-token cross-entropy summed over the counted targets (not :data:`IGNORE_INDEX`), in
    float32 at least (16-bit logits are upcast; float64 ones stay)."""
    logits_NV = logits_BSV.to(torch.promote_types(logits_BSV.dtype, torch.float32)).reshape(-1, logits_BSV.shape[-1])
    return F.cross_entropy(logits_NV, targets_BS.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


INIT_CHUNK_BYTES = 64 * 2**20  # a parameter's initial values are drawn at most about this many bytes at a time


def _normal_(p: Tensor, std: float, chunk_bytes: Optional[int] = None) -> None:
    """``p`` filled with N(0, std): the values of one draw of its full tensor from the CPU
    generator, drawn in blocks of rows of about ``chunk_bytes``, so that a rank's peak memory
    follows its shard (a DTensor keeps only its block of each) and not the full tensor (a
    DeepSeek-V3-sized stacked expert weight is ~15 GB in float32). CPU ``normal_`` turns each 16
    uniforms into 16 normals and redraws the last 16 values when the count is not a multiple of 16:
    blocks of whole rows holding a multiple of 16 values, the last holding at least 16, give the
    very values of one draw (tested against it). A meta ``p`` (a parameter another pipeline stage
    holds) is drawn and dropped, block by block, leaving the generator where a draw of it would.
    ``chunk_bytes``: default :data:`INIT_CHUNK_BYTES`."""
    chunk_bytes = chunk_bytes or INIT_CHUNK_BYTES
    shape = tuple(p.shape)
    row = math.prod(shape[1:])
    if isinstance(p, DTensor):
        lshape, offset = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
        local = p.to_local()
    else:
        lshape, offset, local = shape, (0,) * len(shape), p
    step = 16 // math.gcd(row, 16)  # rows per multiple of 16 values
    rows = max(step, chunk_bytes // max(1, row * p.element_size()) // step * step)
    start = 0
    while start < shape[0]:
        end = min(shape[0], start + rows)
        if (shape[0] - end) * row < 16:  # the rest would be too short to draw alike: take it now
            end = shape[0]
        block = torch.empty((end - start, *shape[1:]), dtype=p.dtype).normal_(0.0, std)
        lo, hi = max(start, offset[0]), min(end, offset[0] + lshape[0])
        if lo < hi and not local.is_meta:  # this rank's rows of the block, and its columns of them
            cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], lshape[1:]))
            local[lo - offset[0] : hi - offset[0]].copy_(block[(slice(lo - start, hi - start),) + cols])
        start = end


# selective activation checkpointing keeps what these ops return (the matmuls: costly to recompute,
# as torchtitan's per-op policy) and recomputes the rest (norms, activations, softmax, routing)
_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}


def _keep_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(block: nn.Module, mode: str, x: Tensor, cos, sin, idx_BS, top_k):
    """``block`` under activation checkpointing (non-reentrant, Chen et al. 2016): "full" keeps
    only its input and re-runs it in the backward; "selective" keeps its matmuls' outputs too. The
    re-run counts no routing statistics again (:func:`~moekit.layer.scope.in_backward`) and draws
    the same random numbers (the CPU and CUDA generator states are restored)."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if mode == "selective":
        contexts = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
        return checkpoint(block, x, cos, sin, None, idx_BS, top_k, use_reentrant=False, context_fn=contexts)
    return checkpoint(block, x, cos, sin, None, idx_BS, top_k, use_reentrant=False)


class MoETransformer(nn.Module):
    """Decoder-only language model with MoE feed-forward layers."""

    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(self, cfg: LMConfig):
        """Built under ``torch.device("meta")`` the model holds no memory until
        :meth:`materialize_`; either way its initial weights depend only on the CPU random state
        when construction starts (the submodules' own construction-time draws are undone), so a
        model materialised later, or sharded first, gets exactly the same values."""
        super().__init__()
        why = None if cfg.moe is None else causal_lm_problem(cfg.moe)
        if why:  # LMConfig checks this too; here for a config changed after it was made
            raise ValueError(f"moe: a causal language model cannot use this MoE layer: {why}")
        self.cfg = cfg
        self._activation_checkpointing = "none"
        self._pruned = False  # a pipeline stage's part of the model (moekit.parallel.pipeline): see reset_parameters
        rng = torch.get_rng_state()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.dim // cfg.n_heads // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty_like(self.rope_cos), persistent=False)
        torch.set_rng_state(rng)
        for moe in self.moe_layers:  # e.g. a registered router that, like expert choice, looks at the whole batch
            if moe.router.batch_dependent:
                raise ValueError(
                    f"moe: a causal language model cannot use router {moe.cfg.router!r}: it routes each token "
                    "by the whole batch, later tokens included"
                )
        if not self.embed.weight.is_meta:
            self.reset_buffers()
            self.reset_parameters()

    @property
    def activation_checkpointing(self) -> str:
        """ "none", or "full" / "selective" in training (see :func:`_checkpointed`)."""
        return self.__dict__.get("_activation_checkpointing", "none")  # (a model pickled before it existed)

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: str) -> None:
        self._activation_checkpointing = mode
        for moe in self.moe_layers:  # a compiled block's recomputation must not count routing again
            moe.count_between_graphs_(mode != "none")

    @torch.no_grad()
    def materialize_(self, device: Union[str, torch.device] = "cpu") -> MoETransformer:
        """Allocate a model built on the meta device (after any sharding) and initialise it as
        :meth:`__init__` would have, from the CPU random state it was built with. Sharded
        parameters (DTensors: expert or FSDP parallelism) get their part of the full tensor's
        values, drawn in bounded blocks, so every layout gets the single-process values."""
        self.to_empty(device=device)
        self.reset_buffers()
        self.reset_parameters()
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The non-learned state: rotary tables and each MoE layer's routing bookkeeping."""
        cos, sin = rotary_tables(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for moe in self.moe_layers:
            moe.reset_buffers()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, init_std), output projections scaled by 1/sqrt(2 * layers).
        Parameters are drawn in order from the CPU generator, each as one draw of its full tensor
        would give, in bounded blocks, and each parameter keeps its part (:func:`_normal_`); a
        pipeline stage's model draws (and drops) the other stages' parameters too, so it gets
        the one-process values of its own."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        held = dict(self.named_parameters())
        with torch.device("meta"):  # every parameter of the whole model, in order (a pipeline stage holds some)
            whole = MoETransformer(self.cfg).named_parameters() if self._pruned else held.items()
        for name, p in whole:
            if name.endswith("norm.weight") or not (name.endswith(("w_down", "wo.weight")) or p.dim() >= 2):
                if name in held:
                    held[name].fill_(1.0 if name.endswith("norm.weight") else 0.0)
                continue
            # another stage's parameter: ``p`` itself, on meta, is drawn and dropped
            _normal_(held.get(name, p), out_std if name.endswith(("w_down", "wo.weight")) else std)

    @property
    def moe_layers(self) -> list[MoE]:
        # (a pipeline stage's placeholders for other stages' blocks have no ffn)
        return [f for f in (getattr(b, "ffn", None) for b in self.blocks) if isinstance(f, MoE)]

    def forward(
        self,
        idx_BS: Tensor,
        targets_BS: Optional[Tensor] = None,
        *,
        top_k: Optional[int] = None,
        cache: Optional[KVCache] = None,
    ) -> LMOutput:
        """Logits for every position (and the loss when ``targets_BS`` is given; -100 is ignored).
        A per-call ``top_k`` that would make the model's capacity limit non-causal is refused."""
        self._check_top_k(top_k)
        B, S = idx_BS.shape
        start = cache.length if cache is not None else 0
        if start + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + S} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + S], self.rope_sin[start : start + S]
        x = self.embed(idx_BS)
        moe_out = []
        checkpointed = (
            self.activation_checkpointing != "none" and self.training and torch.is_grad_enabled() and cache is None
        )
        for block in self.blocks:
            if checkpointed:
                x, res = _checkpointed(block, self.activation_checkpointing, x, cos, sin, idx_BS, top_k)
            else:
                x, res = block(x, cos, sin, cache, idx_BS, top_k)
            moe_out.append(res)
        if cache is not None:
            cache.length += S
        logits = self._logits(x)
        loss = loss_sum = n_targets = None
        if targets_BS is not None:  # summed, then divided: data parallelism divides by every rank's count
            loss_sum = summed_cross_entropy(logits, targets_BS)
            n_targets = (targets_BS != IGNORE_INDEX).sum()
            loss = loss_sum / n_targets
        pooled = (
            self.cfg.moe.balance_loss_weight
            if self.cfg.moe is not None and self.cfg.balance_pooling == "model"
            else None
        )
        return LMOutput(logits, loss, moe_out, pooled, loss_sum, n_targets)

    def _check_top_k(self, top_k: Optional[int]) -> None:
        """ValueError when experts per token ``top_k`` would let a capacity limit drop tokens
        because of later ones (:func:`~moekit.config.causal_lm_problem`)."""
        if top_k is not None and self.cfg.moe is not None and top_k != self.cfg.moe.top_k:
            why = causal_lm_problem(self.cfg.moe, top_k)
            if why:
                raise ValueError(f"top_k={top_k} would make this causal language model see later tokens: {why}")

    def decode_step(self, idx_BS: Tensor, cache: KVCache, positions_S: Tensor, top_k: Optional[int] = None) -> Tensor:
        """Logits (B, S, V) of ``idx_BS`` at ``positions_S`` of a full-size ``cache`` (updated in
        place; ``cache.length`` is the caller's). The shapes do not depend on the position, so
        ``torch.compile`` of this method compiles once for decoding (gpt-fast's static cache)."""
        cos, sin = self.rope_cos[positions_S], self.rope_sin[positions_S]
        x = self.embed(idx_BS)
        for block in self.blocks:
            x, _ = block(x, cos, sin, cache, idx_BS, top_k, positions_S)
        return self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        """The final norm and the output projection (tied to the embedding unless ``head`` exists)."""
        x = self.norm(x)
        return threads.linear(x, self.embed.weight) if self.head is None else self.head(x)

    def param_counts(self) -> dict:
        """Total parameters and those active for one token (routed experts counted at K/E)."""
        total = sum(p.numel() for p in self.parameters())
        inactive: float = 0
        for moe in self.moe_layers:
            c = moe.cfg
            expert_params = sum(p.numel() for p in moe.experts.parameters())
            share = (
                (c.capacity_factor or c.top_k) / c.num_experts
                if c.router == "expert_choice"
                else c.top_k / c.num_experts
            )
            inactive += expert_params * (1 - min(1.0, share))
        embed = self.embed.weight.numel()
        return {
            "total": total,
            "active": int(total - inactive),
            "embedding": embed,
            "active_non_embedding": int(total - inactive - embed),
        }

    @torch.no_grad()
    def generate(
        self,
        idx_BS: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k_experts: Optional[int] = None,
        use_cache: bool = True,
        generator: Optional[torch.Generator] = None,
        compile: bool = False,
    ) -> Tensor:
        """Sample continuations. temperature 0 is greedy; top_p is nucleus sampling (Holtzman et al. 2020).

        ``compile=True`` decodes with :meth:`decode_step` under ``torch.compile`` (a static KV
        cache, compiled once per model, batch size and ``top_k_experts``; the prompt is run
        eagerly); it needs the KV cache. Greedy tokens are the same as without it."""
        if compile and not use_cache:
            raise ValueError("compile=True decodes with the static KV cache: it needs use_cache=True")
        check_sampling(temperature, top_p)
        self._check_top_k(top_k_experts)  # the compiled decode_step does not go through forward
        total = idx_BS.shape[1] + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={self.cfg.max_seq_len}")
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        # eager decoding keeps what it will fill; the compiled step attends over its whole cache, of
        # a fixed size per call: the next power of two (one compilation per size, at most log2(context))
        positions = min(self.cfg.max_seq_len, 1 << (total - 1).bit_length()) if compile else total
        cache = KVCache.empty(self.cfg, idx_BS.shape[0], p.device, p.dtype, positions) if use_cache else None
        out = idx_BS
        step_in = idx_BS
        self.prepare_decoding_(compile)
        step = self._compiled_decode_step() if compile else None
        split = threads.splits(self)
        with ExitStack() as steps_after_the_first:
            for i in range(max_new_tokens):
                if step is not None:
                    assert cache is not None  # compile needs use_cache (checked above)
                    if i == 2:  # step 1 checked the guards on the shapes every later step has
                        steps_after_the_first.enter_context(skip_guard_checks())
                    pos = torch.arange(out.shape[1] - step_in.shape[1], out.shape[1], device=p.device)
                    logits = (step if i else self.decode_step)(step_in, cache, pos, top_k_experts)[:, -1].float()
                else:  # one-token steps split their weight reads between the CPU's threads
                    with threads.decode_threads() if split and i and use_cache else nullcontext():
                        logits = self(step_in if use_cache else out, top_k=top_k_experts, cache=cache).logits[:, -1]
                    logits = logits.float()
                nxt = sample_next(logits, temperature, top_p, generator)
                out = torch.cat([out, nxt], dim=1)
                step_in = nxt
        self.train(was_training)
        return out

    def prepare_decoding_(self, compile: bool = False) -> MoETransformer:
        """Lay the routed experts out in memory for decoding on the CPU (values unchanged):
        rows-major (:meth:`GroupedExperts.rows_major_`) when the decode step is compiled (its
        loops read each output's weights contiguously: fp32 1.7x, bf16 2.1x the compiled tokens/s)
        or the experts are 16-bit (PyTorch's eager 16-bit GEMV reads the other layout ~10x slower:
        fp16 3.9 -> 42 tok/s), or moekit's native kernels are built (one float32 token's chosen experts
        then run in one native call over these rows); otherwise float32 eager keeps the stacked
        layout MKL reads fastest. Compiled, low-bit weights must be native formats (:func:`check_compilable`).
        benchmarks/RESULTS.md, "Decode threads and compiled decoding on the CPU".
        Then the CPU weights move onto huge pages, one mapping per block (:mod:`moekit.kernels.pages`:
        fewer TLB misses while a step streams them), where the system offers them."""
        if compile:
            check_compilable(self)
        for moe in self.moe_layers:
            experts = moe.experts
            if isinstance(experts, GroupedExperts) and experts.w_up.device.type == "cpu":
                if compile or experts.w_up.dtype in (torch.float16, torch.bfloat16) or native.available():
                    experts.rows_major_()
        if pages.available():
            pages.move_to_huge_pages_([*self.blocks, self])
        for moe in self.moe_layers:
            if isinstance(moe.experts, QuantizedExperts):
                moe.experts.prepare_decoding_()
        return self

    def _compiled_decode_step(self):
        """``torch.compile`` of :meth:`decode_step`, made once per model (kept outside the module's
        state: a plain attribute, not saved, not copied by ``state_dict``), after
        :meth:`prepare_decoding_`. On the CPU inductor writes the step's wrapper in C++
        (``cpp_wrapper``): its kernels are called without a Python statement each, which a small
        model's step is mostly made of (benchmarks/RESULTS.md, "The default trained model against
        llama.cpp; the compiled step's per-token overhead")."""
        if getattr(self, "_decode_step_compiled", None) is None:
            self.prepare_decoding_(compile=True)
            if next(self.parameters()).device.type == "cpu":
                # no size or alignment asserts on the inputs: the guards check the same on a loop's
                # first step, and the loop's later steps pass the same tensors (skip_guard_checks)
                options: dict[str, Union[str, int, bool, Callable]] = dict(
                    cpp_wrapper=True, size_asserts=False, alignment_asserts=False
                )
                compiled = torch.compile(self.decode_step, fullgraph=True, options=options)
            else:
                compiled = torch.compile(self.decode_step, fullgraph=True)
            object.__setattr__(self, "_decode_step_compiled", compiled)
        return self._decode_step_compiled


# threads that never run compiled code: tqdm's monitor (inductor's progress bars start it), moekit's decode pool
_THREADS_WITHOUT_COMPILED_CODE = ("tqdm_monitor", "moekit-decode")


def skip_guard_checks():
    """A context in which compiled code runs without checking ``torch.compile``'s guards again
    (``skip_guard_eval_unsafe``: only the guards that tell its cached graphs apart): for the steps of
    a decode loop after its first compiled ones, whose inputs keep the shapes, dtypes and modules
    those were checked on. The check costs ~80 of the ~650 us of a compiled step of the small default
    model (benchmarks/RESULTS.md). The setting is the whole process's, so it applies only while no
    other thread could run compiled code (one that did, e.g. another ``generate``'s first step on
    new shapes, would get a graph without its guards checked: a wrong answer); under a stance other
    than the plain default (``force_eager``, a caller's own backend or skipping) nothing changes either."""
    from torch._dynamo import eval_frame

    stance = getattr(eval_frame, "_stance", None)
    plain = getattr(stance, "stance", None) == "default" and getattr(stance, "backend", 0) is None
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    alone = all(t.name.startswith(_THREADS_WITHOUT_COMPILED_CODE) for t in others)
    if not plain or not alone or getattr(stance, "skip_guard_eval_unsafe", True):
        return nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def check_sampling(temperature: float, top_p: float, names: tuple[str, str] = ("temperature", "top_p")) -> None:
    """ValueError naming the argument (``names``: how the caller spells them) unless temperature is
    a finite number >= 0 and 0 < top_p <= 1."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{names[0]} must be a finite number >= 0 (0 = greedy); got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{names[1]} must be in (0, 1]; got {top_p}")


def sample_next(logits_BV: Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> Tensor:
    if temperature == 0:
        return logits_BV.argmax(-1, keepdim=True)
    probs = torch.softmax(logits_BV / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)


PRESETS = {
    # name: (MoEConfig overrides, LMConfig overrides) for the small CPU models; dims are filled in by the caller
    "mixtral": dict(num_experts=8, top_k=2, router="topk", renormalize=True),
    "switch": dict(num_experts=8, top_k=1, router="switch", capacity_factor=1.25, eval_capacity_factor=2.0),
    "deepseek": dict(
        num_experts=16, top_k=4, router="sigmoid", num_shared_experts=1, renormalize=True, balance_loss_weight=1e-4
    ),
    "qwen_moe": dict(
        num_experts=16, top_k=4, router="topk", num_shared_experts=1, shared_expert_gate=True, renormalize=False
    ),
}
