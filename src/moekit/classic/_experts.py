"""Experts and their likelihood models.

Regression experts are Gaussian: expert ``k`` predicts a mean ``mu_k(x)`` and
has its own noise variance ``sigma_k^2`` (Jordan & Jacobs 1994). Classification
experts are categorical: ``P_k(y | x)`` is the expert's ``predict_proba``.

Each M-step refits every expert with the responsibilities as sample weights.
Samples whose weight is negligible (below 1e-8 of the expert's largest weight)
are left out of the fit. A refitted expert replaces the previous one only if it
does not lower the expert's part of the expected complete-data log-likelihood
(a generalised-EM step), so EM stays monotone for any base estimator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import fit_weighted
from .gating import DROP, PROBA_FLOOR, ConstantProba

_LOG_2PI = float(np.log(2.0 * np.pi))


class ExpertSet:
    """Base class: a list of fitted experts built from templates.

    Args:
        templates: One unfitted estimator per expert (cloned, never modified).
        seed: Seed for the experts' unset ``random_state``.
    """

    task = "regression"

    def __init__(self, templates: list[Any], seed: int) -> None:
        self.templates = templates
        self.seed = seed
        self.estimators_: list[Any] = [None] * len(templates)

    @property
    def n_experts(self) -> int:
        """Number of experts."""
        return len(self.templates)

    def m_step(self, X: np.ndarray, y: np.ndarray, W: np.ndarray, old_pred: np.ndarray | None = None) -> np.ndarray:
        """Refit each expert on weights ``W[:, k]``; return the predictions on ``X``."""
        preds = []
        for k in range(self.n_experts):
            w = W[:, k]
            old = None if old_pred is None else old_pred[:, k]
            mask = w > DROP * w.max() if w.max() > 0 else np.zeros(len(w), dtype=bool)
            if not mask.any():
                if self.estimators_[k] is not None:  # keep an expert that lost all its data
                    preds.append(old if old is not None else self._predict_one(k, X))
                    continue
                mask = np.ones(len(w), dtype=bool)
                w = np.ones(len(w))
            cand = self._fit_one(k, X[mask], y[mask], w[mask])
            pred = self._predict_with(cand, X)
            if self.estimators_[k] is None or old is None:
                self._accept(k, cand, pred, y, w)
            else:
                pred = self._choose(k, cand, pred, old, y, w)
            preds.append(pred)
        return np.stack(preds, axis=1)

    def predict_all(self, X: np.ndarray) -> np.ndarray:
        """Predictions of every expert, stacked on axis 1."""
        return np.stack([self._predict_one(k, X) for k in range(self.n_experts)], axis=1)

    def _predict_one(self, k: int, X: np.ndarray) -> np.ndarray:
        return self._predict_with(self.estimators_[k], X)

    # Task-specific parts -------------------------------------------------------------
    def _fit_one(self, k: int, X: np.ndarray, y: np.ndarray, w: np.ndarray) -> Any:
        raise NotImplementedError

    def _predict_with(self, est: Any, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _accept(self, k: int, est: Any, pred: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        raise NotImplementedError

    def _choose(self, k: int, cand: Any, pred: np.ndarray, old: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def log_lik(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-sample log-likelihood under each expert, shape ``(n, K)``."""
        raise NotImplementedError

    def loss(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-sample loss of each expert (used by the "divide" method), shape ``(n, K)``."""
        raise NotImplementedError


class GaussianExperts(ExpertSet):
    """Regression experts with a Gaussian likelihood and a per-expert variance.

    Args:
        templates: One unfitted regressor per expert.
        seed: Seed for unset ``random_state`` parameters.
        var_floor: Smallest allowed noise variance (absolute).
    """

    task = "regression"

    def __init__(self, templates: list[Any], seed: int, var_floor: float) -> None:
        super().__init__(templates, seed)
        self.var_floor = var_floor
        self.var_ = np.ones(len(templates))

    def _fit_one(self, k: int, X: np.ndarray, y: np.ndarray, w: np.ndarray) -> Any:
        return fit_weighted(self.templates[k], X, y, w, self.seed, task="regression")

    def _predict_with(self, est: Any, X: np.ndarray) -> np.ndarray:
        return np.asarray(est.predict(X), dtype=float).reshape(-1)

    def _var_and_q(self, pred: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
        r2 = (y - pred) ** 2
        tw = w.sum()
        var = max(float(np.dot(w, r2) / tw) if tw > 0 else self.var_floor, self.var_floor)
        q = float(-0.5 * np.dot(w, _LOG_2PI + np.log(var) + r2 / var))
        return var, q

    def _accept(self, k: int, est: Any, pred: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        self.estimators_[k] = est
        self.var_[k] = self._var_and_q(pred, y, w)[0]

    def _choose(self, k: int, cand: Any, pred: np.ndarray, old: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        var_new, q_new = self._var_and_q(pred, y, w)
        var_old, q_old = self._var_and_q(old, y, w)
        if q_new >= q_old:
            self.estimators_[k], self.var_[k] = cand, var_new
            return pred
        self.var_[k] = var_old  # keep the mean function, update its variance
        return old

    def log_lik(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Gaussian log-density of ``y`` under each expert."""
        r2 = (y[:, None] - pred) ** 2
        return -0.5 * (_LOG_2PI + np.log(self.var_)[None, :] + r2 / self.var_[None, :])

    def loss(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Squared error (Späth 1979 clusterwise regression)."""
        return (y[:, None] - pred) ** 2


class CategoricalExperts(ExpertSet):
    """Classification experts; the likelihood of a label is the expert's probability.

    Args:
        templates: One unfitted classifier with ``predict_proba`` per expert.
        seed: Seed for unset ``random_state`` parameters.
        classes: Sorted class labels of the whole problem.
    """

    task = "classification"

    def __init__(self, templates: list[Any], seed: int, classes: np.ndarray) -> None:
        super().__init__(templates, seed)
        self.classes = classes

    def _fit_one(self, k: int, X: np.ndarray, y: np.ndarray, w: np.ndarray) -> Any:
        labels = np.unique(y)
        if labels.size < 2:
            # Many classifiers (e.g. LogisticRegression) refuse a single class; the
            # expert then predicts that class with certainty.
            try:
                return fit_weighted(self.templates[k], X, y, w, self.seed, task="classification")
            except ValueError:
                return ConstantProba(labels, np.ones(1))
        return fit_weighted(self.templates[k], X, y, w, self.seed, task="classification")

    def _predict_with(self, est: Any, X: np.ndarray) -> np.ndarray:
        P = np.zeros((X.shape[0], len(self.classes)))
        cols = np.searchsorted(self.classes, est.classes_)
        P[:, cols] = est.predict_proba(X)
        return P

    def _q(self, pred: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
        idx = np.searchsorted(self.classes, y)
        return float(np.dot(w, np.log(np.maximum(pred[np.arange(len(y)), idx], PROBA_FLOOR))))

    def _accept(self, k: int, est: Any, pred: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        self.estimators_[k] = est

    def _choose(self, k: int, cand: Any, pred: np.ndarray, old: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        if self._q(pred, y, w) >= self._q(old, y, w):
            self.estimators_[k] = cand
            return pred
        return old

    def log_lik(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Log-probability each expert gives the observed label."""
        idx = np.searchsorted(self.classes, y)
        return np.log(np.maximum(pred[np.arange(len(y)), :, idx], PROBA_FLOOR))

    def loss(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Log-loss of each expert on each sample."""
        return -self.log_lik(pred, y)
