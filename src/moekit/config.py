"""Configuration dataclasses. One comment per field; validation lives in ``__post_init__`` so a
bad value fails where it is written, naming the field and what was expected: at construction, and
again when a field of a built config is assigned (``cfg.top_k = 1``), with the same messages."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import re
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

EXPERT_KINDS = ("swiglu", "geglu", "gelu", "relu")
# Routers and expert backends register their names here from the module that implements them
# (moekit.layer.router.register_router, moekit.kernels.register_backend), so adding one touches
# that module only; the configs validate against these lists.
ROUTER_KINDS: list[str] = []
BACKENDS: list[str] = ["auto"]  # "auto" picks a concrete backend (moekit.kernels.resolve_backend)
OVERFLOW_POLICIES = ("drop", "reroute")
CAPACITY_PRIORITIES = ("order", "score")


# The argument checks of the whole package (configs, layers, per-call arguments): each error names
# the argument and what was expected.
def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_positive(name: str, value: Any, *, allow_none: bool = False, integer: bool = False) -> None:
    """ValueError unless ``value`` is a positive integer (``integer=True``) or a finite positive
    number (bools are not numbers here), or None when ``allow_none``."""
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or not math.isfinite(value):
        what = "a positive integer" if integer else "a finite positive number"
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}; got {value!r}")


def check_nonneg(name: str, value: Any, *, finite: bool = False) -> None:
    """ValueError unless ``value`` is a number >= 0 (not NaN; not infinite either when ``finite``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < 0
        or math.isnan(value)
        or (finite and not math.isfinite(value))
    ):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number >= 0; got {value!r}")


def check_router_top_k(router: str, top_k: int) -> None:
    """The one rule tying k to a router, for the config and for a per-call ``top_k``: "switch"
    routes each token to one expert (Switch, Fedus et al. 2021)."""
    if router == "switch" and top_k != 1:
        raise ValueError(f"router 'switch' routes each token to one expert: top_k must be 1; got {top_k}")


BPE_MIN_VOCAB = 257  # a byte-level BPE holds its 256 base tokens (one per byte) and the end-of-document token

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NONE = ("none", "null")


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(X, True) for Optional[X], (hint, False) otherwise."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _type_name(hint: Any) -> str:
    base, optional = _unwrap_optional(hint)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    name = names.get(base) or f"a config section ({getattr(base, '__name__', base)})"
    return name + (" or none" if optional else "")


def _matches(value: Any, hint: Any) -> bool:
    base, optional = _unwrap_optional(hint)
    if value is None:
        return optional
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    return isinstance(value, base)


def check_device(name: str, value: str) -> None:
    """A device string torch understands ("cpu", "cuda", "cuda:1", "mps", ...). Whether the
    device exists here is checked where it is used."""
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} must be a torch device such as 'cpu', 'cuda' or 'cuda:1'; got {value!r}") from err


def check_device_available(name: str, value: str) -> None:
    """``value`` is a device string torch understands and that device exists on this machine."""
    import torch

    check_device(name, value)
    kind = torch.device(value).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={value!r} but CUDA is not available here; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={value!r} but MPS is not available here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps") and not hasattr(torch, kind):
        raise ValueError(f"{name}={value!r}: this torch has no {kind!r} backend; use --device cpu")


_CHECKED = "_moekit_checked"  # the slot marking a config whose __post_init__ has run: assignments are checked


class _DictMixin:
    """to_dict / from_dict for the config dataclasses (unknown keys are an error, not ignored),
    the declared type of every field checked on construction, every later assignment of a field
    checked the same way, and the typed parsing of the command line's ``--set field=text``."""

    # a slot, not an entry of __dict__: vars(cfg) / cfg.__dict__ hold the fields only (MoEConfig(**vars(cfg)));
    # copy, deepcopy and pickle carry it
    __slots__ = (_CHECKED,)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a subclass's __post_init__ (its checks) marks the object checked when the outermost one
        # returns; from then on __setattr__ runs the checks again. Assignments inside __post_init__
        # (a dict section converted, a default filled in) are the construction's own.
        super().__init_subclass__(**kwargs)
        checks = cls.__dict__.get("__post_init__")
        if checks is None:
            return

        @functools.wraps(checks)
        def __post_init__(self: _DictMixin) -> None:
            checks(self)
            if type(self).__post_init__ is __post_init__:
                object.__setattr__(self, _CHECKED, True)

        setattr(cls, "__post_init__", __post_init__)  # noqa: B010 (mypy: a method assigned on the class)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assign a field of a built config and check the config again, as the constructor does
        (the same message); a refused value leaves the config as it was."""
        if not getattr(self, _CHECKED, False) or name not in self.__dataclass_fields__:
            object.__setattr__(self, name, value)
            return
        saved = dict(self.__dict__)
        object.__setattr__(self, name, value)
        object.__setattr__(self, _CHECKED, False)  # the checks may set fields as at construction
        try:
            self.__post_init__()  # marks the config checked again when it passes
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            object.__setattr__(self, _CHECKED, True)
            raise

    @classmethod
    def field_types(cls: type) -> dict[str, Any]:
        """Field name -> its resolved type hint (``Optional[float]``, ``MoEConfig``, ...)."""
        return _resolved_hints(cls)

    @classmethod
    def section_type(cls, name: str) -> Optional[type[_DictMixin]]:
        """The config class of field ``name`` when it is a nested config section (``LMConfig.moe``), else None."""
        hint = cls.field_types().get(name)
        base = _unwrap_optional(hint)[0] if hint is not None else None
        return base if isinstance(base, type) and issubclass(base, _DictMixin) else None

    @classmethod
    def field_comments(cls: type) -> dict[str, str]:
        """Field name -> the comment written after it in this module (what the field means)."""
        return _field_comments(cls)

    def _check_types(self) -> None:
        for name, hint in self.field_types().items():
            value = getattr(self, name)
            if not _matches(value, hint):
                raise ValueError(f"{name} must be {_type_name(hint)}; got {value!r} ({type(value).__name__})")

    @classmethod
    def parse_field(cls, name: str, text: str, label: Optional[str] = None) -> Any:
        """The value of field ``name`` written as ``text`` on the command line, converted to the
        field's declared type (``"False"`` -> False, ``"none"`` -> None, ``"0.5"`` -> 0.5);
        ValueError naming the field (as ``label``, default ``name``) and the text when it is not one."""
        hints, label = cls.field_types(), label or name
        if name not in hints:
            raise ValueError(f"unknown {cls.__name__} field {label!r} (`moekit train --print-config` lists them)")
        base, optional = _unwrap_optional(hints[name])
        low = text.strip().lower()
        if optional and low in _NONE:
            return None
        try:
            if base is bool:
                if low in _TRUE or low in _FALSE:
                    return low in _TRUE
                raise ValueError
            if base is int:
                return int(text)
            if base is float:
                return float(text)
            if base is str:
                return json.loads(text) if len(text) >= 2 and text[0] == text[-1] == '"' else text
            if cls.section_type(name) is not None:
                value = json.loads(text)
                if isinstance(value, dict):
                    return value
                raise ValueError
        except (ValueError, json.JSONDecodeError):
            pass
        extra = (
            f"; set its fields one by one ({label}.FIELD=VALUE) or give a JSON object"
            if cls.section_type(name) is not None
            else ""
        )
        raise ValueError(f"{label} must be {_type_name(hints[name])}; got {text!r}{extra}")

    if typing.TYPE_CHECKING:  # every subclass is a dataclass (asdict / fields below) with its checks
        __dataclass_fields__: typing.ClassVar[dict[str, dataclasses.Field[Any]]]

        def __post_init__(self) -> None: ...

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**d)


@functools.cache
def _resolved_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


@functools.cache
def _field_comments(cls: type) -> dict[str, str]:
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+(?:=.*?)?\s+#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


@dataclass
class MoEConfig(_DictMixin):
    """Everything one MoE layer needs. Defaults give a dropless top-2 SwiGLU layer (Mixtral-like)."""

    dim: int  # model width D: the layer maps (..., D) -> (..., D)
    hidden_dim: int  # width F of each routed expert's hidden layer
    num_experts: int = 8  # number of routed experts E
    top_k: int = 2  # experts per token K (for expert_choice: average experts per token)
    expert: str = "swiglu"  # expert FFN: "swiglu" (default), "geglu", "gelu", "relu"
    router: str = "topk"  # "topk", "noisy_topk", "switch", "expert_choice", "hash", "random", "sigmoid"
    renormalize: bool = True  # topk/sigmoid weights renormalised over the chosen K (Mixtral, DeepSeek-V3); False = raw softmax probs / sigmoid scores (GShard/Switch). At top_k=1, True makes every weight 1: the router gets no gradient from the output (MoE warns)
    capacity_factor: Optional[float] = None  # None = dropless; else capacity C = ceil(cf * T * K / E) slots per expert
    eval_capacity_factor: Optional[float] = None  # capacity factor in eval mode (None: same as capacity_factor)
    min_capacity: int = 1  # lower bound on C when a capacity factor is set
    overflow: str = "drop"  # tokens over capacity: "drop" (output 0, the residual carries them) or "reroute" to next-best expert with room
    capacity_priority: str = "order"  # who keeps a slot when an expert overflows: "order" (top-1 choices first, then token order) or "score" (highest top-1 router probability first, the softmax probability or sigmoid score before renormalisation: V-MoE batch prioritized routing, Riquelme et al. 2021)
    num_shared_experts: int = 0  # experts every token uses (DeepSeekMoE), computed as one dense FFN
    shared_hidden_dim: Optional[int] = None  # hidden width of each shared expert (None: hidden_dim)
    shared_expert_gate: bool = False  # scale the shared output by sigmoid(x @ w) (Qwen2-MoE)
    backend: str = "auto"  # expert compute: "auto", "loop" (reference), "grouped", "triton"
    # router details
    router_bias: bool = False  # a bias on the router's linear layer
    router_jitter: float = 0.0  # multiplicative input jitter U(1-eps, 1+eps) in training (Switch, Fedus et al. 2021)
    router_jitter_experts: bool = False  # jitter the experts' input too, not only the router's (transformers' Mixtral)
    router_dtype: str = "float32"  # router logits are computed in this dtype (Switch's selective precision)
    noise_eps: float = 1e-2  # noisy_topk: minimum noise std added to softplus(x @ W_noise) (Shazeer et al. 2017)
    second_expert_policy: str = "random"  # router="random": GShard's second expert, "random" in training or "all"
    hash_seed: int = 0  # router="hash": seed of the fixed token-id hash (Roller et al. 2021)
    num_groups: Optional[int] = None  # router="sigmoid": expert groups for group-limited routing (DeepSeek-V3)
    topk_groups: Optional[int] = None  # router="sigmoid": groups kept per token before picking experts
    routed_scaling_factor: float = 1.0  # multiply routed weights (DeepSeek-V3)
    bias_update_rate: float = 1e-3  # router="sigmoid": aux-loss-free balancing bias step (DeepSeek-V3); 0 = off
    # auxiliary losses: the weight of each in res.aux_loss (0 = computed for monitoring, not added)
    balance_loss_weight: float = 1e-2  # E * sum_i f_i P_i (Switch, Fedus et al. 2021; GShard)
    sq_load_loss_weight: float = 0.0  # E * sum_i P_i^2, a differentiable squared-load-fraction penalty
    importance_loss_weight: float = 0.0  # CV^2 of summed gate weights (Shazeer et al. 2017)
    load_loss_weight: float = 0.0  # CV^2 of the smooth load estimator (noisy_topk only, Shazeer et al. 2017)
    z_loss_weight: float = 1e-3  # mean logsumexp(logits)^2 (ST-MoE, Zoph et al. 2022)
    entropy_loss_weight: float = 0.0  # mean routing entropy (< 0 rewards spread, > 0 rewards confidence)
    # dead experts
    usage_decay: float = 0.99  # running average of each expert's share of routed slots (stats["expert_usage"])
    revive_after: Optional[int] = None  # revive an expert idle for this many optimizer steps (None = never)
    revive_noise: float = 1e-2  # relative noise added to the live expert copied into a revived one
    check_finite: bool = False  # raise on NaN/inf inputs (costs one device sync per call)

    def __post_init__(self) -> None:
        # the checks run in this order, so a config with several bad fields names the same one first
        self._check_types()
        self._check_sizes()
        self._check_choices()
        self._check_counts()
        self._check_rates_and_weights()
        self._check_groups()
        self._check_router_rules()

    def _check_sizes(self) -> None:
        check_positive("dim", self.dim, integer=True)
        check_positive("hidden_dim", self.hidden_dim, integer=True)
        check_positive("num_experts", self.num_experts, integer=True)
        check_positive("top_k", self.top_k, integer=True)
        if self.router != "expert_choice" and self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts ({self.num_experts}); got {self.top_k}")

    def _check_choices(self) -> None:
        check_choice("expert", self.expert, EXPERT_KINDS)
        check_choice("router", self.router, ROUTER_KINDS)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("overflow", self.overflow, OVERFLOW_POLICIES)
        check_choice("capacity_priority", self.capacity_priority, CAPACITY_PRIORITIES)
        check_choice("second_expert_policy", self.second_expert_policy, ("random", "all"))
        check_choice("router_dtype", self.router_dtype, ("float32", "float64", "same"))

    def _check_counts(self) -> None:
        """Capacity, shared experts, scaling and revival: positive numbers (or None where optional)."""
        check_positive("capacity_factor", self.capacity_factor, allow_none=True)
        check_positive("eval_capacity_factor", self.eval_capacity_factor, allow_none=True)
        check_positive("min_capacity", self.min_capacity, integer=True)
        check_positive("shared_hidden_dim", self.shared_hidden_dim, allow_none=True, integer=True)
        check_positive("routed_scaling_factor", self.routed_scaling_factor)
        check_positive("revive_after", self.revive_after, allow_none=True, integer=True)
        if (
            isinstance(self.num_shared_experts, bool)
            or not isinstance(self.num_shared_experts, int)
            or self.num_shared_experts < 0
        ):
            raise ValueError(f"num_shared_experts must be an integer >= 0; got {self.num_shared_experts!r}")

    def _check_rates_and_weights(self) -> None:
        """Noise, update rates and auxiliary-loss weights: numbers >= 0; the two bounded ones below 1."""
        for name in (
            "router_jitter",
            "noise_eps",
            "bias_update_rate",
            "revive_noise",
            "balance_loss_weight",
            "sq_load_loss_weight",
            "importance_loss_weight",
            "load_loss_weight",
            "z_loss_weight",
        ):
            check_nonneg(name, getattr(self, name))
        if not 0.0 <= self.usage_decay < 1.0:
            raise ValueError(f"usage_decay must be in [0, 1); got {self.usage_decay!r}")
        if self.router_jitter >= 1.0:
            raise ValueError(f"router_jitter must be < 1; got {self.router_jitter!r}")

    def _check_groups(self) -> None:
        """Group-limited routing (DeepSeek-V3): num_groups and topk_groups set together and consistent."""
        if (self.num_groups is None) != (self.topk_groups is None):
            raise ValueError("num_groups and topk_groups must be set together (group-limited routing)")
        if self.num_groups is None:
            return
        if self.router != "sigmoid" and self.router != "topk":
            raise ValueError(
                f"num_groups (group-limited routing) needs router 'sigmoid' or 'topk'; got {self.router!r}"
            )
        check_positive("num_groups", self.num_groups, integer=True)
        check_positive("topk_groups", self.topk_groups, integer=True)
        if self.num_experts % self.num_groups:
            raise ValueError(f"num_groups must divide num_experts ({self.num_experts}); got {self.num_groups}")
        assert self.topk_groups is not None  # set together with num_groups (checked above)
        if self.topk_groups > self.num_groups:
            raise ValueError(f"topk_groups must be <= num_groups ({self.num_groups}); got {self.topk_groups}")
        if self.topk_groups * (self.num_experts // self.num_groups) < self.top_k:
            raise ValueError("topk_groups * experts-per-group must be >= top_k so that top_k experts can be chosen")

    def _check_router_rules(self) -> None:
        """The rules tying a router to k and to the overflow policy."""
        check_router_top_k(self.router, self.top_k)
        if self.router == "random" and self.top_k < 2:
            raise ValueError("router 'random' (GShard) drops later experts at random: it needs top_k >= 2")
        if self.overflow == "reroute" and self.router in ("expert_choice", "hash"):
            raise ValueError(f"overflow='reroute' needs a token-choice router with scores; got router {self.router!r}")

    def capacity_factor_for(self, training: bool) -> Optional[float]:
        """The configured capacity factor in training or in eval mode: ``eval_capacity_factor`` in
        eval mode when it is set, else ``capacity_factor`` (None = dropless)."""
        if not training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor


def check_config_type(layer: str, config_cls: type, cfg: Any, *, fields_too: bool = False) -> None:
    """TypeError unless ``cfg`` is a ``config_cls``, saying which config ``layer`` takes (and which
    layer takes the config given, when it is another layer's)."""
    if isinstance(cfg, config_cls):
        return
    takes = f"{layer} takes cfg: a {config_cls.__name__}" + (" (or its fields as arguments)" if fields_too else "")
    users = {
        MoEConfig: "MoE",
        SoftMoEConfig: "SoftMoE",
        HierarchicalMoEConfig: "HierarchicalMoE",
        MultiGateMoEConfig: "MultiGateMoE",
        LMConfig: "MoETransformer",
    }
    hint = ""
    if isinstance(cfg, dict):
        hint = f"; build it with {config_cls.__name__}.from_dict(d) or pass the fields as keywords (**d)"
    elif type(cfg) in users:
        hint = f" (the config of {users[type(cfg)]})"
    raise TypeError(f"{takes}; got a {type(cfg).__name__}{hint}")


def config_from_args(config_cls: type, cfg: Any, args: tuple, kwargs: dict, *, layer: str) -> Any:
    """The config of a layer built as ``Layer(cfg)``, ``Layer(cfg=cfg)`` or ``Layer(field=value, ...)``
    (the config's fields as arguments, positional ones in field order); ``layer`` names the layer
    in errors."""
    if cfg is None and args and (isinstance(args[0], (dict, _DictMixin)) or dataclasses.is_dataclass(args[0])):
        cfg, args = args[0], args[1:]  # a config object, perhaps of another layer (checked below)
    if cfg is None:
        return config_cls(*args, **kwargs)
    if args or kwargs:
        raise TypeError(f"give either cfg or the {config_cls.__name__} fields as arguments, not both")
    check_config_type(layer, config_cls, cfg, fields_too=True)
    return cfg


@dataclass
class SoftMoEConfig(_DictMixin):
    """A Soft MoE layer (Puigcerver et al. 2023): every expert gets slots that mix all tokens."""

    dim: int  # model width D
    hidden_dim: int  # width F of each expert's hidden layer
    num_experts: int  # experts E
    slots_per_expert: int = 1  # slots S per expert (the paper uses 1 or a few; M = E*S slots per sequence)
    expert: str = "swiglu"  # expert FFN: "swiglu", "geglu", "gelu", "relu"
    normalize: bool = True  # L2-normalise tokens and slot parameters, with a learned scale (the paper's recipe at large D); False: raw x @ Phi
    backend: str = "auto"  # expert compute: "auto", "loop", "grouped", "triton"

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("dim", "hidden_dim", "num_experts", "slots_per_expert"):
            check_positive(name, getattr(self, name), integer=True)
        check_choice("expert", self.expert, EXPERT_KINDS)
        check_choice("backend", self.backend, BACKENDS)


@dataclass
class HierarchicalMoEConfig(_DictMixin):
    """A two-level MoE layer (Shazeer et al. 2017, appendix B): a primary gate picks groups, each
    chosen group's gate picks its experts."""

    dim: int  # model width D
    hidden_dim: int  # width F of each expert's hidden layer
    num_groups: int  # groups G (the primary gate's choices)
    experts_per_group: int  # experts Eg per group
    top_k_groups: int = 1  # groups per token Kg
    top_k_experts: int = 2  # experts per chosen group Ke
    expert: str = "swiglu"  # expert FFN: "swiglu", "geglu", "gelu", "relu"
    importance_loss_weight: float = 1e-2  # CV^2 importance losses at both levels (Shazeer et al. 2017)
    balance_loss_weight: float = 1e-2  # balance losses at both levels (Switch, Fedus et al. 2021)
    renormalize: bool = True  # weights renormalised over the kept top-k at each level (the paper); False: raw softmax probs (use it when a level keeps 1)
    backend: str = "auto"  # expert compute: "auto", "loop", "grouped", "triton"

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("dim", "hidden_dim", "num_groups", "experts_per_group", "top_k_groups", "top_k_experts"):
            check_positive(name, getattr(self, name), integer=True)
        if self.top_k_groups > self.num_groups:
            raise ValueError(f"top_k_groups must be <= num_groups ({self.num_groups}); got {self.top_k_groups}")
        if self.top_k_experts > self.experts_per_group:
            raise ValueError(
                f"top_k_experts must be <= experts_per_group ({self.experts_per_group}); got {self.top_k_experts}"
            )
        check_choice("expert", self.expert, EXPERT_KINDS)
        check_choice("backend", self.backend, BACKENDS)
        for name in ("importance_loss_weight", "balance_loss_weight"):
            check_nonneg(name, getattr(self, name), finite=True)


@dataclass
class MultiGateMoEConfig(_DictMixin):
    """A multi-gate MoE for multi-task learning (MMoE, Ma et al. 2018): shared experts, a gate and a tower per task."""

    in_dim: int  # input width I
    expert_dim: int  # each expert's output width H (one ReLU layer, as in the paper)
    num_experts: int  # experts E
    num_tasks: int  # tasks T
    tower_hidden: int  # hidden width of each task's tower (one ReLU layer, then a linear output)
    out_dim: int = 1  # outputs per task O (1 for the paper's regressions)
    shared_gate: bool = False  # one gate for all tasks (the paper's OMoE baseline)

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("in_dim", "expert_dim", "num_experts", "num_tasks", "tower_hidden", "out_dim"):
            check_positive(name, getattr(self, name), integer=True)


def causal_lm_problem(moe: MoEConfig, top_k: Optional[int] = None) -> Optional[str]:
    """Why a MoE layer with this config (at ``top_k``; default ``moe.top_k``) would make a causal
    language model's output at a position depend on later positions of its sequence (its loss could
    see the future), with the way out; None when it would not."""
    if moe.router == "expert_choice":
        return (
            "router 'expert_choice' (Zhou et al. 2022) lets each expert pick among all tokens of the batch, so a "
            "token's output depends on later tokens; use a token-choice router ('topk', 'sigmoid', ...)"
        )
    if moe.capacity_factor is None and moe.eval_capacity_factor is None:
        return None
    k = moe.top_k if top_k is None else top_k
    if k > 1:
        why = f"with top_k={k} takes all first choices before any second: a later first choice drops an earlier second"
    elif moe.overflow == "reroute":
        why = "with overflow='reroute' re-routes a dropped token only to experts that later tokens left room in"
    elif moe.capacity_priority == "score" and moe.router != "hash":  # hash has no scores: token order
        why = "with capacity_priority='score' lets a later token with a higher score take an earlier one's place"
    else:
        return None  # top-1 kept in token order: a token competes only with those before it (earlier positions, earlier sequences)
    return (
        f"a capacity limit {why}; use capacity_factor=None and eval_capacity_factor=None (dropless), or top_k=1 "
        "with overflow='drop' and capacity_priority='order'"
    )


@dataclass
class LMConfig(_DictMixin):
    """A MoE (or dense) decoder-only language model."""

    vocab_size: int = 4096  # tokens V (moekit train: the tokenizer's, see train.vocab_size)
    dim: int = 128  # model width D
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads H
    n_kv_heads: Optional[int] = None  # key/value heads for grouped-query attention (None = n_heads)
    max_seq_len: int = 256  # longest context (rotary table size)
    rope_theta: float = 10000.0  # rotary base (Su et al. 2021)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    ffn_hidden_dim: int = 512  # hidden width of the dense FFN layers
    ffn_kind: str = "swiglu"  # activation of the dense FFN layers
    moe: Optional[MoEConfig] = None  # the MoE feed-forward (None = a dense model); its dim follows dim
    moe_every: int = 1  # a MoE FFN in every n-th layer (1 = all)
    first_dense_layers: int = 0  # the first layers keep a dense FFN (DeepSeekMoE)
    tie_embeddings: bool = True  # share the input embedding with the output projection
    init_std: float = 0.02  # std of the normal initialisation (GPT-2)
    qk_norm: Optional[str] = None  # RMSNorm on q and k before rotary: None, "head" (Qwen3-MoE) or "full" (OLMoE)
    attn_bias: bool = False  # a bias on the fused q/k/v projection (Qwen2-MoE)
    balance_pooling: str = "layer"  # balance loss: "layer" (each MoE layer's own, summed) or "model" (one loss on slot counts and router probabilities pooled over the MoE layers, transformers' convention; weight moe.balance_loss_weight)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # the MoE layer's width follows the model's unless the dict gives it
            self.moe = MoEConfig.from_dict({"dim": self.dim, **self.moe})
        self._check_types()
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "ffn_hidden_dim", "moe_every"):
            check_positive(name, getattr(self, name), integer=True)
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads must divide dim ({self.dim}); got {self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_kv_heads must divide n_heads ({self.n_heads}); got {kv}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"head width dim/n_heads must be even for rotary positions; got {self.dim // self.n_heads}"
            )
        check_choice("qk_norm", self.qk_norm, (None, "head", "full"))
        check_choice("balance_pooling", self.balance_pooling, ("layer", "model"))
        if self.moe is not None and self.moe.dim != self.dim:
            raise ValueError(f"moe.dim must equal dim ({self.dim}); got {self.moe.dim}")
        why = None if self.moe is None else causal_lm_problem(self.moe)
        if why:
            raise ValueError(f"moe: a causal language model cannot use this MoE layer: {why}")

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.moe is not None
            and i >= self.first_dense_layers
            and (i - self.first_dense_layers) % self.moe_every == 0
        )

    def dense_twin(self) -> LMConfig:
        """The dense baseline with the same active parameters per token: each MoE FFN becomes a
        dense FFN as wide as the K routed experts plus the shared ones."""
        if self.moe is None:
            return dataclasses.replace(self)
        m = self.moe
        width = m.top_k * m.hidden_dim + m.num_shared_experts * (m.shared_hidden_dim or m.hidden_dim)
        if any(self.is_moe_layer(i) for i in range(self.n_layers)) and all(
            self.is_moe_layer(i) for i in range(self.n_layers)
        ):
            return dataclasses.replace(self, moe=None, ffn_hidden_dim=width, ffn_kind=m.expert)
        raise ValueError("dense_twin needs a MoE FFN in every layer (moe_every=1, first_dense_layers=0)")


PIPELINE_SCHEDULES = ("1f1b", "gpipe")  # pipeline parallelism: PipeDream-Flush's order, or GPipe's
AC_MODES = ("none", "full", "selective")  # activation checkpointing: off, every block re-run, matmuls kept


@dataclass
class TrainConfig(_DictMixin):
    """One training run of one model (``moekit train`` runs the MoE and its dense twin)."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 30  # linear warm-up
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    eval_every: int = 50  # validation every n steps (and at the end)
    eval_windows: int = 48  # validation sequences (fixed, non-overlapping)
    checkpoint_every: int = 100  # checkpoint every n steps (and at the end, and on Ctrl-C)
    seed: int = 0  # seeds model init, data order and routing noise
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    autocast: str = "auto"  # "bf16", "none", or "auto" (bf16 on CUDA, none on CPU)
    compile: bool = False  # torch.compile the model for the training steps (inductor; the first steps compile)
    activation_checkpointing: str = "none"  # "full" (re-run each block in backward) or "selective" (keep matmuls)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    tokenizer: str = "bpe"  # "bpe" (trained locally, cached) or "bytes"
    vocab_size: int = 4096  # BPE vocabulary size (>= 257: 256 bytes + end-of-document); model.vocab_size follows
    data: Optional[str] = None  # a text file or folder; None = the embedded prose+code corpus
    code_chars: int = 6_000_000  # characters of stdlib code in the embedded corpus
    expert_parallel: int = 1  # ranks each MoE layer's experts are split over (under torchrun; the rest: data parallel)
    tensor_parallel: int = 1  # ranks the attention heads, dense FFNs, shared experts are split over (torchrun)
    pipeline_parallel: int = 1  # pipeline stages: consecutive blocks per rank group (torchrun; at most the layers)
    pipeline_schedule: str = "1f1b"  # "1f1b" (PipeDream-Flush) or "gpipe": the order of the microbatches' passes
    microbatches: int = 1  # each step's batch in this many equal parts, gradients accumulated (>= pipeline stages)
    dist_timeout_s: float = 600.0  # a collective waiting longer than this on a dead or stuck rank raises

    def __post_init__(self) -> None:
        self._check_types()
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "eval_every",
            "eval_windows",
            "checkpoint_every",
            "vocab_size",
            "expert_parallel",
            "tensor_parallel",
            "pipeline_parallel",
            "microbatches",
        ):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("lr", self.lr)
        check_positive("dist_timeout_s", self.dist_timeout_s)
        check_choice("autocast", self.autocast, ("auto", "bf16", "none"))
        check_choice("tokenizer", self.tokenizer, ("bpe", "bytes"))
        check_choice("activation_checkpointing", self.activation_checkpointing, AC_MODES)
        check_choice("pipeline_schedule", self.pipeline_schedule, PIPELINE_SCHEDULES)
        if self.microbatches < self.pipeline_parallel:
            raise ValueError(
                f"microbatches={self.microbatches} must be at least pipeline_parallel={self.pipeline_parallel} "
                "(the schedule fills the pipeline with them): set --microbatches"
            )
        if self.tokenizer == "bpe" and self.vocab_size < BPE_MIN_VOCAB:
            raise ValueError(
                f"vocab_size (the BPE vocabulary) must be at least {BPE_MIN_VOCAB} with tokenizer 'bpe' "
                f"(its 256 byte-level base tokens and the end-of-document token); got {self.vocab_size}"
            )
        check_device("device", self.device)
        for name in ("min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "threads"):
            check_nonneg(name, getattr(self, name))
