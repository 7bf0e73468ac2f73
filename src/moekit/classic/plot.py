"""Plotting which expert owns which region, for 1-D and 2-D inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import is_classifier
from sklearn.utils.validation import check_is_fitted


def plot_experts(model: Any, X: Any, y: Any, ax: Any = None, resolution: int = 200) -> Any:
    """Draw the experts of a fitted mixture and the regions their gate gives them.

    1-D inputs: the data coloured by owning expert, each expert's prediction
    (solid where the gate gives it the input, dotted elsewhere) and the pooled
    prediction with a band of two predictive standard deviations (regression),
    or the gate probabilities and pooled class probabilities (classification).
    2-D inputs: the owning expert over a grid as coloured regions, with the
    data coloured by target.

    Args:
        model: A fitted mixture from :mod:`moekit.classic`.
        X: Inputs with one or two features, shape ``(n_samples, n_features)``.
        y: Targets, shape ``(n_samples,)``.
        ax: Matplotlib Axes to draw on; a new figure is made when ``None``.
        resolution: Number of grid points per input dimension.

    Returns:
        The matplotlib Axes.
    """
    check_is_fitted(model, "experts_")
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or X.shape[1] not in (1, 2):
        raise ValueError(f"X must have shape (n_samples, 1) or (n_samples, 2) to be plotted, got {X.shape}.")
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"X and y have inconsistent numbers of samples: {X.shape[0]} != {y.shape[0]}.")
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6, 4))
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    colors = [cmap(k % 10) for k in range(model.n_experts_)]
    if X.shape[1] == 1:
        _plot_1d(model, X, y, ax, colors, resolution)
    else:
        _plot_2d(model, X, y, ax, colors, resolution)
    return ax


def _plot_1d(model: Any, X: np.ndarray, y: np.ndarray, ax: Any, colors: list[Any], resolution: int) -> None:
    lo, hi = X[:, 0].min(), X[:, 0].max()
    pad = 0.05 * (hi - lo if hi > lo else 1.0)
    grid = np.linspace(lo - pad, hi + pad, resolution)[:, None]
    owner_grid = model.predict_expert(grid)
    owner = model.predict_expert(X)
    if is_classifier(model):
        y_pos = np.searchsorted(model.classes_, y) / max(len(model.classes_) - 1, 1)
        ax.scatter(X[:, 0], y_pos, c=[colors[k] for k in owner], s=12, alpha=0.6)
        g = model.gate_proba(grid)
        for k in range(model.n_experts_):
            ax.plot(grid[:, 0], g[:, k], "--", color=colors[k], label=f"gate {k}")
        proba = model.predict_proba(grid)
        for c, label in enumerate(model.classes_):
            ax.plot(
                grid[:, 0],
                proba[:, c],
                color="black",
                alpha=0.4 + 0.6 * c / max(len(model.classes_) - 1, 1),
                label=f"P(y={label})",
            )
        ax.set_ylabel("probability / class")
    else:
        ax.scatter(X[:, 0], y, c=[colors[k] for k in owner], s=12, alpha=0.6)
        for k, est in enumerate(model.experts_):
            mu = np.asarray(est.predict(grid), dtype=float).reshape(-1)
            ax.plot(grid[:, 0], mu, ":", color=colors[k], alpha=0.6)
            ax.plot(grid[:, 0], np.where(owner_grid == k, mu, np.nan), "-", color=colors[k], lw=2, label=f"expert {k}")
        mean, std = model.predict(grid, return_std=True)
        ax.plot(grid[:, 0], mean, color="black", lw=1, label="mixture")
        ax.fill_between(grid[:, 0], mean - 2 * std, mean + 2 * std, color="grey", alpha=0.2)
        ax.set_ylabel("y")
    ax.set_xlabel("x")
    ax.legend(loc="best", fontsize="small")


def _plot_2d(model: Any, X: np.ndarray, y: np.ndarray, ax: Any, colors: list[Any], resolution: int) -> None:
    from matplotlib.colors import ListedColormap

    lo, hi = X.min(axis=0), X.max(axis=0)
    pad = 0.05 * np.where(hi > lo, hi - lo, 1.0)
    g0 = np.linspace(lo[0] - pad[0], hi[0] + pad[0], resolution)
    g1 = np.linspace(lo[1] - pad[1], hi[1] + pad[1], resolution)
    xx, yy = np.meshgrid(g0, g1)
    owner = model.predict_expert(np.c_[xx.ravel(), yy.ravel()]).reshape(xx.shape)
    K = model.n_experts_
    ax.contourf(xx, yy, owner, levels=np.arange(-0.5, K), cmap=ListedColormap(colors[:K]), alpha=0.25)
    if is_classifier(model):
        c = np.searchsorted(model.classes_, y)
        sc = ax.scatter(X[:, 0], X[:, 1], c=c, cmap="coolwarm", s=14, edgecolors="k", linewidths=0.3)
    else:
        sc = ax.scatter(X[:, 0], X[:, 1], c=y, cmap="viridis", s=14, edgecolors="k", linewidths=0.3)
    ax.figure.colorbar(sc, ax=ax, label="y")
    ax.set_xlabel("x0")
    ax.set_ylabel("x1")
    ax.set_title("regions owned by each expert (background)")
