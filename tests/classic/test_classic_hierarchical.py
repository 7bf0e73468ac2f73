"""Two-level hierarchical mixtures (Jordan & Jacobs 1994)."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.classic import (
    HierarchicalMixtureOfExpertsClassifier,
    HierarchicalMixtureOfExpertsRegressor,
    MixtureOfExpertsRegressor,
)


def test_hierarchy_beats_flat_mixture_on_four_regimes(four):
    (X, y), (Xt, yt) = four
    hme = HierarchicalMixtureOfExpertsRegressor(n_groups=2, n_experts_per_group=2, random_state=0).fit(X, y)
    flat = MixtureOfExpertsRegressor(n_experts=2, random_state=0).fit(X, y)
    assert hme.score(Xt, yt) > 0.95
    assert hme.score(Xt, yt) - flat.score(Xt, yt) > 0.3
    # Four pieces, four linear leaves: the slopes are recovered.
    slopes = sorted(float(e.coef_[0]) for e in hme.experts_)
    np.testing.assert_allclose(slopes, [-3, -2, 2, 3], atol=0.15)


def test_tree_gate_structure(four):
    (X, y), (Xt, _) = four
    hme = HierarchicalMixtureOfExpertsRegressor(n_groups=2, n_experts_per_group=3, max_iter=30, random_state=0).fit(
        X, y
    )
    assert hme.n_experts_ == len(hme.experts_) == 6
    assert len(hme.group_gates_) == 2
    G = hme.group_proba(Xt)
    L = hme.gate_proba(Xt)
    assert G.shape == (len(Xt), 2) and L.shape == (len(Xt), 6)
    np.testing.assert_allclose(G.sum(axis=1), 1.0)
    np.testing.assert_allclose(L.sum(axis=1), 1.0)
    # Leaf probabilities sum to their group's probability.
    np.testing.assert_allclose(L.reshape(-1, 2, 3).sum(axis=2), G, atol=1e-12)
    np.testing.assert_array_equal(hme.predict_group(Xt), hme.predict_expert(Xt) // 3)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_tree_em_log_likelihood_non_decreasing(four):
    (X, y), _ = four
    hme = HierarchicalMixtureOfExpertsRegressor(init="random", tol=0.0, max_iter=20, random_state=1).fit(X, y)
    assert len(hme.loglik_history_) == 20
    assert np.all(np.diff(hme.loglik_history_) >= -1e-9)
    assert hme.log_likelihood(X, y) == pytest.approx(hme.loglik_history_[-1], abs=1e-9)


@pytest.mark.parametrize("method", ["hard_em", "divide"])
def test_other_methods_fit_the_tree(four, method):
    # Hard assignments are more prone to bad local optima (horizontal "bands" of
    # the target); k-means on the inputs starts them from contiguous regions.
    (X, y), (Xt, yt) = four
    hme = HierarchicalMixtureOfExpertsRegressor(method=method, init="kmeans_x", random_state=0).fit(X, y)
    assert hme.score(Xt, yt) > 0.95


def test_hierarchical_classifier():
    rng = np.random.RandomState(0)
    X = rng.uniform(-2, 2, size=(400, 2))
    # Four quadrants, each with its own linear rule.
    y = ((X[:, 0] * X[:, 1] > 0) ^ (X[:, 0] + X[:, 1] > 0.5 * np.sign(X[:, 0]))).astype(int)
    hme = HierarchicalMixtureOfExpertsClassifier(random_state=0, max_iter=30).fit(X, y)
    P = hme.predict_proba(X)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    assert hme.score(X, y) > 0.85
    assert hme.gate_.classes_.tolist() == [0, 1]
