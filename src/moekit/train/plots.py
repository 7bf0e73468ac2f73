"""PNG plots of a run folder: validation loss of MoE vs. dense, expert load over training per
layer, and the final tokens-per-expert histogram.

Figures are built as ``matplotlib.figure.Figure`` objects and written with the Agg canvas, not
through pyplot: importing or calling this module leaves the caller's matplotlib backend alone.

Shape legend: E experts, S logged steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..runs import CONFIG
from .trainer import read_metrics

MODELS = (("moe", "MoE", "C0", "o"), ("dense", "dense", "C3", "s"))  # sub-run, name, colour, marker
DOMAIN_LINES = (":", "-.", (0, (5, 2)), (0, (3, 1, 1, 1)))  # one line style per domain (cycled)
LEGEND_MAX_EXPERTS = 20  # up to this many experts get a legend of distinct colours; more get a colourbar


def agg_figure(**kwargs) -> Figure:
    """A figure outside pyplot (nothing to close, no global state) drawn by the Agg canvas."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _finite_series(rows: list, key: str) -> tuple[list, list]:
    """(steps, values) of the rows whose ``key`` is a finite number (NaN, None and absent are left out)."""
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def _has_moe_layers(run_dir: Path) -> bool:
    """Whether the run's ``moe`` sub-run is a MoE model (a config with ``model.moe`` null trains a
    dense model under that label)."""
    try:
        return json.loads((Path(run_dir) / CONFIG).read_text())["model"].get("moe") is not None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True


def val_loss_figure(run_dir: Path):
    """The validation-loss figure of a run folder (a matplotlib Figure; the caller closes it), or
    None when no model was evaluated. Every series carries markers, so a run evaluated once or
    twice still shows its points; a domain with no finite value, or one identical to the overall
    curve (the only domain evaluated), is not drawn and gets no legend entry."""
    run_dir = Path(run_dir)
    present = _val_loss_runs(run_dir)
    if not present:
        return None
    fig = agg_figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    domains = sorted(
        {k[len("val_loss_") :] for *_, rows in present for r in rows for k in r if k.startswith("val_loss_")}
    )
    for name, colour, marker, rows in present:
        _plot_val_loss_model(ax, name, colour, marker, rows, domains)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    names = [name for name, *_ in present]
    ax.set_title(
        "validation loss: MoE vs. dense model of equal active parameters"
        if len(names) > 1
        else f"validation loss: {names[0]} model"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _val_loss_runs(run_dir: Path) -> list[tuple]:
    """(name, colour, marker, metric rows with ``val_loss``) of each sub-run that was evaluated."""
    present = []
    for label, name, colour, marker in MODELS:
        rows = [r for r in read_metrics(run_dir / label) if "val_loss" in r]
        if label == "moe" and not _has_moe_layers(run_dir):
            name = "dense"
        if rows:
            present.append((name, colour, marker, rows))
    return present


def _plot_val_loss_model(ax, name: str, colour: str, marker: str, rows: list, domains: list) -> None:
    """One model's overall validation loss, and each domain's where it is finite and differs from the overall."""
    steps, loss = _finite_series(rows, "val_loss")
    every = max(1, len(steps) // 40)
    series = {dom: _finite_series(rows, f"val_loss_{dom}") for dom in domains}
    series = {dom: pts for dom, pts in series.items() if pts[0]}
    same = [
        dom
        for dom, (d_steps, d_loss) in series.items()
        if d_steps == steps and all(math.isclose(a, b) for a, b in zip(d_loss, loss))
    ]
    only = f" ({same[0]} only)" if len(series) == 1 and same else ""
    ax.plot(steps, loss, "-", color=colour, marker=marker, ms=4, markevery=every, label=f"{name}, all{only}")
    for i, dom in enumerate(domains):
        if dom not in series or dom in same:
            continue
        d_steps, d_loss = series[dom]
        ax.plot(
            d_steps,
            d_loss,
            linestyle=DOMAIN_LINES[i % len(DOMAIN_LINES)],
            color=colour,
            alpha=0.6,
            marker=marker,
            ms=3.5,
            mfc="none",
            markevery=every,
            label=f"{name}, {dom}",
        )


def plot_val_loss(run_dir: Path) -> Optional[Path]:
    fig = val_loss_figure(run_dir)
    return None if fig is None else _save(fig, Path(run_dir) / "val_loss.png")


def expert_colours(num_experts: int) -> list:
    """One colour per expert: distinct qualitative colours up to :data:`LEGEND_MAX_EXPERTS`
    (tab10, then tab20), else viridis in expert order (read with a colourbar)."""
    if num_experts <= 10:
        return [colormaps["tab10"](e) for e in range(num_experts)]
    if num_experts <= LEGEND_MAX_EXPERTS:
        return [colormaps["tab20"](e) for e in range(num_experts)]
    return [colormaps["viridis"](e / max(1, num_experts - 1)) for e in range(num_experts)]


def expert_load_figure(run_dir: Path):
    """The expert-load-over-training figure of a run folder, or None without MoE load metrics:
    per layer, each expert's share of the routed slots stacked in expert order (expert 0 at the
    bottom), with a legend of experts (up to :data:`LEGEND_MAX_EXPERTS`) or a colourbar keyed by
    expert index (more)."""
    rows = [r for r in read_metrics(Path(run_dir) / "moe") if "tokens_per_expert" in r]
    if not rows:
        return None
    rows = rows[:: max(1, len(rows) // 200)]  # at most ~200 points: a readable plot, a small file
    n_layers = len(rows[0]["tokens_per_expert"])
    E = max(len(cs) for cs in rows[0]["tokens_per_expert"])
    colours = expert_colours(E)
    height = 1.6 * n_layers + 0.8
    fig = agg_figure(figsize=(7.6, height), layout="constrained")
    axes = fig.subplots(n_layers, 1, sharex=True, squeeze=False)
    steps = [r["step"] for r in rows]
    for layer in range(n_layers):
        counts_SE = [r["tokens_per_expert"][layer] for r in rows]
        shares_ES = list(zip(*[[c / max(1, sum(cs)) for c in cs] for cs in counts_SE]))
        _plot_layer_shares(axes[layer][0], steps, shares_ES, colours)
        axes[layer][0].set_ylabel(f"layer {layer}\nshare", fontsize=8)
    axes[-1][0].set_xlabel("step")
    axes[0][0].set_title(
        f"share of routed tokens per expert over training ({E} experts, expert 0 at the bottom)", fontsize=10
    )
    if E <= LEGEND_MAX_EXPERTS:
        _expert_legend(fig, colours, height)
    else:
        _expert_colourbar(fig, [a[0] for a in axes], colours)
    return fig


def _plot_layer_shares(ax, steps: list, shares_ES: list, colours: list) -> None:
    """One layer's expert shares stacked in expert order: an area over steps, or one bar for a single step."""
    if len(steps) > 1:
        ax.stackplot(steps, shares_ES, colors=colours[: len(shares_ES)], edgecolor="white", linewidth=0.25)
    else:  # a single logged step: one stacked bar instead of a zero-width area
        bottom = 0.0
        for e, share in enumerate(shares_ES):
            ax.bar(steps, share, bottom=bottom, color=colours[e], edgecolor="white", linewidth=0.25, width=0.8)
            bottom += share[0]
    ax.set_ylim(0, 1)


def _expert_legend(fig: Figure, colours: list, height: float) -> None:
    """A legend of one patch per expert outside the axes, top of the stack first."""
    E = len(colours)
    rows_fit = max(4, int(height * 5.5))
    handles = [Patch(facecolor=colours[e], label=f"expert {e}") for e in reversed(range(E))]  # top of the stack first
    fig.legend(
        handles=handles,
        loc="outside right upper",
        fontsize=7,
        ncol=math.ceil(E / rows_fit),
        title="expert",
        title_fontsize=8,
        frameon=False,
    )


def _expert_colourbar(fig: Figure, axes: list, colours: list) -> None:
    """A colourbar keyed by expert index (for more experts than a legend can hold)."""
    E = len(colours)
    cmap = ListedColormap(colours)
    norm = BoundaryNorm([e - 0.5 for e in range(E + 1)], E)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, fraction=0.04, pad=0.02)
    step = max(1, math.ceil(E / 16))
    bar.set_ticks(list(range(0, E, step)))
    bar.set_label("expert (stacked bottom to top in this order)", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def plot_expert_load(run_dir: Path) -> Optional[Path]:
    fig = expert_load_figure(run_dir)
    return None if fig is None else _save(fig, Path(run_dir) / "expert_load.png")


def plot_tokens_per_expert(run_dir: Path) -> Optional[Path]:
    rows = [r for r in read_metrics(run_dir / "moe") if "val_tokens_per_expert" in r]
    if not rows:
        return None
    counts = rows[-1]["val_tokens_per_expert"]
    n_layers, E = len(counts), len(counts[0])
    fig = agg_figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    width = 0.8 / n_layers
    for layer, cs in enumerate(counts):
        ax.bar([e + layer * width for e in range(E)], cs, width=width, label=f"layer {layer}")
    ax.axhline(sum(counts[0]) / E, color="k", lw=0.8, ls=":", label="uniform")
    ax.set_xticks([e + 0.4 - width / 2 for e in range(E)], [str(e) for e in range(E)])
    ax.set_xlabel("expert")
    ax.set_ylabel("validation tokens routed")
    ax.set_title(f"tokens per expert at step {rows[-1]['step']}")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, run_dir / "tokens_per_expert.png")


def plot_run(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    return [p for p in (plot_val_loss(run_dir), plot_expert_load(run_dir), plot_tokens_per_expert(run_dir)) if p]
