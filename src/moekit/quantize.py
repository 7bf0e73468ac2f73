"""Low-precision inference for a moekit model: the experts, each in its own format (chosen from
routing under a byte budget, or one for all), and optionally the other linear maps, computed by
PyTorch's CPU kernels on the low-bit weights (:mod:`moekit.kernels.lowbit`). Forward only.

Decoding reads every active weight once per token: fewer bytes per weight is the speed-up
(measured: benchmarks/RESULTS.md, "Low-bit decode"). Which experts deserve more bits: those
that take more of the routed tokens and lose more to the smaller format. :func:`plan_formats`
spends a byte budget greedily by ``usage x error removed / bytes added`` (usage: each layer's
``expert_usage``, the running share of routed slots training keeps and saves, or shares measured
on data); none of llama.cpp, HQQ or torchao chooses precision per expert from routing.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union, cast

import torch
from torch import Tensor, nn

from .kernels.lowbit import FORMATS, LowBitWeight, check_format, fits, format_bits, format_bytes
from .layer.experts import ACTIVATIONS, GATED, FeedForward, GroupedExperts
from .layer.lowbit import LowBitFeedForward, LowBitLinear, QuantizedExperts
from .layer.moe import MoE

EXPERT_CHOICES = FORMATS + ("auto",)  # and int4:G for a group size G
Formats = list[list[str]]  # per MoE layer (model order), per expert


@dataclass
class QuantReport:
    """What :func:`quantize_model` did: each layer's expert formats and the bytes of the experts
    before (float32 as held) and after; the format of the other linear maps (None: untouched)."""

    formats: Formats
    expert_bytes_before: int
    expert_bytes_after: int
    rest: Optional[str]
    counts: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        mix = ", ".join(f"{n} {f}" for f, n in self.counts.items())
        experts = (
            f"experts {mix}: {self.expert_bytes_after / 2**20:.1f} MiB (from {self.expert_bytes_before / 2**20:.1f})"
            if self.counts
            else ""
        )
        rest = f"other linear maps {self.rest}" if self.rest else ""
        return "; ".join(p for p in (experts, rest) if p)


def _stacks(model: nn.Module) -> list[tuple[MoE, GroupedExperts]]:
    return [(m, m.experts) for m in model.modules() if isinstance(m, MoE) and isinstance(m.experts, GroupedExperts)]


def expert_error(experts: GroupedExperts, e: int, fmt: str, group_size: int = 64) -> float:
    """Squared Frobenius error of expert ``e``'s two projections in ``fmt``, relative to their norm."""
    err = norm = 0.0
    for w in (experts.w_up[e].detach().t(), experts.w_down[e].detach().t()):
        q = LowBitWeight.quantize(w, fmt, group_size).dequantize()
        err += float((q - w.float()).pow(2).sum())
        norm += float(w.float().pow(2).sum())
    return err / max(norm, 1e-30)


def expert_output_error(
    experts: GroupedExperts, e: int, fmt: str, moments: tuple[Tensor, Tensor], group_size: int = 64
) -> float:
    """Squared output error of expert ``e`` in ``fmt`` over the rows its moments were taken on,
    with the inputs' channels taken as uncorrelated: ``sum_i m_i |dW_i|^2`` for each projection,
    ``dW`` the quantization error and ``m`` the sums of its inputs' squares per channel
    (:func:`expert_input_moments`; the diagonal of GPTQ's proxy, Frantar et al. 2023, which
    AWQ's per-channel activation statistics also use)."""
    err = 0.0
    for w_IO, m_I in ((experts.w_up[e].detach(), moments[0][e]), (experts.w_down[e].detach(), moments[1][e])):
        d_IO = LowBitWeight.quantize(w_IO.t(), fmt, group_size).dequantize(torch.float64).t() - w_IO.double()
        err += float((m_I.double() @ d_IO.square()).sum())
    return err


@torch.no_grad()
def expert_input_moments(model: nn.Module, idx_BS: Tensor, batch: int = 8) -> list[tuple[Tensor, Tensor]]:
    """Per MoE layer with stacked experts, ``(m_up (E, D), m_down (E, F))``: over the rows each
    expert receives when ``model`` reads the token windows ``idx_BS``, the sums of the squares of
    each input channel of its up projection (``x``) and of its down projection (``a = act(x
    W_up)``), in float64. Summed, not averaged: a busier expert's errors weigh more by its rows;
    per channel, so they cost (E, D) numbers a layer whatever the width."""
    stacks = _stacks(model)
    sums = [
        (
            torch.zeros(ex.num_experts, ex.dim, dtype=torch.float64),
            torch.zeros(ex.num_experts, ex.hidden_dim, dtype=torch.float64),
        )
        for _, ex in stacks
    ]

    def hook(i: int, ex: GroupedExperts):
        @torch.no_grad()
        def record(module, args):
            counts = args[1].tolist()
            for e, x in enumerate(args[0].detach()[: sum(counts)].split(counts)):  # the rows past them: padding
                if len(x):
                    a = ACTIVATIONS[ex.kind](x @ ex.w_up[e].detach().to(x.dtype))
                    sums[i][0][e] += x.double().square().sum(0).cpu()
                    sums[i][1][e] += a.double().square().sum(0).cpu()

        return record

    handles = [ex.register_forward_pre_hook(hook(i, ex)) for i, (_, ex) in enumerate(stacks)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the grouped path (few-slot decoding skips the experts' forward)
            for b in range(0, idx_BS.shape[0], batch):
                model(idx_BS[b : b + batch])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums


def _expert_fits(experts: GroupedExperts, fmt: str, group_size: int) -> bool:
    h = experts.hidden_dim * (2 if GATED[experts.kind] else 1)
    return fits(fmt, h, experts.dim, group_size) and fits(fmt, experts.dim, experts.hidden_dim, group_size)


def expert_format_bytes(experts: GroupedExperts, fmt: str, group_size: int = 64) -> int:
    h = experts.hidden_dim * (2 if GATED[experts.kind] else 1)
    return format_bytes(fmt, h, experts.dim, group_size) + format_bytes(
        fmt, experts.dim, experts.hidden_dim, group_size
    )


AUTO_CHOICES = ("int4:256", "int4:128", "int4:64", "int4:32", "int8")


def plan_formats(
    model: nn.Module,
    budget_bytes: int,
    choices: Sequence[str] = AUTO_CHOICES,
    group_size: int = 64,
    usage: Optional[Sequence[Tensor]] = None,
    moments: Optional[Sequence[tuple[Tensor, Tensor]]] = None,
) -> Formats:
    """Per-expert formats within ``budget_bytes`` of expert weights: every expert starts in the
    smallest of ``choices`` (default: int4 with groups of 256 down to 32, then int8); upgrades (to
    the next larger choice) go in order of ``usage share x relative error removed / bytes added``
    while the budget allows. ``usage``: per MoE layer, each
    expert's share of routed tokens (default: the layers' ``expert_usage``). ``moments``
    (:func:`expert_input_moments` on calibration tokens): rank upgrades by the squared output
    error they remove instead (:func:`expert_output_error`; usage is then in the moments' sums).
    ValueError when even the smallest format does not fit."""
    for f in choices:
        check_format(f, "choices")
    stacks = _stacks(model)
    if not stacks:
        raise ValueError("the model has no MoE layer with stacked experts to quantize")
    ladder = sorted(
        {f for f in choices if all(_expert_fits(ex, f, group_size) for _, ex in stacks)},
        key=lambda f: format_bits(f, group_size),
    )
    if not ladder:
        raise ValueError(f"none of the formats {list(choices)} fits the experts' shapes")
    shares = usage if usage is not None else [m.expert_usage.detach().float() for m, _ in stacks]
    if len(shares) != len(stacks):
        raise ValueError(f"usage: one share vector per MoE layer ({len(stacks)}); got {len(shares)}")
    formats = [[ladder[0]] * ex.num_experts for _, ex in stacks]
    spent = sum(expert_format_bytes(ex, ladder[0], group_size) * ex.num_experts for _, ex in stacks)
    if spent > budget_bytes:
        raise ValueError(
            f"expert budget of {budget_bytes} bytes is below the experts in {ladder[0]} ({spent} bytes): "
            "give more, or a smaller format"
        )
    if moments is not None and len(moments) != len(stacks):
        raise ValueError(f"moments: one pair per MoE layer ({len(stacks)}); got {len(moments)}")
    err = {
        (i, e, f): expert_error(ex, e, f, group_size)
        if moments is None
        else expert_output_error(ex, e, f, moments[i], group_size)
        for i, (_, ex) in enumerate(stacks)
        for e in range(ex.num_experts)
        for f in ladder
    }
    if moments is not None:
        shares = [torch.ones(ex.num_experts) for _, ex in stacks]

    def gain(i: int, e: int, step: int) -> tuple[float, int]:
        ex, a, b = stacks[i][1], ladder[step], ladder[step + 1]
        cost = expert_format_bytes(ex, b, group_size) - expert_format_bytes(ex, a, group_size)
        return float(shares[i][e]) * (err[i, e, a] - err[i, e, b]) / cost, cost

    heap = [(-gain(i, e, 0)[0], i, e, 0) for i, (_, ex) in enumerate(stacks) for e in range(ex.num_experts)]
    heapq.heapify(heap) if len(ladder) > 1 else heap.clear()
    while heap:
        _, i, e, step = heapq.heappop(heap)
        cost = gain(i, e, step)[1]
        if spent + cost > budget_bytes:
            continue  # a cheaper upgrade may still fit
        spent += cost
        formats[i][e] = ladder[step + 1]
        if step + 2 < len(ladder):
            heapq.heappush(heap, (-gain(i, e, step + 1)[0], i, e, step + 1))
    return formats


def quantize_model(
    model: nn.Module,
    experts: Union[str, Formats, None] = "int8",
    *,
    rest: Optional[str] = None,
    group_size: int = 64,
    budget_bytes: Optional[int] = None,
    bits: Optional[float] = None,
    usage: Optional[Sequence[Tensor]] = None,
    calibration: Optional[Tensor] = None,
) -> QuantReport:
    """Swap ``model``'s stacked experts for :class:`QuantizedExperts` in place: ``experts`` is one
    format for all, per-layer-per-expert formats, None (left as they are), or ``"auto"`` (:func:`plan_formats` within
    ``budget_bytes``, or ``bits`` per expert weight on average, scales included). ``rest``: a
    format for the other linear maps too (attention, output head, dense FFNs and shared experts;
    the routers and embeddings stay as they are, so routing sees full-precision scores).
    ``calibration``: token windows ``(B, S)`` the "auto" plan measures each expert's output error
    on (:func:`expert_input_moments`), instead of weighing weight error by usage. For inference:
    the model is put in eval mode."""
    stacks = _stacks(model)
    if experts is not None and not stacks:
        raise ValueError("the model has no MoE layer with stacked experts to quantize")
    if experts is None:
        plan: Formats = []
    elif isinstance(experts, str):
        if experts != "auto":
            check_format(experts, "experts")
        if experts == "auto":
            if budget_bytes is None and bits is not None:
                budget_bytes = int(sum(ex.w_up.numel() + ex.w_down.numel() for _, ex in stacks) * bits / 8)
            if budget_bytes is None:
                raise ValueError('experts="auto" chooses formats within a byte budget: give budget_bytes or bits')
            moments = None if calibration is None else expert_input_moments(model, calibration)
            plan = plan_formats(model, budget_bytes, group_size=group_size, usage=usage, moments=moments)
        else:
            plan = [[experts] * ex.num_experts for _, ex in stacks]
    else:
        plan = [list(f) for f in experts]
        if len(plan) != len(stacks):
            raise ValueError(f"experts: one list of formats per MoE layer ({len(stacks)}); got {len(plan)}")
    if rest is not None:
        check_format(rest, "rest")
    if experts is None:
        stacks = []
    before = sum(ex.w_up.numel() + ex.w_down.numel() for _, ex in stacks) * 4
    with torch.no_grad():
        for (moe, ex), formats in zip(stacks, plan):
            moe.experts = QuantizedExperts.of(ex, formats, group_size)
        if rest is not None:
            _quantize_rest(model, rest, group_size)
    after = sum(cast(QuantizedExperts, moe.experts).nbytes for moe, _ in stacks)
    counts: dict[str, int] = {}
    for f in (f for layer in plan for f in layer):
        counts[f] = counts.get(f, 0) + 1
    model.eval()
    return QuantReport(plan, before, after, rest, counts)


def describe(model: nn.Module) -> Optional[str]:
    """``experts 64 int8 (3.0 MiB); other linear maps int8`` for a model with low-bit modules, else None."""
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    others = sorted({m.q.name for m in model.modules() if isinstance(m, LowBitLinear)})
    if not experts and not others:
        return None
    counts: dict[str, int] = {}
    for f in (f for m in experts for f in m.formats):
        counts[f] = counts.get(f, 0) + 1
    parts = []
    if experts:
        mix = ", ".join(f"{n} {f}" for f, n in counts.items())
        parts.append(f"experts {mix} ({sum(m.nbytes for m in experts) / 2**20:.1f} MiB)")
    if others:
        parts.append(f"other linear maps {', '.join(others)}")
    return "; ".join(parts)


def lowbit_plan(model: nn.Module) -> dict:
    """What :func:`apply_lowbit_plan` needs to rebuild ``model``'s low-bit modules before reading
    their tensors: each MoE layer's expert formats, each low-bit linear map and dense FFN by path
    (a quantized checkpoint keeps it in its metadata)."""
    plan: dict = {"experts": [], "linear": {}, "ffn": {}}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedExperts):
            plan["experts"].append(m.formats)
        elif isinstance(m, LowBitLinear):
            plan["linear"][name] = [m.q.name, m.out_features, m.in_features, m.bias is not None]
        elif isinstance(m, LowBitFeedForward):
            plan["ffn"][name] = [m.up.name, m.down.name]
    return plan


def apply_lowbit_plan(model: nn.Module, plan: dict, experts: bool = True) -> None:
    """Give ``model`` (built on the meta device, or any) the low-bit modules ``plan`` names, with
    uninitialised tensors of the right shapes: a quantized checkpoint is then read into them
    (``experts=False``: all but the experts, which an expert store reads itself)."""
    from .models.lm import MoETransformer

    stacks = _stacks(model) if experts else []
    if experts and len(plan.get("experts", [])) != len(stacks):
        raise ValueError(
            f"the quantized checkpoint has expert formats for {len(plan.get('experts', []))} MoE layers; "
            f"the model has {len(stacks)}"
        )
    for (moe, ex), formats in zip(stacks, plan.get("experts", [])):
        moe.experts = QuantizedExperts.empty(ex.num_experts, ex.dim, ex.hidden_dim, ex.kind, formats)
    for path, (fmt, n_out, n_in, bias) in plan.get("linear", {}).items():
        layer = LowBitLinear(LowBitWeight.empty(fmt, n_out, n_in), torch.empty(n_out) if bias else None)
        _set(model, path, layer)
    for path, (up_fmt, down_fmt) in plan.get("ffn", {}).items():
        f = model.get_submodule(path)
        assert isinstance(f, FeedForward), path
        h = f.hidden_dim * (2 if GATED[f.kind] else 1)
        up, down = LowBitWeight.empty(up_fmt, h, f.dim), LowBitWeight.empty(down_fmt, f.dim, f.hidden_dim)
        _set(model, path, LowBitFeedForward(up, down, f.kind))
    if isinstance(model, MoETransformer):
        model.eval()


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


@dataclass
class Quality:
    """A quantized model against its reference on the same windows: perplexities, mean KL of the
    reference's next-token distribution to the quantized one's, top-1 agreement, and per MoE layer
    the share of tokens routed to exactly the same set of experts."""

    ppl_ref: float
    ppl: float
    kl: float
    top1: float
    routing: list[float]

    @property
    def ppl_change(self) -> float:
        return self.ppl / self.ppl_ref - 1

    def line(self) -> str:
        route = min(self.routing) if self.routing else float("nan")
        return (
            f"perplexity {self.ppl_ref:.3f} -> {self.ppl:.3f} ({self.ppl_change:+.2%}), KL {self.kl:.2e}, "
            f"top-1 agreement {self.top1:.2%}, same experts {route:.2%} (worst layer)"
        )


@torch.no_grad()
def compare(ref: nn.Module, model: nn.Module, idx_BS: Tensor, targets_BS: Tensor, batch: int = 8) -> Quality:
    """:class:`Quality` of ``model`` against ``ref`` on token windows ``idx_BS`` (targets: the next
    tokens), both in eval mode."""
    ref.eval()
    model.eval()
    nll_ref = nll = kl = agree = 0.0
    n = 0
    same: list[float] = []
    for i in range(0, idx_BS.shape[0], batch):
        x, y = idx_BS[i : i + batch], targets_BS[i : i + batch]
        a, b = ref(x), model(x)
        la, lb = a.logits.float().log_softmax(-1), b.logits.float().log_softmax(-1)
        nll_ref += float(-la.gather(-1, y[..., None]).sum())
        nll += float(-lb.gather(-1, y[..., None]).sum())
        kl += float((la.exp() * (la - lb)).sum())
        agree += float((la.argmax(-1) == lb.argmax(-1)).sum())
        n += y.numel()
        layers = [(ra.experts_TK, rb.experts_TK) for ra, rb in zip(a.moe, b.moe) if ra is not None]
        if not same:
            same = [0.0] * len(layers)
        for j, (ea, eb) in enumerate(layers):
            if ea is not None and eb is not None:
                same[j] += float((ea.sort(-1).values == eb.sort(-1).values).all(-1).sum())
    return Quality(math.exp(nll_ref / n), math.exp(nll / n), kl / n, agree / n, [s / n for s in same])


def validation_windows(
    run: Union[str, os.PathLike[str]], windows: int = 64, split: str = "val"
) -> tuple[Tensor, Tensor]:
    """(inputs, next-token targets) of up to ``windows`` evenly spaced windows of a run's validation
    split (``split="train"``: its training split, e.g. to calibrate on), tokenised with the run's
    own tokenizer (what :func:`compare` scores a copy on)."""
    from pathlib import Path

    from .data import build_data, load_tokenizer
    from .data.stream import fixed_windows, window
    from .runs import TOKENIZER, load_run_config

    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train'; got {split!r}")
    _, train_cfg, _ = load_run_config(Path(run))
    tok = load_tokenizer(Path(run) / TOKENIZER)
    data = build_data(train_cfg.data, train_cfg.tokenizer, train_cfg.vocab_size, train_cfg.code_chars, tok=tok)
    ids_N = data.val_ids_N if split == "val" else data.train_ids_N
    starts = fixed_windows(ids_N.numel(), train_cfg.seq_len, windows)
    return window(ids_N, starts, train_cfg.seq_len)


def quantize_run(
    run: Union[str, os.PathLike[str]],
    out: Union[str, os.PathLike[str]],
    experts: Optional[str] = "int8",
    *,
    rest: Optional[str] = None,
    bits: float = 6.0,
    windows: int = 64,
    calibrate: int = 16,
) -> tuple[QuantReport, Quality]:
    """Write ``out``, a run folder holding ``run``'s MoE model quantized (:func:`quantize_model`;
    the low-bit tensors and their plan in the checkpoint, which ``load_trained`` and ``moekit
    generate`` read back), with the run's config and tokenizer; the quality against the float model
    on ``windows`` validation windows is printed and kept in the checkpoint's metadata. ``"auto"``
    plans on each expert's output error over ``calibrate`` windows of the training split (0: by
    usage-weighted weight error; at 6 bits this run's KL was 3x lower calibrated: RESULTS.md)."""
    import copy
    import shutil
    from pathlib import Path

    from .runs import CONFIG, TOKENIZER, load_run_config
    from .train.checkpoint import save_checkpoint
    from .train.trainer import checkpoint_step, find_checkpoint, load_trained

    src, dst = Path(run), Path(out)
    model_cfg, _, _ = load_run_config(src)
    if model_cfg.moe is None:
        raise ValueError(f"run {src} has no MoE model to quantize")
    path = find_checkpoint(src / "moe")
    if path is None:
        raise FileNotFoundError(f"run {src} has no checkpoint for its moe model")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty: give a new folder for the quantized run")
    ref = load_trained(src / "moe", model_cfg)
    model = copy.deepcopy(ref)  # read (and checked) once
    calibration = validation_windows(src, calibrate, split="train")[0] if experts == "auto" and calibrate else None
    report = quantize_model(model, experts, rest=rest, bits=bits, calibration=calibration)
    quality = compare(ref, model, *validation_windows(src, windows))
    (dst / "moe").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / CONFIG, dst / CONFIG)
    shutil.copyfile(src / TOKENIZER, dst / TOKENIZER)
    meta = {
        "step": checkpoint_step(path),
        "lowbit": lowbit_plan(model),
        "quantized_from": str(src),
        "quality": quality.__dict__,
    }
    save_checkpoint(dst / "moe" / "checkpoint.safetensors", model, meta=meta)
    return report, quality


def _quantize_rest(model: nn.Module, fmt: str, group_size: int) -> None:
    """Attention projections, dense FFNs, shared experts and the output head in ``fmt`` (int8
    where int4's groups or tiles do not divide a weight's shape)."""
    from .models.lm import Attention, MoETransformer

    def linear(w_OI: Tensor) -> LowBitWeight:
        ok = fits(fmt, w_OI.shape[0], w_OI.shape[1], group_size)
        return LowBitWeight.quantize(w_OI, fmt if ok else "int8", group_size)

    def ffn(f: FeedForward) -> LowBitFeedForward:
        up_width = f.hidden_dim * (2 if GATED[f.kind] else 1)
        ok = fits(fmt, up_width, f.dim, group_size) and fits(fmt, f.dim, f.hidden_dim, group_size)
        return LowBitFeedForward.of(f, fmt if ok else "int8", group_size)

    for m in list(model.modules()):
        if isinstance(m, Attention):
            for n in ("wq", "wk", "wv"):
                proj = getattr(m, n)
                setattr(m, n, LowBitLinear(linear(proj.weight), proj.bias))
            m.wo = LowBitLinear(linear(m.wo.weight), m.wo.bias)  # type: ignore[assignment]
        elif isinstance(m, MoE) and isinstance(m.shared, FeedForward):
            m.shared = ffn(m.shared)  # type: ignore[assignment]
        for name, child in list(m.named_children()):
            if isinstance(child, FeedForward) and not isinstance(m, MoE):
                setattr(m, name, ffn(child))
    if isinstance(model, MoETransformer):
        weight = model.embed.weight if model.head is None else model.head.weight
        model.head = LowBitLinear(linear(weight))  # type: ignore[assignment]


__all__ = [
    "AUTO_CHOICES",
    "apply_lowbit_plan",
    "describe",
    "lowbit_plan",
    "EXPERT_CHOICES",
    "Quality",
    "QuantReport",
    "compare",
    "expert_error",
    "plan_formats",
    "quantize_model",
    "quantize_run",
    "validation_windows",
]
