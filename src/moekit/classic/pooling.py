"""Pooling: turning gate probabilities and expert outputs into one prediction.

* ``"average"`` -- the gate-weighted average ``sum_k g_k(x) f_k(x)``; for
  classification this is the mixture's predictive distribution, and for
  regression the mean of the Gaussian mixture (Jacobs et al. 1991).
* ``"winner"`` -- winner-take-all: the expert with the largest gate probability.
* ``"stacking"`` -- a learned combiner (stacked generalisation, Wolpert 1992)
  fitted on out-of-fold expert outputs multiplied by gate probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import KFold, StratifiedKFold

from ._experts import ExpertSet
from ._validation import fit_weighted, supports_sample_weight
from .gating import Gating


def pool_average(g: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Gate-weighted average of expert outputs.

    Args:
        g: Gate probabilities, shape ``(n, K)``.
        pred: Expert outputs, shape ``(n, K)`` (regression) or ``(n, K, C)`` (probabilities).
    """
    if pred.ndim == 2:
        return np.sum(g * pred, axis=1)
    return np.einsum("nk,nkc->nc", g, pred)


def pool_winner(g: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Output of the expert with the largest gate probability."""
    return pred[np.arange(g.shape[0]), np.argmax(g, axis=1)]


def mixture_variance(g: np.ndarray, mean: np.ndarray, var: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Predictive variance of a Gaussian mixture around ``center``.

    ``sum_k g_k (sigma_k^2 + (mu_k - center)^2)``; with ``center`` the mixture
    mean this is ``sum_k g_k (sigma_k^2 + mu_k^2) - mu^2``.
    """
    return np.sum(g * (var[None, :] + (mean - center[:, None]) ** 2), axis=1)


def stacking_features(g: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Combiner inputs: expert outputs times gate probabilities, and the gate itself."""
    n = g.shape[0]
    if pred.ndim == 2:
        return np.hstack([g * pred, g])
    return np.hstack([(g[:, :, None] * pred).reshape(n, -1), g])


def default_stacker(task: str) -> Any:
    """Ridge with built-in alpha selection (regression) or logistic regression."""
    if task == "regression":
        return RidgeCV(alphas=np.logspace(-3, 3, 13))
    return LogisticRegression(C=1.0, max_iter=1000)


def fit_stacker(
    stacker: Any,
    task: str,
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    R: np.ndarray,
    make_experts: Callable[[], ExpertSet],
    make_gating: Callable[[], Gating],
    cv: int,
    seed: int,
) -> Any:
    """Fit a combiner on out-of-fold expert predictions times gate probabilities.

    The training responsibilities ``R`` of the full fit are held fixed; in each
    fold the experts and the gate are refitted on the other folds (one M-step)
    and predict the held-out fold, which gives honest inputs for the combiner
    (Wolpert 1992). The held-out labels never enter the fold's models, though
    they did shape ``R`` through the full fit.

    Returns:
        The fitted combiner (for classification, trained on labels ``0..C-1``).
    """
    n = X.shape[0]
    n_splits = max(2, min(cv, n))
    target = y
    if task == "classification":
        _, target = np.unique(y, return_inverse=True)
        counts = np.bincount(target)
        splitter: Any = (
            StratifiedKFold(n_splits, shuffle=True, random_state=seed)
            if counts.min() >= n_splits
            else KFold(n_splits, shuffle=True, random_state=seed)
        )
    else:
        splitter = KFold(n_splits, shuffle=True, random_state=seed)
    Z = None
    for train, test in splitter.split(X, target):
        experts, gating = make_experts(), make_gating()
        experts.m_step(X[train], y[train], R[train] * w[train, None])
        gating.m_step(X[train], R[train], w[train])
        feats = stacking_features(gating.proba(X[test]), experts.predict_all(X[test]))
        if Z is None:
            Z = np.zeros((n, feats.shape[1]))
        Z[test] = feats
    est = clone(stacker)
    assert Z is not None  # n_splits >= 2 folds, each fills its rows
    if supports_sample_weight(est):
        return fit_weighted(est, Z, target, w, seed, role="stacker", task=task)
    return est.fit(Z, target)
