"""scikit-learn API integration and input validation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from moekit.classic import (
    HierarchicalMixtureOfExpertsRegressor,
    MixtureOfExpertsClassifier,
    MixtureOfExpertsRegressor,
)


def test_clone_get_set_params(regimes):
    (X, y, _), _ = regimes
    moe = MixtureOfExpertsRegressor(experts=Ridge(alpha=0.5), n_experts=3, pooling="winner")
    params = moe.get_params(deep=True)
    assert params["n_experts"] == 3 and params["experts__alpha"] == 0.5
    twin = clone(moe)
    assert twin is not moe and twin.get_params()["pooling"] == "winner"
    assert twin.experts is not moe.experts
    twin.set_params(n_experts=2, experts__alpha=0.01, random_state=0)
    assert moe.n_experts == 3 and moe.experts.alpha == 0.5  # the original is untouched
    twin.fit(X, y)
    assert twin.n_experts_ == 2 and all(e.alpha == 0.01 for e in twin.experts_)
    with pytest.raises(NotFittedError):
        clone(twin).predict(X)


def test_pipeline_grid_search_and_cross_val(regimes):
    (X, y, _), (Xt, yt, _) = regimes
    pipe = make_pipeline(StandardScaler(), MixtureOfExpertsRegressor(random_state=0))
    assert pipe.fit(X, y).score(Xt, yt) > 0.98
    grid = GridSearchCV(
        MixtureOfExpertsRegressor(random_state=0),
        {"n_experts": [1, 2], "pooling": ["average", "winner"]},
        cv=3,
    ).fit(X, y)
    assert grid.best_params_["n_experts"] == 2
    scores = cross_val_score(MixtureOfExpertsRegressor(random_state=0), X, y, cv=3)
    assert scores.shape == (3,) and np.all(scores > 0.95)


def test_pipelines_as_experts_and_gate(laws):
    (X, y, _), (Xt, yt, _) = laws
    moe = MixtureOfExpertsRegressor(
        experts=make_pipeline(StandardScaler(), Ridge(alpha=1e-3)),
        gate=make_pipeline(StandardScaler(), LogisticRegression(C=100.0)),
        random_state=0,
    ).fit(X, y)
    assert moe.score(Xt, yt) > 0.9


@pytest.mark.parametrize(
    "params,match",
    [
        ({"n_experts": 0}, "n_experts must be an int >= 1"),
        ({"n_experts": 1.5}, "n_experts must be an int >= 1"),
        ({"method": "gibbs"}, r"method must be one of \['em', 'hard_em', 'divide'\]"),
        ({"pooling": "max"}, r"pooling must be one of \['average', 'winner', 'stacking'\]"),
        ({"init": "kmeans"}, r"init must be one of \['kmeans_xy', 'kmeans_x', 'random'\]"),
        ({"n_init": 0}, "n_init must be an int >= 1"),
        ({"max_iter": 0}, "max_iter must be an int >= 1"),
        ({"tol": -1.0}, "tol must be a finite float >= 0"),
        ({"variance_floor": 0.0}, "variance_floor must be a finite float > 0"),
        ({"stacking_cv": 1}, "stacking_cv must be an int >= 2"),
        ({"gate": LinearRegression()}, "gate must be a classifier with predict_proba"),
        ({"experts": "linear"}, "experts must be a scikit-learn estimator"),
        ({"experts": []}, "non-empty list"),
        ({"experts": [LinearRegression(), Ridge()], "n_experts": 3}, "n_experts=3 does not match the 2 estimators"),
    ],
)
def test_bad_parameters(regimes, params, match):
    (X, y, _), _ = regimes
    with pytest.raises(ValueError, match=match):
        MixtureOfExpertsRegressor(**params).fit(X, y)


def test_bad_data(regimes):
    (X, y, _), _ = regimes
    X_nan = X.copy()
    X_nan[3, 0] = np.nan
    y_nan = y.copy()
    y_nan[5] = np.nan
    moe = MixtureOfExpertsRegressor(random_state=0)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        moe.fit(X_nan, y)
    with pytest.raises(ValueError, match="Input y contains NaN"):
        moe.fit(X, y_nan)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        moe.fit(X, y[:-1])
    with pytest.raises(ValueError, match="n_samples=1 .* too few for 2 experts"):
        moe.fit(X[:1], y[:1])
    with pytest.raises(ValueError, match="sample_weight must be non-negative"):
        moe.fit(X, y, sample_weight=-np.ones(len(y)))
    moe.fit(X, y)
    with pytest.raises(ValueError, match="features"):
        moe.predict(np.c_[X, X])
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        moe.responsibilities(X, y[:-1])
    with pytest.raises(ValueError, match="Input X contains NaN"):
        moe.predict(X_nan)
    with pytest.raises(ValueError, match="Unknown label type"):
        MixtureOfExpertsClassifier().fit(X, y)


@pytest.mark.parametrize("method", ["predict", "gate_proba", "predict_expert"])
def test_unfitted(regimes, method):
    (X, _, _), _ = regimes
    with pytest.raises(NotFittedError):
        getattr(MixtureOfExpertsRegressor(), method)(X)
    with pytest.raises(NotFittedError):
        MixtureOfExpertsClassifier().predict_proba(X)
    with pytest.raises(NotFittedError):
        MixtureOfExpertsRegressor().responsibilities(X, X[:, 0])


def test_hierarchical_parameter_errors(regimes):
    (X, y, _), _ = regimes
    with pytest.raises(ValueError, match="n_groups must be an int >= 1"):
        HierarchicalMixtureOfExpertsRegressor(n_groups=0).fit(X, y)
    with pytest.raises(ValueError, match="n_experts_per_group must be an int >= 1"):
        HierarchicalMixtureOfExpertsRegressor(n_experts_per_group=-1).fit(X, y)
    with pytest.raises(ValueError, match="does not match the 3 estimators"):
        HierarchicalMixtureOfExpertsRegressor(experts=[LinearRegression()] * 3).fit(X, y)
