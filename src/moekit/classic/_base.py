"""Shared machinery of the flat and hierarchical classic mixtures of experts."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.special import logsumexp
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, column_or_1d

from ._experts import CategoricalExperts, ExpertSet, GaussianExperts
from ._validation import (
    INITS,
    METHODS,
    POOLINGS,
    check_choice,
    check_float,
    check_int,
    is_estimator_like,
    no_sample_weight_message,
    supports_sample_weight,
    validate_data,
)
from .em import initial_labels, one_hot, responsibilities, run_method
from .gating import Gating, default_gate, proba_columns
from .pooling import (
    default_stacker,
    fit_stacker,
    mixture_variance,
    pool_average,
    pool_winner,
    stacking_features,
)


def default_expert(task: str) -> Any:
    """``LinearRegression()`` for regression, scaled ``LogisticRegression`` for classification."""
    if task == "regression":
        return LinearRegression()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


class _BaseMixture(BaseEstimator):
    """Fitting, inspection and pooling shared by all classic mixtures.

    Subclasses define ``__init__`` (the public parameters), ``_task`` and
    ``_structure()`` returning ``(n_groups, n_per_group)``.
    """

    _task = "regression"

    # ----------------------------------------------------------------------------- hooks
    def _structure(self) -> tuple[int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _n_from_experts(self, name: str, value: Any, hint: str) -> int | None:
        """Number of experts implied by a list ``experts`` (None for one estimator)."""
        experts = self.experts
        if isinstance(experts, (list, tuple)):
            if len(experts) == 0:
                raise ValueError("experts must be an estimator or a non-empty list of estimators, got an empty list.")
            if value is not None and value != len(experts):
                raise ValueError(
                    f"{name}={value} does not match the {len(experts)} estimators passed in experts; {hint}."
                )
            return len(experts)
        return None

    # ------------------------------------------------------------------------ validation
    def _validated_setup(self) -> tuple[int, int, list[Any], Any, Any]:
        """Check every parameter; return structure, expert templates, gate and stacker."""
        check_choice(self.method, "method", METHODS)
        check_choice(self.pooling, "pooling", POOLINGS)
        check_choice(self.init, "init", INITS)
        check_int(self.n_init, "n_init", 1)
        check_int(self.max_iter, "max_iter", 1)
        check_float(self.tol, "tol")
        check_int(self.stacking_cv, "stacking_cv", 2)
        if self._task == "regression":
            check_float(self.variance_floor, "variance_floor", strictly_positive=True)
        n_groups, n_per_group = self._structure()
        n_leaves = n_groups * n_per_group
        templates = self._expert_templates(n_leaves)
        gate = default_gate() if self.gate is None else self.gate
        if not is_estimator_like(gate) or not hasattr(gate, "predict_proba"):
            raise ValueError(f"gate must be a classifier with predict_proba (e.g. LogisticRegression), got {gate!r}.")
        stacker = default_stacker(self._task) if self.stacker is None else self.stacker
        need = "predict" if self._task == "regression" else "predict_proba"
        if not is_estimator_like(stacker) or not hasattr(stacker, need):
            raise ValueError(f"stacker must be an estimator with {need}, got {stacker!r}.")
        return n_groups, n_per_group, templates, gate, stacker

    def _expert_templates(self, n_leaves: int) -> list[Any]:
        experts = self.experts
        if experts is None:
            templates = [default_expert(self._task)] * n_leaves
        elif isinstance(experts, (list, tuple)):
            templates = list(experts)
        else:
            templates = [experts] * n_leaves
        need = "predict" if self._task == "regression" else "predict_proba"
        for est in templates:
            if not is_estimator_like(est):
                raise ValueError(f"experts must be a scikit-learn estimator or a list of them, got {est!r}.")
            if not hasattr(est, need):
                hint = " (for SVC pass probability=True)" if self._task != "regression" else ""
                raise ValueError(
                    f"The expert {type(est).__name__} has no {need}, which {self._task} experts need{hint}."
                )
            if self.method == "em" and not supports_sample_weight(est):
                raise ValueError(no_sample_weight_message(est, "expert", self._task))
        return templates

    def _validate_X(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "experts_")
        return validate_data(self, X, reset=False, dtype=np.float64)

    def _validate_y(self, y: Any, n: int) -> np.ndarray:
        y = column_or_1d(y, warn=True)
        if y.shape[0] != n:
            raise ValueError(f"X and y have inconsistent numbers of samples: {n} != {y.shape[0]}.")
        if self._task == "regression":
            y = np.asarray(y, dtype=np.float64)
            if not np.all(np.isfinite(y)):
                raise ValueError("Input y contains NaN or infinity.")
        else:
            unknown = np.setdiff1d(y, self.classes_)
            if unknown.size:
                raise ValueError(f"y contains labels not seen during fit: {unknown.tolist()}.")
        return y

    # ----------------------------------------------------------------------------- fit
    def _new_experts(self, templates: list[Any], seed: int) -> ExpertSet:
        if self._task == "regression":
            return GaussianExperts(templates, seed, self._var_floor)
        return CategoricalExperts(templates, seed, self.classes_)

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> _BaseMixture:
        """Fit the mixture.

        Args:
            X: Inputs, shape ``(n_samples, n_features)``.
            y: Targets, shape ``(n_samples,)``.
            sample_weight: Optional non-negative weight per sample.

        Returns:
            The fitted estimator.
        """
        n_groups, n_per_group, templates, gate, stacker = self._validated_setup()
        X, y, w = self._validated_fit_data(X, y, sample_weight, n_groups * n_per_group)
        rng = check_random_state(self.random_state)
        best = self._best_run(X, y, w, templates, gate, n_groups, n_per_group, rng)
        self._store_run(best, n_groups * n_per_group)
        if self.pooling == "stacking":
            self._fit_stacker(X, y, w, templates, gate, stacker, n_groups, n_per_group, rng)
        return self

    def _validated_fit_data(
        self, X: Any, y: Any, sample_weight: Any, n_leaves: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X, y, w)`` checked for fitting ``n_leaves`` experts; sets ``classes_`` (classification)
        and the variance floor (regression: ``variance_floor`` times the weighted variance of y)."""
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=self._task == "regression")
        if self._task == "classification":
            check_classification_targets(y)
            self.classes_ = np.unique(y)
        w = _check_sample_weight(sample_weight, X, dtype=np.float64)
        if np.any(w < 0):
            raise ValueError("sample_weight must be non-negative.")
        n_pos = int(np.count_nonzero(w))
        if n_pos < n_leaves:
            raise ValueError(
                f"n_samples={n_pos} (with positive weight) is too few for {n_leaves} "
                f"experts; at least one sample per expert is needed."
            )
        if self._task == "regression":
            var_y = float(np.average((y - np.average(y, weights=w)) ** 2, weights=w))
            self._var_floor = self.variance_floor * (var_y if var_y > 0 else 1.0)
        return X, y, w

    def _best_run(
        self,
        X: np.ndarray,
        y: np.ndarray,
        w: np.ndarray,
        templates: list[Any],
        gate: Any,
        n_groups: int,
        n_per_group: int,
        rng: np.random.RandomState,
    ) -> Any:
        """The EM / hard-assignment / gradient run (:func:`run_method`) with the highest final
        log-likelihood over ``n_init`` initialisations, each seeded from ``rng``."""
        classes = self.classes_ if self._task == "classification" else None
        best = None
        for _ in range(self.n_init):
            seed = int(rng.randint(np.iinfo(np.int32).max))
            labels = initial_labels(X, y, w, self.init, n_groups, n_per_group, classes, seed)
            res = run_method(
                self.method,
                X,
                y,
                w,
                self._new_experts(templates, seed),
                Gating(gate, n_groups, n_per_group, seed),
                labels,
                self.max_iter,
                self.tol,
            )
            if best is None or res.history[-1] > best.history[-1]:
                best = res
        assert best is not None
        return best

    def _store_run(self, best: Any, n_leaves: int) -> None:
        """Keep the chosen run's experts and gating and set the fitted attributes; a
        ``ConvergenceWarning`` (pointing at the caller of ``fit``) when it did not converge."""
        if not best.converged:
            warnings.warn(
                f"{type(self).__name__} did not converge in max_iter={self.max_iter} "
                f"iterations (method={self.method!r}); increase max_iter or tol.",
                ConvergenceWarning,
                stacklevel=3,
            )
        self._expert_set = best.experts
        self._gating = best.gating
        self._pooling = self.pooling
        self.experts_ = list(best.experts.estimators_)
        self.n_experts_ = n_leaves
        self.loglik_history_ = np.asarray(best.history)
        self.n_iter_ = best.n_iter
        self.converged_ = best.converged
        self._set_gate_attributes()
        if self._task == "regression":
            self.expert_std_ = np.sqrt(best.experts.var_)

    def _fit_stacker(
        self,
        X: np.ndarray,
        y: np.ndarray,
        w: np.ndarray,
        templates: list[Any],
        gate: Any,
        stacker: Any,
        n_groups: int,
        n_per_group: int,
        rng: np.random.RandomState,
    ) -> None:
        """``pooling="stacking"``: fit ``stacker_`` on cross-validated expert outputs, with the
        fitted mixture's responsibilities (one-hot for the hard methods, whose experts train on
        disjoint subsets)."""
        n_leaves = n_groups * n_per_group
        R = responsibilities(self._joint(X, y))
        if self.method != "em":
            R = one_hot(np.argmax(R, axis=1), n_leaves)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        self.stacker_ = fit_stacker(
            stacker,
            self._task,
            X,
            y,
            w,
            R,
            lambda: self._new_experts(templates, seed),
            lambda: Gating(gate, n_groups, n_per_group, seed),
            self.stacking_cv,
            seed,
        )

    def _set_gate_attributes(self) -> None:
        self.gate_ = self._gating.groups_[0]

    # ------------------------------------------------------------------------ inspection
    def _joint(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        pred = self._expert_set.predict_all(X)
        return self._expert_set.log_lik(pred, y) + self._gating.log_prior(X)

    def gate_proba(self, X: Any) -> np.ndarray:
        """Gate probability of each expert at each input, shape ``(n_samples, n_experts)``.

        For a hierarchical mixture these are the leaf probabilities
        ``g_j(x) g_{k|j}(x)``, leaf ``j * n_experts_per_group + k``.
        """
        X = self._validate_X(X)
        return self._gating.proba(X)

    def predict_expert(self, X: Any) -> np.ndarray:
        """Index of the expert that owns each input (largest gate probability)."""
        return np.argmax(self.gate_proba(X), axis=1)

    def responsibilities(self, X: Any, y: Any) -> np.ndarray:
        """Posterior probability of each expert given input *and* target.

        ``h_k(x, y) = g_k(x) p_k(y | x) / sum_j g_j(x) p_j(y | x)``, shape
        ``(n_samples, n_experts)`` (the E-step of Jordan & Jacobs 1994).
        """
        X = self._validate_X(X)
        y = self._validate_y(y, X.shape[0])
        return responsibilities(self._joint(X, y))

    def log_likelihood(self, X: Any, y: Any) -> float:
        """Mean log-likelihood ``log sum_k g_k(x) p_k(y | x)`` of the data under the mixture."""
        X = self._validate_X(X)
        y = self._validate_y(y, X.shape[0])
        return float(np.mean(logsumexp(self._joint(X, y), axis=1)))


class _RegressorMixture(_BaseMixture):
    """Prediction for Gaussian mixtures of regression experts."""

    _task = "regression"

    def predict(self, X: Any, return_std: bool = False) -> Any:
        """Predict with the pooled experts.

        Args:
            X: Inputs, shape ``(n_samples, n_features)``.
            return_std: Also return the predictive standard deviation. For
                ``pooling="average"`` this is the standard deviation of the
                Gaussian mixture, ``sqrt(sum_k g_k (sigma_k^2 + mu_k^2) - mu^2)``;
                for ``"winner"`` the winning expert's noise level; for
                ``"stacking"`` the mixture's spread around the stacked mean.

        Returns:
            The predicted mean, shape ``(n_samples,)``, and with ``return_std`` a
            tuple ``(mean, std)``.
        """
        X = self._validate_X(X)
        g = self._gating.proba(X)
        mu = self._expert_set.predict_all(X)
        var = self._expert_set.var_
        if self._pooling == "winner":
            win = np.argmax(g, axis=1)
            mean = mu[np.arange(len(win)), win]
            std = np.sqrt(var[win])
        else:
            if self._pooling == "stacking":
                mean = np.asarray(self.stacker_.predict(stacking_features(g, mu)), dtype=float)
                mean = mean.reshape(-1)
            else:
                mean = pool_average(g, mu)
            std = np.sqrt(np.maximum(mixture_variance(g, mu, var, mean), 0.0))
        return (mean, std) if return_std else mean


class _ClassifierMixture(_BaseMixture):
    """Prediction for mixtures of classification experts."""

    _task = "classification"

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities of the pooled experts, shape ``(n_samples, n_classes)``."""
        X = self._validate_X(X)
        g = self._gating.proba(X)
        P = self._expert_set.predict_all(X)
        if self._pooling == "winner":
            out = pool_winner(g, P)
        elif self._pooling == "stacking":
            out = proba_columns(self.stacker_, stacking_features(g, P), len(self.classes_))
        else:
            out = pool_average(g, P)
        total = out.sum(axis=1, keepdims=True)
        return np.divide(out, total, out=np.full_like(out, 1.0 / out.shape[1]), where=total > 0)

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class under the pooled prediction."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]
