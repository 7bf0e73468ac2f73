"""Gating networks for the classic mixtures.

The gate of a mixture of experts (Jacobs, Jordan, Nowlan & Hinton 1991) is a
classifier whose classes are the experts: ``g_k(x) = P(expert k | x)``. Any
scikit-learn classifier with ``predict_proba`` can play that role. In the EM
M-step (Jordan & Jacobs 1994) the gate must be fitted to *soft* targets, the
responsibilities ``h_nk``. We do that for any classifier that accepts
``sample_weight``: each sample is repeated once per expert, labelled with that
expert, and weighted by its responsibility. Maximising the weighted
log-likelihood of this expanded dataset is exactly the gate's M-step objective
``sum_n sum_k h_nk log g_k(x_n)``.

A two-level tree of gates (hierarchical mixture of experts, Jordan & Jacobs
1994) multiplies a top gate over groups with one gate per group over its
experts: ``P(leaf jk | x) = g_j(x) g_{k|j}(x)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ._validation import fit_weighted, seed_estimator, supports_sample_weight

#: Relative weight below which a (sample, class) pair is left out of a fit.
DROP = 1e-8
#: Floor applied to probabilities before taking logs.
PROBA_FLOOR = 1e-12


class ConstantProba:
    """Fitted stand-in classifier that predicts fixed class probabilities.

    Used where a gate or an expert is asked to learn from data holding a single
    class (for example an expert whose share of the data has one label).

    Args:
        classes: Class labels, shape ``(n_classes,)``.
        proba: Probability of each class, shape ``(n_classes,)``.
    """

    def __init__(self, classes: np.ndarray, proba: np.ndarray) -> None:
        self.classes_ = np.asarray(classes)
        self.proba_ = np.asarray(proba, dtype=float)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Return ``proba`` for every row of ``X``."""
        return np.tile(self.proba_, (np.shape(X)[0], 1))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Return the most probable class for every row of ``X``."""
        return np.repeat(self.classes_[np.argmax(self.proba_)], np.shape(X)[0])

    def __repr__(self) -> str:
        return f"ConstantProba(classes={self.classes_.tolist()}, proba={self.proba_.tolist()})"


def default_gate() -> Pipeline:
    """Multinomial logistic regression on standardised inputs (the softmax gate).

    Weakly regularised (``C=100``): the EM gate should be able to draw sharp
    boundaries between regimes, the penalty only keeps it finite.
    """
    return make_pipeline(StandardScaler(), LogisticRegression(C=100.0, max_iter=1000))


def proba_columns(clf: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """``predict_proba`` of a classifier trained on labels ``0..n_classes-1``.

    Classes the classifier never saw get probability zero.
    """
    P = np.zeros((X.shape[0], n_classes))
    P[:, np.asarray(clf.classes_, dtype=int)] = clf.predict_proba(X)
    return P


def fit_soft_classifier(template: Any, X: np.ndarray, T: np.ndarray, w: np.ndarray, seed: int) -> Any:
    """Fit a classifier to soft targets by weighting an expanded dataset.

    Args:
        template: Unfitted classifier (cloned, never modified).
        X: Inputs, shape ``(n, d)``.
        T: Soft targets, shape ``(n, C)``; row ``n`` is a distribution over classes.
        w: Sample weights, shape ``(n,)``.
        seed: Seed for the classifier's unset ``random_state``.

    Returns:
        A fitted classifier with ``classes_`` a subset of ``0..C-1``.
    """
    n_classes = T.shape[1]
    W = T * w[:, None]
    total = W.sum()
    if n_classes == 1 or total <= 0:
        proba = np.full(n_classes, 1.0 / n_classes) if total <= 0 else W.sum(0) / total
        return ConstantProba(np.arange(n_classes), proba)
    rows, labels = np.nonzero(W > DROP * W.max())
    weights = W[rows, labels]
    present = np.unique(labels)
    if present.size < 2:
        return ConstantProba(np.arange(n_classes), W.sum(0) / total)
    if supports_sample_weight(template):
        return fit_weighted(template, X[rows], labels, weights, seed, role="gate")
    # The classifier cannot take weights: exact for hard targets, an
    # approximation (argmax labels) for soft ones.
    clf = clone(template)
    seed_estimator(clf, seed)
    if np.allclose(weights, weights[0]):
        return clf.fit(X[rows], labels)
    warnings.warn(
        f"The gate {type(clf).__name__} does not accept sample_weight; it is fitted "
        "to the most responsible expert of each sample (hard targets) instead of "
        "the soft responsibilities.",
        UserWarning,
        stacklevel=3,
    )
    keep = w > 0
    hard = np.argmax(T[keep], axis=1)
    if np.unique(hard).size < 2:
        return ConstantProba(np.arange(n_classes), W.sum(0) / total)
    return clf.fit(X[keep], hard)


def _weighted_logp(P: np.ndarray, W: np.ndarray) -> float:
    return float(np.sum(W * np.log(np.maximum(P, PROBA_FLOOR))))


class Gating:
    """A gate over ``n_groups * n_per_group`` leaf experts.

    With ``n_groups == 1`` it is the single softmax gate of a flat mixture;
    otherwise a top gate over groups times one gate per group (a two-level
    hierarchical mixture). Leaf ``j * n_per_group + k`` is expert ``k`` of group ``j``.

    Every update is a generalised-EM step: a refitted gate component replaces
    the previous one only if it does not lower its part of the expected
    complete-data log-likelihood, which keeps EM monotone even for regularised
    or approximate classifiers.

    Args:
        template: Unfitted classifier used (cloned) for every gate component.
        n_groups: Number of groups under the top gate.
        n_per_group: Number of experts under each group gate.
        seed: Seed for the components' unset ``random_state``.
    """

    def __init__(self, template: Any, n_groups: int, n_per_group: int, seed: int) -> None:
        self.template = template
        self.n_groups = n_groups
        self.n_per_group = n_per_group
        self.seed = seed
        self.top_: Any = None
        self.groups_: list[Any] = [None] * n_groups

    @property
    def n_leaves(self) -> int:
        """Total number of leaf experts."""
        return self.n_groups * self.n_per_group

    def group_proba(self, X: np.ndarray) -> np.ndarray:
        """Top-gate probabilities, shape ``(n, n_groups)``."""
        if self.n_groups == 1:
            return np.ones((X.shape[0], 1))
        return proba_columns(self.top_, X, self.n_groups)

    def within_proba(self, X: np.ndarray) -> np.ndarray:
        """Group-gate probabilities ``g_{k|j}``, shape ``(n, n_groups, n_per_group)``."""
        return np.stack([proba_columns(c, X, self.n_per_group) for c in self.groups_], axis=1)

    def proba(self, X: np.ndarray) -> np.ndarray:
        """Leaf prior ``P(leaf | x)``, shape ``(n, n_leaves)``."""
        P = self.group_proba(X)[:, :, None] * self.within_proba(X)
        return P.reshape(X.shape[0], self.n_leaves)

    def log_prior(self, X: np.ndarray) -> np.ndarray:
        """Log leaf prior (probabilities floored at 1e-12), shape ``(n, n_leaves)``."""
        logp = np.log(np.maximum(self.within_proba(X), PROBA_FLOOR))
        if self.n_groups > 1:
            logp = logp + np.log(np.maximum(self.group_proba(X), PROBA_FLOOR))[:, :, None]
        return logp.reshape(X.shape[0], self.n_leaves)

    def m_step(self, X: np.ndarray, R: np.ndarray, w: np.ndarray) -> None:
        """Refit the gates to leaf responsibilities ``R`` (shape ``(n, n_leaves)``)."""
        n = X.shape[0]
        Rg = R.reshape(n, self.n_groups, self.n_per_group)
        h_group = Rg.sum(axis=2)
        if self.n_groups > 1:
            self.top_ = self._update(self.top_, X, h_group, w, self.n_groups)
        for j in range(self.n_groups):
            hj = h_group[:, j]
            T = np.divide(Rg[:, j, :], hj[:, None], out=np.zeros_like(Rg[:, j, :]), where=hj[:, None] > 0)
            self.groups_[j] = self._update(self.groups_[j], X, T, w * hj, self.n_per_group)

    def _update(self, old: Any, X: np.ndarray, T: np.ndarray, w: np.ndarray, C: int) -> Any:
        new = fit_soft_classifier(self.template, X, T, w, self.seed)
        if old is None:
            return new
        W = T * w[:, None]
        q_new = _weighted_logp(proba_columns(new, X, C), W)
        q_old = _weighted_logp(proba_columns(old, X, C), W)
        return new if q_new >= q_old else old
