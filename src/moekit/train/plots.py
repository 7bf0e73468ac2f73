"""PNG plots of a run folder: validation loss of MoE vs. dense, expert load over training per
layer, and the final tokens-per-expert histogram."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .trainer import METRICS  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_metrics(sub_dir: Path) -> list[dict]:
    path = Path(sub_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def val_loss_figure(run_dir: Path):
    """The validation-loss figure of a run folder (a matplotlib Figure; the caller closes it)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, style in (("moe", "-"), ("dense", "--")):
        rows = [r for r in read_metrics(run_dir / label) if "val_loss" in r]
        if not rows:
            continue
        ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], style, marker="o", ms=3, label=f"{label} (all)")
        for dom in sorted({k[len("val_loss_"):] for r in rows for k in r if k.startswith("val_loss_")}):
            ax.plot([r["step"] for r in rows], [r.get(f"val_loss_{dom}") for r in rows], style, alpha=0.45, label=f"{label} ({dom})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("MoE vs. dense model of equal active parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_val_loss(run_dir: Path) -> Path:
    return _save(val_loss_figure(run_dir), run_dir / "val_loss.png")


def expert_load_figure(run_dir: Path):
    """The expert-load-over-training figure of a run folder, or None without MoE load metrics."""
    rows = [r for r in read_metrics(run_dir / "moe") if "tokens_per_expert" in r]
    if not rows:
        return None
    rows = rows[:: max(1, len(rows) // 200)]  # at most ~200 points: a readable plot, a small file
    n_layers = len(rows[0]["tokens_per_expert"])
    fig, axes = plt.subplots(n_layers, 1, figsize=(6.4, 1.6 * n_layers + 0.6), sharex=True, squeeze=False)
    steps = [r["step"] for r in rows]
    for layer in range(n_layers):
        counts = [r["tokens_per_expert"][layer] for r in rows]
        shares = [[c / max(1, sum(cs)) for c in cs] for cs in counts]
        ax = axes[layer][0]
        E = len(shares[0])
        ax.stackplot(steps, list(zip(*shares)), linewidth=0, colors=[plt.cm.tab20(e % 20) for e in range(E)])
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"layer {layer}\nshare", fontsize=8)
    axes[-1][0].set_xlabel("step")
    axes[0][0].set_title("share of routed tokens per expert over training")
    return fig


def plot_expert_load(run_dir: Path) -> Path:
    fig = expert_load_figure(run_dir)
    return None if fig is None else _save(fig, run_dir / "expert_load.png")


def plot_tokens_per_expert(run_dir: Path) -> Path:
    rows = [r for r in read_metrics(run_dir / "moe") if "val_tokens_per_expert" in r]
    if not rows:
        return None
    counts = rows[-1]["val_tokens_per_expert"]
    n_layers, E = len(counts), len(counts[0])
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
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
