"""plot_experts on 1-D and 2-D problems (Agg backend)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from moekit.classic import (
    HierarchicalMixtureOfExpertsRegressor,
    MixtureOfExpertsClassifier,
    MixtureOfExpertsRegressor,
    plot_experts,
)


def test_plot_1d_regression(regimes, tmp_path):
    (X, y, _), _ = regimes
    moe = MixtureOfExpertsRegressor(random_state=0).fit(X, y)
    ax = plot_experts(moe, X, y)
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"expert 0", "expert 1", "mixture"} <= set(labels)
    ax.figure.savefig(tmp_path / "moe1d.png")
    assert (tmp_path / "moe1d.png").stat().st_size > 0
    plt.close(ax.figure)


def test_plot_uses_given_axes_and_hierarchy(regimes):
    (X, y, _), _ = regimes
    hme = HierarchicalMixtureOfExpertsRegressor(random_state=0).fit(X, y)
    fig, ax = plt.subplots()
    assert plot_experts(hme, X, y, ax=ax) is ax
    assert sum(line.get_label().startswith("expert") for line in ax.get_lines()) == 4
    plt.close(fig)


def test_plot_2d(laws):
    (X, y, _), _ = laws
    moe = MixtureOfExpertsRegressor(random_state=0).fit(X, y)
    ax = plot_experts(moe, X, y, resolution=50)
    assert ax.collections  # filled regions and the scatter
    plt.close(ax.figure)
    rng = np.random.RandomState(0)
    Xc = rng.uniform(-2, 2, size=(200, 2))
    yc = np.where(Xc[:, 0] < 0, Xc[:, 1] > 0, Xc[:, 1] < 0)
    clf = MixtureOfExpertsClassifier(random_state=0).fit(Xc, yc)
    ax = plot_experts(clf, Xc, yc, resolution=50)
    plt.close(ax.figure)


def test_plot_1d_classifier():
    rng = np.random.RandomState(0)
    X = rng.uniform(-3, 3, size=(200, 1))
    y = (np.abs(X[:, 0]) > 1.5).astype(int)
    clf = MixtureOfExpertsClassifier(random_state=0).fit(X, y)
    ax = plot_experts(clf, X, y)
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"gate 0", "gate 1", "P(y=0)", "P(y=1)"} <= set(labels)
    plt.close(ax.figure)


def test_plot_errors(laws):
    (X, y, _), _ = laws
    with pytest.raises(NotFittedError):
        plot_experts(MixtureOfExpertsRegressor(), X, y)
    moe = MixtureOfExpertsRegressor(n_experts=2, random_state=0).fit(np.c_[X, X[:, :1]], y)
    with pytest.raises(ValueError, match=r"shape \(n_samples, 1\) or \(n_samples, 2\)"):
        plot_experts(moe, np.c_[X, X[:, :1]], y)
