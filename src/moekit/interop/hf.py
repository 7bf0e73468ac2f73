"""Hugging Face transformers interoperability: load, export and accelerate MoE causal LMs.

Supported families (``model_type`` in config.json): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

Weight layouts (transformers 5): ``experts.gate_up_proj`` (E, 2F, D) holds [gate; up] rows and
``experts.down_proj`` (E, D, F); moekit's ``GroupedExperts.w_up`` (E, D, 2F) holds [gate | up]
columns and ``w_down`` (E, F, D): one transpose of the last two dims each way. q/k/v projections
map to moekit's ``wq``, ``wk``, ``wv``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional, Union, cast

import torch
from torch import Tensor, nn

from ..config import LMConfig, MoEConfig
from ..kernels import compute_dtype, resolve_backend
from ..kernels.activations import Act
from ..layer.dispatch import dispatch, plan_dispatch, undispatch
from ..layer.experts import stacked_ffn
from ..models.lm import MoETransformer

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe")
_CAUSAL_LM = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
}
_CONFIG = {
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "olmoe": "OlmoeConfig",
    "glm4_moe": "Glm4MoeConfig",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its options) has no moekit equivalent."""


class WeightMismatchError(ValueError):
    """A tensor is missing, unexpected, or has the wrong shape."""


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what}; moekit.interop supports model_type {', '.join(map(repr, SUPPORTED))} "
        f"({', '.join(_CAUSAL_LM[f] for f in SUPPORTED)})"
    )


# ---------------------------------------------------------------------------------------- config
# transformers activations (``hidden_act``) whose gated unit ``act(x W_gate) * (x W_up)`` is one of
# moekit's gated expert kinds (experts, shared expert and dense MLPs alike)
HF_ACTIVATIONS = {
    "silu": "swiglu",
    "swish": "swiglu",
    "gelu_pytorch_tanh": "geglu",  # torch's tanh approximation of GELU: the function moekit's GeGLU calls
    # the same approximation written out in Python: equal up to rounding (a few ulp)
    "gelu_python_tanh": "geglu",
    "gelu_new": "geglu",
    "gelu_fast": "geglu",
    "gelu_accurate": "geglu",
}
_EXPORT_ACTIVATION = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}  # expert kind -> hidden_act written


def _expert_kind(c: dict) -> str:
    """moekit's expert kind for the checkpoint's ``hidden_act`` (UnsupportedModelError naming the choices)."""
    act = _get(c, "hidden_act", "silu")
    if act not in HF_ACTIVATIONS:
        raise _unsupported(
            f"hidden_act={act!r}: moekit's gated experts compute act(x W_gate) * (x W_up) for hidden_act "
            f"{', '.join(map(repr, HF_ACTIVATIONS))} (accelerate() runs any activation on the transformers model)"
        )
    return HF_ACTIVATIONS[act]


def _get(c: dict, key: str, default=None):
    v = c.get(key, default)
    return default if v is None else v


def _rope_theta(c: dict) -> float:
    rp = c.get("rope_parameters") or {}
    rs = c.get("rope_scaling") or {}
    rope_type = rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default"
    if rope_type != "default":
        raise _unsupported(f"rope_type {rope_type!r} (only the default rotary embedding is implemented)")
    return float(rp.get("rope_theta") or c.get("rope_theta") or 10000.0)


def _router_aux_loss_coef(c: dict, family: str) -> float:
    """The checkpoint's ``router_aux_loss_coef`` (transformers' default for the family when absent)."""
    coef = c.get("router_aux_loss_coef")
    if coef is None:
        try:
            import transformers
        except ImportError as err:
            raise _unsupported(
                "config.json has no router_aux_loss_coef and transformers (for its default) is not installed"
            ) from err
        coef = getattr(transformers, _CONFIG[family])().router_aux_loss_coef
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0 or coef == float("inf"):
        raise ValueError(f"router_aux_loss_coef must be a finite number >= 0; got {coef!r}")
    return float(coef)


def config_from_hf(c: dict, *, training_losses: bool = False) -> tuple[str, LMConfig]:
    """(family, LMConfig) for a transformers config dict (``config.to_dict()`` or config.json).

    Auxiliary-loss weights are 0 unless ``training_losses``: then the model trains with the
    checkpoint's own auxiliary loss as transformers computes it (``output_router_logits=True``):
    ``router_aux_loss_coef * load_balancing_loss_func(...)``, the Switch balance loss on slot counts
    and router probabilities pooled over the MoE layers. moekit's pooled loss
    (``balance_pooling="model"``) is normalised to 1 for uniform routing, transformers' to
    ``top_k``, so the weight is ``router_aux_loss_coef * top_k``. No other term (z-loss, ...):
    these families' transformers models add none.
    """
    family = c.get("model_type")
    if family not in SUPPORTED:
        archs = c.get("architectures") or []
        raise _unsupported(
            f"unsupported architecture model_type={family!r}" + (f" ({', '.join(archs)})" if archs else "")
        )
    _check_hf_options(c, family)
    first_dense, every = _hf_layer_placement(c, family)
    moe = _moe_config_from_hf(c, family, training_losses)
    H = c["num_attention_heads"]
    cfg = LMConfig(
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=H,
        n_kv_heads=_get(c, "num_key_value_heads", H),
        max_seq_len=_get(c, "max_position_embeddings", 4096),
        rope_theta=_rope_theta(c),
        norm_eps=float(_get(c, "rms_norm_eps", 1e-6)),
        ffn_hidden_dim=_get(c, "intermediate_size", moe.hidden_dim),
        ffn_kind=moe.expert,  # transformers' dense MLPs use the same hidden_act
        moe=moe,
        moe_every=every,
        first_dense_layers=first_dense,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qk_norm=_hf_qk_norm(c, family),
        attn_bias=_hf_attn_bias(c, family),
        balance_pooling="model",  # transformers' convention (the weight is 0 unless training_losses)
    )
    return family, cfg


def _hf_qk_norm(c: dict, family: str) -> Optional[str]:
    if family == "glm4_moe":
        return "head" if c.get("use_qk_norm") else None
    return {"qwen3_moe": "head", "olmoe": "full"}.get(family)


def _hf_attn_bias(c: dict, family: str) -> bool:
    if family == "glm4_moe":
        return bool(c.get("attention_bias", False))
    return family == "qwen2_moe" and bool(c.get("qkv_bias", True))


def _check_hf_options(c: dict, family: str) -> None:
    """Raise UnsupportedModelError for a config option of a supported family that moekit does not implement."""
    D, H = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim * H != D:
        raise _unsupported(
            f"head_dim={head_dim} with num_attention_heads*head_dim != hidden_size ({H}*{head_dim} != {D})"
        )
    _expert_kind(c)
    jitter = _get(c, "router_jitter_noise", 0.0) if family == "mixtral" else 0.0
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0.0 <= jitter < 1.0:
        raise _unsupported(f"router_jitter_noise={jitter!r} (moekit's router_jitter must be in [0, 1))")
    if c.get("sliding_window") and (family == "mixtral" or c.get("use_sliding_window")):
        raise _unsupported(f"sliding-window attention (sliding_window={c['sliding_window']})")
    if family == "olmoe" and c.get("clip_qkv") is not None:
        raise _unsupported(f"OLMoE clip_qkv={c['clip_qkv']}")
    if family in ("olmoe", "qwen3_moe") and c.get("attention_bias"):
        raise _unsupported(f"{family} attention_bias=True")
    rope = c.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _unsupported(
            f"partial rotary embeddings (partial_rotary_factor={partial}; moekit rotates every dimension)"
        )
    if family == "glm4_moe" and (c.get("n_shared_experts") or 0) < 1:
        raise _unsupported("glm4_moe without shared experts (n_shared_experts=0)")


def _hf_layer_placement(c: dict, family: str) -> tuple[int, int]:
    """(first_dense_layers, moe_every) of the checkpoint's MoE layers."""
    if family == "glm4_moe":
        return int(c.get("first_k_dense_replace", 0)), 1
    if family not in ("qwen2_moe", "qwen3_moe"):
        return 0, 1
    if c.get("mlp_only_layers"):
        raise _unsupported(f"mlp_only_layers={c['mlp_only_layers']}")
    step = _get(c, "decoder_sparse_step", 1)
    return step - 1, step  # HF: MoE where (i + 1) % step == 0


# moekit's auxiliary losses that no supported family's transformers model adds
_NO_OTHER_LOSSES: dict[str, Any] = dict(
    z_loss_weight=0.0,
    sq_load_loss_weight=0.0,
    importance_loss_weight=0.0,
    load_loss_weight=0.0,
    entropy_loss_weight=0.0,
)


def _moe_config_from_hf(c: dict, family: str, training_losses: bool) -> MoEConfig:
    """The MoE layer config of a supported family's checkpoint (see :func:`config_from_hf` for the losses)."""
    if family == "glm4_moe":
        return _glm4_moe_config(c, training_losses)
    E: Any = c.get("num_local_experts") or c.get("num_experts")  # Qwen3-MoE stores num_local_experts (attribute_map)
    F_ = c["intermediate_size"] if family in ("mixtral", "olmoe") else c["moe_intermediate_size"]
    K = c["num_experts_per_tok"]
    return MoEConfig(
        dim=c["hidden_size"],
        hidden_dim=F_,
        num_experts=E,
        top_k=K,
        expert=_expert_kind(c),
        router="topk",
        renormalize=True if family == "mixtral" else bool(c.get("norm_topk_prob", False)),
        router_dtype="same",
        # Mixtral's jitter (training only): the jittered hidden states feed router and experts
        router_jitter=float(_get(c, "router_jitter_noise", 0.0)) if family == "mixtral" else 0.0,
        router_jitter_experts=family == "mixtral",
        balance_loss_weight=_router_aux_loss_coef(c, family) * K if training_losses else 0.0,
        **_NO_OTHER_LOSSES,
        num_shared_experts=1 if family == "qwen2_moe" else 0,
        shared_hidden_dim=c.get("shared_expert_intermediate_size") if family == "qwen2_moe" else None,
        shared_expert_gate=family == "qwen2_moe",
    )


def _glm4_moe_config(c: dict, training_losses: bool) -> MoEConfig:
    """GLM-4.5's MoE (transformers' glm4_moe): DeepSeek-V3's sigmoid routing with a selection-only
    correction bias (``e_score_correction_bias``), optional expert groups, and shared experts, one
    SwiGLU MLP of ``n_shared_experts x moe_intermediate_size``, added without a gate."""
    F_, groups = c["moe_intermediate_size"], int(c.get("n_group") or 1)
    return MoEConfig(
        dim=c["hidden_size"],
        hidden_dim=F_,
        num_experts=int(c.get("n_routed_experts") or c["num_local_experts"]),
        top_k=c["num_experts_per_tok"],
        expert=_expert_kind(c),
        router="sigmoid",
        renormalize=bool(c.get("norm_topk_prob", True)),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        num_groups=groups if groups > 1 else None,
        topk_groups=int(c.get("topk_group") or 1) if groups > 1 else None,
        bias_update_rate=1e-3 if training_losses else 0.0,  # the bias moves only when training on
        router_dtype="float32",  # transformers routes in float32 (its router weight is kept in float32)
        balance_loss_weight=0.0,
        **_NO_OTHER_LOSSES,
        num_shared_experts=1,
        shared_hidden_dim=F_ * int(c["n_shared_experts"]),
    )


def config_to_hf(cfg: LMConfig, family: str):
    """A transformers config object of ``family`` equivalent to ``cfg`` (raises where none is)."""
    import transformers

    if family not in SUPPORTED:
        raise _unsupported(f"unsupported family {family!r}")
    m = cfg.moe
    if m is None:
        raise _unsupported("a dense moekit model (cfg.moe is None) has no MoE family equivalent")
    problems = _moe_export_problems(m, family) + _layout_export_problems(cfg, family)
    if problems:
        raise _unsupported(f"cannot export to {family!r}: " + "; ".join(problems))
    out = getattr(transformers, _CONFIG[family])(**{**_hf_common_fields(cfg, m), **_hf_family_fields(cfg, m, family)})
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # a family's defaults name its own vocabulary's ids
        token = getattr(out, name, None)
        if isinstance(token, int) and not 0 <= token < cfg.vocab_size:
            setattr(out, name, None)
    return out


def _moe_export_problems(m: MoEConfig, family: str) -> list[str]:
    """What in the MoE layer config ``family`` cannot express (empty when it can)."""
    problems = []
    if m.expert not in _EXPORT_ACTIVATION:
        problems.append(f"expert={m.expert!r} (needs a gated kind: {', '.join(map(repr, _EXPORT_ACTIVATION))})")
    if m.router_bias:
        problems.append("router_bias=True")
    if m.capacity_factor is not None or m.eval_capacity_factor is not None:
        problems.append("a capacity factor (HF models are dropless)")
    if family == "glm4_moe":
        if m.router != "sigmoid":
            problems.append(f"router={m.router!r} (glm4_moe routes with 'sigmoid' and a correction bias)")
        shared = m.num_shared_experts * (m.shared_hidden_dim or m.hidden_dim)
        if not m.num_shared_experts or m.shared_expert_gate or shared % m.hidden_dim:
            problems.append(
                f"shared experts ({m.num_shared_experts} of width {m.shared_hidden_dim or m.hidden_dim}, gate="
                f"{m.shared_expert_gate}) (glm4_moe needs ungated shared experts of a multiple of hidden_dim in all)"
            )
        return problems
    if m.router != "topk" or m.num_groups is not None:
        problems.append(f"router={m.router!r} (needs plain 'topk')")
    if m.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={m.routed_scaling_factor}")
    if family == "mixtral" and not m.renormalize:
        problems.append("renormalize=False (Mixtral always renormalises the top-k weights)")
    want_shared = family == "qwen2_moe"
    if want_shared != bool(m.num_shared_experts) or (want_shared and not m.shared_expert_gate):
        problems.append(
            f"shared experts ({m.num_shared_experts}, gate={m.shared_expert_gate}) "
            + ("(Qwen2-MoE needs one gated shared expert)" if want_shared else f"({family} has none)")
        )
    return problems


def _layout_export_problems(cfg: LMConfig, family: str) -> list[str]:
    """What in the attention and layer placement ``family`` cannot express (empty when it can)."""
    problems = []
    m = cfg.moe
    dense = any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    if dense and m is not None and cfg.ffn_kind != m.expert:
        problems.append(f"ffn_kind={cfg.ffn_kind!r} != expert={m.expert!r} (one hidden_act for dense and MoE layers)")
    want_norm = {"qwen3_moe": "head", "olmoe": "full"}.get(family)
    if family == "glm4_moe":
        if cfg.qk_norm not in (None, "head"):
            problems.append(f"qk_norm={cfg.qk_norm!r} (glm4_moe has none or 'head')")
        if cfg.moe_every != 1:
            problems.append(f"moe_every={cfg.moe_every} (glm4_moe has MoE in every layer after its dense first ones)")
    elif cfg.qk_norm != want_norm:
        problems.append(f"qk_norm={cfg.qk_norm!r} ({family} needs {want_norm!r})")
    if cfg.attn_bias and family not in ("qwen2_moe", "glm4_moe"):
        problems.append(f"attn_bias=True ({family} has no q/k/v bias)")
    if family in ("mixtral", "olmoe") and (cfg.moe_every != 1 or cfg.first_dense_layers != 0):
        problems.append(
            f"dense layers (moe_every={cfg.moe_every}, first_dense_layers={cfg.first_dense_layers}): {family} has "
            "MoE in every layer"
        )
    if (
        family in ("qwen2_moe", "qwen3_moe")
        and (cfg.moe_every > 1 or cfg.first_dense_layers)
        and cfg.first_dense_layers != cfg.moe_every - 1
    ):
        problems.append(
            f"layer placement moe_every={cfg.moe_every}, first_dense_layers={cfg.first_dense_layers} "
            "(Qwen's decoder_sparse_step needs first_dense_layers == moe_every - 1)"
        )
    return problems


def _hf_common_fields(cfg: LMConfig, m: MoEConfig) -> dict[str, Any]:
    """The transformers config fields every supported family shares."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        hidden_act=_EXPORT_ACTIVATION[m.expert],
        tie_word_embeddings=cfg.tie_embeddings,
        num_experts_per_tok=m.top_k,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )


def _hf_family_fields(cfg: LMConfig, m: MoEConfig, family: str) -> dict[str, Any]:
    """The transformers config fields particular to ``family`` (expert sizes, layer placement, switched-off options)."""
    extra: dict[str, Any]
    if family == "glm4_moe":
        return dict(
            n_routed_experts=m.num_experts,
            moe_intermediate_size=m.hidden_dim,
            intermediate_size=cfg.ffn_hidden_dim,
            n_shared_experts=m.num_shared_experts * (m.shared_hidden_dim or m.hidden_dim) // m.hidden_dim,
            norm_topk_prob=m.renormalize,
            routed_scaling_factor=m.routed_scaling_factor,
            n_group=m.num_groups or 1,
            topk_group=m.topk_groups or 1,
            first_k_dense_replace=cfg.first_dense_layers,
            use_qk_norm=cfg.qk_norm == "head",
            attention_bias=cfg.attn_bias,
            head_dim=cfg.dim // cfg.n_heads,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
            num_nextn_predict_layers=0,
        )
    if family == "mixtral":
        extra = dict(
            num_local_experts=m.num_experts,
            intermediate_size=m.hidden_dim,
            # training only; moekit's Switch form (the router's input alone) has no Mixtral equivalent
            router_jitter_noise=m.router_jitter if m.router_jitter_experts else 0.0,
            router_aux_loss_coef=0.0,
            sliding_window=None,
        )
    elif family == "olmoe":
        extra = dict(
            num_experts=m.num_experts,
            intermediate_size=m.hidden_dim,
            norm_topk_prob=m.renormalize,
            router_aux_loss_coef=0.0,
            clip_qkv=None,
            attention_bias=False,
        )
    else:
        extra = dict(
            num_experts=m.num_experts,
            moe_intermediate_size=m.hidden_dim,
            norm_topk_prob=m.renormalize,
            intermediate_size=cfg.ffn_hidden_dim,
            decoder_sparse_step=cfg.moe_every,
            mlp_only_layers=[],
            router_aux_loss_coef=0.0,
            use_sliding_window=False,
        )
        if family == "qwen2_moe":
            extra.update(
                shared_expert_intermediate_size=m.num_shared_experts * (m.shared_hidden_dim or m.hidden_dim),
                qkv_bias=cfg.attn_bias,
            )
        else:
            extra.update(head_dim=cfg.dim // cfg.n_heads, attention_bias=False)
    return extra


# ---------------------------------------------------------------------------------------- weights
_PER_EXPERT = {  # checkpoint (Hub / save_pretrained) names of expert e's gate, up, down projections
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
    "glm4_moe": ("gate_proj", "up_proj", "down_proj"),
}


def _fuse_experts(sd: dict, cfg: LMConfig, family: str) -> dict:
    """The checkpoint layout (per-expert 2-D tensors, Mixtral's ``block_sparse_moe``) turned into
    the in-memory transformers 5 layout (fused ``experts.gate_up_proj`` / ``experts.down_proj``)."""
    sd = dict(sd)
    g, u, d = _PER_EXPERT[family]
    assert cfg.moe is not None  # a supported family's config (config_from_hf) always has one
    E = cfg.moe.num_experts
    for i in range(cfg.n_layers):
        if not cfg.is_moe_layer(i):
            continue
        src = f"model.layers.{i}.block_sparse_moe."  # Mixtral checkpoints
        if not any(k.startswith(src) for k in sd):
            src = f"model.layers.{i}.mlp."
        pre, dst = src + "experts.", f"model.layers.{i}.mlp.experts."
        if pre + "gate_up_proj" in sd or not any(k.startswith(pre) for k in sd):
            continue
        names = [pre + f"{e}.{n}.weight" for e in range(E) for n in (g, u, d)]
        missing = [n for n in names if n not in sd]
        if missing:
            raise WeightMismatchError(f"missing tensor(s) in the transformers checkpoint: {', '.join(missing[:8])}")
        D, Fh = cfg.dim, cfg.moe.hidden_dim
        for e in range(E):
            for n, want in ((g, (Fh, D)), (u, (Fh, D)), (d, (D, Fh))):
                key = pre + f"{e}.{n}.weight"
                if tuple(sd[key].shape) != want:
                    raise WeightMismatchError(f"tensor {key!r}: expected shape {want}, got {tuple(sd[key].shape)}")
        sd[dst + "gate_up_proj"] = torch.stack(
            [torch.cat([sd[pre + f"{e}.{g}.weight"], sd[pre + f"{e}.{u}.weight"]], 0) for e in range(E)]
        )
        sd[dst + "down_proj"] = torch.stack([sd[pre + f"{e}.{d}.weight"] for e in range(E)])
        for n in names:
            del sd[n]
        if src != f"model.layers.{i}.mlp." and src + "gate.weight" in sd:
            sd[f"model.layers.{i}.mlp.gate.weight"] = sd.pop(src + "gate.weight")
    return sd


def _split_experts(sd: dict, family: str) -> dict:
    """Inverse of :func:`_fuse_experts`: the per-expert checkpoint layout transformers' loader expects."""
    g, u, d = _PER_EXPERT[family]
    out = {}
    for k, v in sd.items():
        if k.endswith(".experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            for e, w in enumerate(v):
                gw, uw = w.chunk(2, dim=0)
                out[pre + f"{e}.{g}.weight"], out[pre + f"{e}.{u}.weight"] = gw, uw
        elif k.endswith(".experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e, w in enumerate(v):
                out[pre + f"{e}.{d}.weight"] = w
        else:
            out[k] = v
    if family == "mixtral":
        out = {
            k.replace(".mlp.", ".block_sparse_moe.") if ".mlp.gate." in k or ".mlp.experts." in k else k: v
            for k, v in out.items()
        }
    return out


def _hf_to_moekit(sd: dict, cfg: LMConfig) -> dict:
    """moekit state dict from a transformers one (keys without a "model." prefix error out by name)."""
    return dict(hf_to_moekit_items(sd, cfg))


def hf_to_moekit_items(sd: Mapping[str, Tensor], cfg: LMConfig) -> Iterator[tuple[str, Tensor]]:
    """(moekit key, tensor) pairs from a transformers state dict, block by block: each tensor is
    taken from ``sd`` when its block is converted, so a lazily read ``sd`` (a folder read by byte
    range) holds one block at a time. Missing and unexpected tensors raise, naming them."""
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in sd:
            hint = " (block_sparse_moe.gate.weight in Mixtral checkpoints)" if key.endswith(".mlp.gate.weight") else ""
            raise WeightMismatchError(f"missing tensor {key!r}{hint} in the transformers checkpoint")
        used.add(key)
        return sd[key]

    yield "embed.weight", take("model.embed_tokens.weight")
    yield "norm.weight", take("model.norm.weight")
    if not cfg.tie_embeddings:
        yield "head.weight", take("lm_head.weight")
    elif "lm_head.weight" in sd:
        used.add("lm_head.weight")
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        yield q + "attn_norm.weight", take(p + "input_layernorm.weight")
        yield q + "ffn_norm.weight", take(p + "post_attention_layernorm.weight")
        yield from _hf_attention_to_moekit(take, cfg, p + "self_attn.", q + "attn.").items()
        if cfg.is_moe_layer(i):
            yield from _hf_moe_to_moekit(take, cfg, p + "mlp.", q + "ffn.").items()
        else:
            yield from _hf_mlp_to_moekit(take, p + "mlp.", q + "ffn.").items()
    extra = sorted(k for k in set(sd) - used if not k.endswith(("rotary_emb.inv_freq",)))
    if extra:
        raise WeightMismatchError(
            f"unexpected tensor(s) in the transformers checkpoint: {', '.join(extra[:8])}"
            + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")
        )


def _hf_attention_to_moekit(take: Callable[[str], Tensor], cfg: LMConfig, a: str, q: str) -> dict:
    """One attention block's tensors (transformers prefix ``a``, moekit prefix ``q``)."""
    out = {q + f"w{n}.weight": take(a + f"{n}_proj.weight") for n in "qkv"}
    if cfg.attn_bias:
        out.update({q + f"w{n}.bias": take(a + f"{n}_proj.bias") for n in "qkv"})
    out[q + "wo.weight"] = take(a + "o_proj.weight")
    if cfg.qk_norm:
        out[q + "q_norm.weight"] = take(a + "q_norm.weight")
        out[q + "k_norm.weight"] = take(a + "k_norm.weight")
    return out


def _hf_moe_to_moekit(take: Callable[[str], Tensor], cfg: LMConfig, m: str, q: str) -> dict:
    """One MoE block's tensors (transformers prefix ``m``, moekit prefix ``q``): router, experts, shared expert."""
    assert cfg.moe is not None  # only called for MoE layers
    out = {
        q + "router.linear.weight": take(m + "gate.weight"),
        q + "experts.w_up": take(m + "experts.gate_up_proj").transpose(1, 2),
        q + "experts.w_down": take(m + "experts.down_proj").transpose(1, 2),
    }
    glm = cfg.moe.router == "sigmoid"  # GLM-4.5's names: the correction bias, plural shared experts
    if glm:
        out[q + "router.bias_E"] = take(m + "gate.e_score_correction_bias")
    if cfg.moe.num_shared_experts:
        s = m + ("shared_experts." if glm else "shared_expert.")
        out[q + "shared.w_gate"] = take(s + "gate_proj.weight").t()
        out[q + "shared.w_up"] = take(s + "up_proj.weight").t()
        out[q + "shared.w_down"] = take(s + "down_proj.weight").t()
        if cfg.moe.shared_expert_gate:
            out[q + "shared_gate.weight"] = take(m + "shared_expert_gate.weight")
    return out


def _hf_mlp_to_moekit(take: Callable[[str], Tensor], m: str, q: str) -> dict:
    """One dense SwiGLU block's tensors (transformers prefix ``m``, moekit prefix ``q``)."""
    return {
        q + "w_gate": take(m + "gate_proj.weight").t(),
        q + "w_up": take(m + "up_proj.weight").t(),
        q + "w_down": take(m + "down_proj.weight").t(),
    }


def _moekit_to_hf(model: MoETransformer, family: str = "") -> dict:
    cfg = model.cfg
    glm = family == "glm4_moe"
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = sd[q + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "ffn_norm.weight"]
        a = p + "self_attn."
        for n in "qkv":
            out[a + f"{n}_proj.weight"] = sd[q + f"attn.w{n}.weight"]
            if cfg.attn_bias:
                out[a + f"{n}_proj.bias"] = sd[q + f"attn.w{n}.bias"]
        out[a + "o_proj.weight"] = sd[q + "attn.wo.weight"]
        if cfg.qk_norm:
            out[a + "q_norm.weight"] = sd[q + "attn.q_norm.weight"]
            out[a + "k_norm.weight"] = sd[q + "attn.k_norm.weight"]
        m = p + "mlp."
        if cfg.is_moe_layer(i):
            assert cfg.moe is not None  # is_moe_layer
            out[m + "gate.weight"] = sd[q + "ffn.router.linear.weight"]
            out[m + "experts.gate_up_proj"] = sd[q + "ffn.experts.w_up"].transpose(1, 2)
            out[m + "experts.down_proj"] = sd[q + "ffn.experts.w_down"].transpose(1, 2)
            if glm:
                out[m + "gate.e_score_correction_bias"] = sd[q + "ffn.router.bias_E"]
            if cfg.moe.num_shared_experts:
                s = m + ("shared_experts." if glm else "shared_expert.")
                out[s + "gate_proj.weight"] = sd[q + "ffn.shared.w_gate"].t()
                out[s + "up_proj.weight"] = sd[q + "ffn.shared.w_up"].t()
                out[s + "down_proj.weight"] = sd[q + "ffn.shared.w_down"].t()
                if cfg.moe.shared_expert_gate:
                    out[m + "shared_expert_gate.weight"] = sd[q + "ffn.shared_gate.weight"]
        else:
            out[m + "gate_proj.weight"] = sd[q + "ffn.w_gate"].t()
            out[m + "up_proj.weight"] = sd[q + "ffn.w_up"].t()
            out[m + "down_proj.weight"] = sd[q + "ffn.w_down"].t()
    return {k: v.contiguous() for k, v in out.items()}


def _load_state(model: MoETransformer, sd: dict) -> None:
    expected = model.state_dict()
    for k, v in sd.items():
        if k not in expected:
            raise WeightMismatchError(f"tensor {k!r} has no place in the moekit model")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightMismatchError(f"tensor {k!r}: expected shape {tuple(expected[k].shape)}, got {tuple(v.shape)}")
    missing = sorted(k for k in expected if k not in sd and not k.endswith(("expert_usage", "steps_unused")))
    if missing:
        raise WeightMismatchError(f"missing tensor(s) for the moekit model: {', '.join(missing)}")
    model.load_state_dict(sd, strict=False)


def load_hf(
    source,
    *,
    dtype: Optional[torch.dtype] = None,
    training_losses: bool = False,
    expert_memory: Optional[int] = None,
    expert_policy: str = "lfru",
    prefetch: Union[bool, int] = False,
    expert_dtype: Optional[str] = None,
) -> MoETransformer:
    """A moekit :class:`MoETransformer` from a transformers checkpoint folder (``save_pretrained``
    output: config.json + safetensors) or an in-memory transformers model. Returned in eval mode, so
    its logits equal transformers'. ``hidden_act`` becomes the expert kind (:data:`HF_ACTIVATIONS`);
    Mixtral's ``router_jitter_noise`` becomes ``router_jitter`` with ``router_jitter_experts``, so a
    fine-tune jitters the input of router and experts in training as transformers does.
    Auxiliary-loss weights are 0, or with ``training_losses`` the checkpoint's own (its ``aux_loss``
    term then equals transformers' ``router_aux_loss_coef * aux_loss`` with
    ``output_router_logits=True``; see :func:`config_from_hf`). ``expert_memory`` (bytes; a folder
    only): the experts stay in the folder's shards and come into an expert store of that size as
    routing asks (:mod:`moekit.store`; ``expert_policy``, ``prefetch`` as there; ``expert_dtype``
    fp32, fp16 or bf16: the slots keep the checkpoint's (out, in) layout in that dtype)."""
    if expert_memory is not None:
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError("expert_memory keeps the experts in a checkpoint folder: pass the folder's path")
        from .stored import load_hf_with_store

        return load_hf_with_store(
            os.fspath(source),
            expert_memory,
            dtype=dtype,
            training_losses=training_losses,
            policy=expert_policy,
            prefetch=prefetch,
            fmt=expert_dtype,
        )
    if expert_dtype is not None:
        raise ValueError("expert_dtype chooses the expert store's slots: give expert_memory too")
    if isinstance(source, (str, os.PathLike)):
        from .stored import load_hf_streaming

        return load_hf_streaming(os.fspath(source), dtype=dtype, training_losses=training_losses)
    if isinstance(source, nn.Module) and hasattr(source, "config"):
        config = cast(Any, source).config.to_dict()  # a transformers model (untyped here)
        _check_family(config)
        sd = {k: v.detach() for k, v in source.state_dict().items()}
    else:
        raise TypeError(f"load_hf expects a folder path or a transformers model; got {type(source).__name__}")
    family, cfg = config_from_hf(config, training_losses=training_losses)
    model = MoETransformer(cfg)
    new = _hf_to_moekit(_fuse_experts(sd, cfg, family), cfg)
    _load_state(model, new)
    if dtype is None:
        dtype = next(iter(new.values())).dtype
    return model.to(dtype).eval()


def _check_family(config: dict) -> None:
    if config.get("model_type") not in SUPPORTED:
        config_from_hf(config)  # raises the named error


def export_hf(
    model: MoETransformer,
    path: Union[str, os.PathLike],
    family: str,
    tokenizer: Union[str, os.PathLike, None] = None,
) -> str:
    """Write ``config.json`` and ``model.safetensors`` that ``AutoModelForCausalLM.from_pretrained(path)``
    loads as ``family`` ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe": the last holds
    ``moekit train``'s default model, sigmoid routing with its correction bias and a shared
    expert) with the same logits. ``tokenizer``: a ``tokenizer.json`` (a run's) copied beside them,
    so the folder is a checkpoint ``moekit generate --run`` and llama.cpp's converter take whole."""
    from safetensors.torch import save_file

    if not isinstance(model, MoETransformer):
        raise TypeError(f"export_hf expects a moekit MoETransformer; got {type(model).__name__}")
    hf_cfg = config_to_hf(model.cfg, family)
    for moe in model.moe_layers:
        if moe.router.num_disabled:
            raise _unsupported("a model with disabled experts (call enable_experts() first)")
        if not hasattr(moe.experts, "w_up"):
            raise _unsupported("heterogeneous experts (ModuleListExperts)")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"tokenizer: no such file {os.fspath(tokenizer)!r} (a tokenizer.json)")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    hf_cfg.architectures = [_CAUSAL_LM[family]]
    hf_cfg.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf_cfg.save_pretrained(path)
    sd = {k: v.contiguous() for k, v in _split_experts(_moekit_to_hf(model, family), family).items()}
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.json"))
    return path


# ---------------------------------------------------------------------------------------- accelerate
# transformers activations (``hidden_act``) whose gated unit ``act(gate) * up`` is one of moekit's
# own expert kinds, computed by the same function (so the Triton kernels can fuse it too)
_NATIVE_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu"}


class _GatedActivation:
    """``act(gate) * up`` on the [gate | up] columns with transformers' own activation module
    (the experts' ``act_fn``, i.e. ``ACT2FN[hidden_act]``): any activation transformers offers."""

    def __init__(self, act_fn: nn.Module):
        self.act_fn = act_fn

    def __call__(self, h_RH: Tensor) -> Tensor:
        gate, up = h_RH.chunk(2, dim=-1)
        return self.act_fn(gate) * up


class SharedWeightExperts(nn.Module):
    """Stacked gated experts ``(act(x W_gate) * x W_up) W_down`` computed by moekit's backends on
    *views* of transformers' fused tensors: ``w_up = gate_up_proj.transpose(1, 2)`` (E, D, 2F),
    ``w_down = down_proj.transpose(1, 2)`` (E, F, D). The transformers experts module stays
    registered (same state-dict keys, same Parameters); nothing is copied.

    ``hidden_act``: the model's activation name. silu/swish and gelu_pytorch_tanh use moekit's
    SwiGLU/GeGLU (all backends); any other uses the experts' own ``act_fn`` module (the ``loop``
    and ``grouped`` backends; ``auto`` then never picks ``triton``)."""

    hf: Any  # the transformers experts module (set with object.__setattr__; untyped here)
    act: Act
    num_experts: int

    def __init__(self, hf_experts: Any, hidden_act: str = "silu"):
        super().__init__()
        object.__setattr__(self, "hf", hf_experts)  # a reference, not a submodule: no duplicate state-dict keys
        self.hidden_act = hidden_act
        self.kind = _NATIVE_GATED.get(hidden_act)  # moekit's expert kind, or None
        if self.kind is not None:
            self.act = self.kind  # by name: the Triton kernels take moekit activations by name
        elif isinstance(getattr(hf_experts, "act_fn", None), nn.Module):
            self.act = _GatedActivation(hf_experts.act_fn)
        else:
            raise _unsupported(
                f"hidden_act={hidden_act!r} with an experts module without act_fn ({type(hf_experts).__name__})"
            )
        self.num_experts = hf_experts.gate_up_proj.shape[0]

    @property
    def w_up(self) -> Tensor:
        return self.hf.gate_up_proj.transpose(1, 2)

    @property
    def w_down(self) -> Tensor:
        return self.hf.down_proj.transpose(1, 2)

    def forward(self, x_RD: Tensor, counts_E: Tensor, backend: str = "grouped") -> Tensor:
        if backend == "triton" and self.kind is None:  # the Triton kernels have no such activation
            backend = "grouped"
        return stacked_ffn(x_RD, counts_E, self.w_up, self.w_down, self.act, backend)


def _sum_as_transformers(y_TKD: Tensor, weights_TK: Tensor, experts_TK: Tensor, dtype: torch.dtype) -> Tensor:
    """``out_TD = sum_k w[t, k] * y_TKD[t, k]`` in transformers' eager order of operations (moekit's
    :func:`~moekit.layer.dispatch.combine` sums in one op), so that bf16 outputs agree bit for bit:
    each slot's product is taken in the routing weights' own dtype promotion (Mixtral's router
    returns fp32 weights, the Qwen/OLMoE routers cast them to the hidden dtype), rounded to the
    hidden dtype, and a token's slots are added one at a time in ascending expert id, as
    transformers' per-expert ``index_add_`` loop does."""
    K = y_TKD.shape[1]
    c_TKD = (y_TKD * weights_TK.unsqueeze(-1)).to(dtype)
    if K > 1:
        by_expert_TK = experts_TK.argsort(dim=-1, stable=True)
        c_TKD = c_TKD.gather(1, by_expert_TK.unsqueeze(-1).expand_as(c_TKD))
    out_TD = c_TKD[:, 0]
    for k in range(1, K):
        out_TD = out_TD + c_TKD[:, k]
    return out_TD


class AcceleratedMoEBlock(nn.Module):
    """Drop-in for a transformers sparse MoE block: routing by transformers' own router module
    (so output_router_logits and its load-balancing loss keep working), dispatch/combine and the
    expert FFNs by moekit. ``gate``, ``experts`` and (Qwen2-MoE) ``shared_expert``/``shared_expert_gate`` are the
    original modules, so the state-dict keys and Parameters are unchanged.

    transformers' experts-implementation switch stays live: when the model's
    ``config._experts_implementation`` differs from what it was at :func:`accelerate` time (a later
    ``model.set_experts_implementation("eager")``, say), the block warns and from then on runs the
    original transformers block, which honours whatever implementation is set; ``accelerate(model)``
    again returns to moekit's path."""

    original: nn.Module  # the transformers block (set with object.__setattr__)
    gate: nn.Module
    experts: nn.Module
    shared_expert: Optional[nn.Module]
    shared_expert_gate: Optional[nn.Module]
    num_experts: int

    def __init__(self, hf_block: Any, backend: str = "auto", hidden_act: str = "silu"):
        super().__init__()
        object.__setattr__(self, "original", hf_block)  # a reference, not a submodule (its modules are ours)
        self.gate = hf_block.gate
        self.experts = hf_block.experts
        self.shared_expert = getattr(hf_block, "shared_expert", None)
        self.shared_expert_gate = getattr(hf_block, "shared_expert_gate", None)
        self.moe_experts = SharedWeightExperts(hf_block.experts, hidden_act)
        self.backend = backend
        self.num_experts = self.moe_experts.num_experts
        self.jitter_noise = float(getattr(hf_block, "jitter_noise", 0.0) or 0.0)  # Mixtral, training only
        self.accelerated_implementation = self.experts_implementation()  # moekit runs while this is the setting
        self._handed_back_to: Optional[str] = None

    def experts_implementation(self) -> Optional[str]:
        """transformers' current experts implementation for this block (None if the model has none)."""
        return getattr(getattr(self.experts, "config", None), "_experts_implementation", None)

    def forward(self, hidden_states: Tensor) -> Tensor:
        impl = self.experts_implementation()
        if (
            impl != self.accelerated_implementation or self._handed_back_to is not None
        ):  # handed back until accelerate()
            if impl != self._handed_back_to:
                warnings.warn(
                    f"moekit.interop.accelerate: the experts implementation was set to {impl!r} after "
                    f"accelerate() (was {self.accelerated_implementation!r}); the MoE blocks run transformers' "
                    f"{impl!r} path again. Call accelerate(model) to return to moekit's.",
                    UserWarning,
                    stacklevel=2,
                )
                self._handed_back_to = impl
            self.original.train(self.training)
            return self.original(hidden_states)
        shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:  # as Mixtral: the jittered input feeds router and experts
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        x_TD = hidden_states.reshape(-1, shape[-1])
        # transformers' own router module (softmax, top-k, norm_topk_prob): calling it keeps the hooks
        # that collect router logits for output_router_logits / the load-balancing loss
        _, weights_TK, experts_TK = self.gate(x_TD)
        plan = plan_dispatch(experts_TK, self.num_experts)
        y_RD = self.moe_experts(
            dispatch(x_TD, plan), plan.counts_E, resolve_backend(self.backend, x_TD.device, compute_dtype(x_TD))
        )
        out_TD = _sum_as_transformers(undispatch(y_RD, plan), weights_TK, experts_TK, x_TD.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared
            out_TD = out_TD + shared
        return out_TD.reshape(shape)


def accelerate(hf_model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, every sparse MoE block of a transformers Mixtral / Qwen2-MoE / Qwen3-MoE /
    OLMoE model with an :class:`AcceleratedMoEBlock` sharing its weights. Returns the model. On an
    accelerated model it switches the blocks back to moekit's path (after a
    ``set_experts_implementation``) with ``backend``."""
    config = getattr(hf_model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED:
        raise _unsupported(f"cannot accelerate model_type={family!r} ({type(hf_model).__name__})")
    hidden_act = getattr(config, "hidden_act", "silu")
    if backend == "triton" and hidden_act not in _NATIVE_GATED:
        raise ValueError(
            f"backend='triton' fuses the activations {', '.join(map(repr, _NATIVE_GATED))}; this model has "
            f"hidden_act={hidden_act!r}: use backend='grouped' (or 'auto')"
        )
    replaced = 0
    for module in list(hf_model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, AcceleratedMoEBlock):  # again: back to moekit's path, with this backend
                child.accelerated_implementation, child._handed_back_to = child.experts_implementation(), None
                child.backend = backend
                continue
            experts = getattr(child, "experts", None)
            if hasattr(child, "gate") and experts is not None and hasattr(experts, "gate_up_proj"):
                setattr(module, name, AcceleratedMoEBlock(child, backend, hidden_act))
                replaced += 1
    if replaced == 0 and not any(isinstance(m, AcceleratedMoEBlock) for m in hf_model.modules()):
        raise WeightMismatchError(
            f"no sparse MoE block (with gate and experts.gate_up_proj) found in {type(hf_model).__name__}"
        )
    return hf_model
