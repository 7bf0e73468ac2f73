"""Flat mixtures of experts for any scikit-learn estimator.

A mixture of experts (Jacobs, Jordan, Nowlan & Hinton 1991, "Adaptive
mixtures of local experts") splits the input space softly between several
experts with a gate ``g_k(x)`` and models ``p(y | x) = sum_k g_k(x) p_k(y | x)``.
It is trained here by the EM algorithm of Jordan & Jacobs (1994), by its
winner-take-all variant, or by "divide, then train" (clusterwise regression,
Späth 1979).
"""

from __future__ import annotations

from typing import Any

from sklearn.base import ClassifierMixin, RegressorMixin

from ._base import _BaseMixture, _ClassifierMixture, _RegressorMixture
from ._validation import check_int

_PARAMS_DOC = """
    Args:
        experts: The expert model: one estimator cloned ``n_experts`` times, or
            a list of (possibly different) estimators, one per expert. They must
            accept ``sample_weight`` in ``fit`` for ``method="em"``. Default:
            {default_expert}.
        n_experts: Number of experts; ``None`` means 2 for a single estimator
            and ``len(experts)`` for a list.
        gate: Classifier with ``predict_proba`` whose classes are the experts.
            Default: multinomial logistic regression (``C=100``) on standardised
            inputs. Soft targets are fitted through sample weights; a gate
            without ``sample_weight`` is fitted to the most responsible expert.
        method: ``"em"`` (soft EM, Jordan & Jacobs 1994), ``"hard_em"``
            (winner-take-all assignments) or ``"divide"`` (clusterwise fitting,
            Späth 1979, then a gate fitted to the partition).
        pooling: ``"average"`` (gate-weighted average), ``"winner"``
            (winner-take-all) or ``"stacking"`` (a combiner fitted on
            out-of-fold expert outputs times gate probabilities, Wolpert 1992).
        init: Initial partition: ``"kmeans_xy"`` (k-means on inputs and target),
            ``"kmeans_x"`` (k-means on inputs) or ``"random"``.
        n_init: Number of restarts; the run with the best final objective is kept.
        max_iter: Maximum number of iterations of the training method.
        tol: Convergence threshold on the change of the mean log-likelihood.{extra}
        stacker: Combiner for ``pooling="stacking"``. Default: {default_stacker}.
        stacking_cv: Number of folds for the out-of-fold stacking inputs.
        random_state: Seed or ``RandomState`` for initialisation, restarts and
            the unset ``random_state`` of experts and gate.

    Attributes:
        experts_: Fitted expert estimators.
        gate_: Fitted gate classifier (classes are expert indices).
        n_experts_: Number of experts.
        loglik_history_: Objective after each iteration: mean log-likelihood
            (``"em"``), mean complete-data log-likelihood of the hard assignment
            (``"hard_em"``), minus the mean loss of the partition (``"divide"``).
        n_iter_: Iterations run.
        converged_: Whether the method converged before ``max_iter``.
        stacker_: Fitted combiner (only with ``pooling="stacking"``).
        n_features_in_: Number of input features."""

_VARIANCE_DOC = """
        variance_floor: Lower bound of each expert's noise variance, as a
            fraction of the variance of ``y``."""


class MixtureOfExpertsRegressor(RegressorMixin, _RegressorMixture):
    __doc__ = (
        """Mixture of regression experts with Gaussian noise (Jacobs et al. 1991).

    Each expert ``k`` predicts a mean ``mu_k(x)`` and has its own noise variance
    ``sigma_k^2``; the gate mixes them: ``p(y | x) = sum_k g_k(x) N(y; mu_k(x), sigma_k^2)``.
    ``predict(X, return_std=True)`` returns the mean and standard deviation of
    that mixture.
"""
        + _PARAMS_DOC.format(
            default_expert="``LinearRegression()``",
            default_stacker="``RidgeCV``",
            extra=_VARIANCE_DOC,
        )
        + """
        expert_std_: Noise standard deviation of each expert.

    Example:
        >>> import numpy as np
        >>> from moekit.classic import MixtureOfExpertsRegressor
        >>> rng = np.random.RandomState(0)
        >>> X = rng.uniform(-3, 3, size=(300, 1))
        >>> y = np.where(X[:, 0] < 0, 2 * X[:, 0] + 1, -3 * X[:, 0] + 0.5)
        >>> moe = MixtureOfExpertsRegressor(n_experts=2, random_state=0).fit(X, y)
        >>> mean, std = moe.predict(X[:3], return_std=True)
"""
    )

    def __init__(
        self,
        experts: Any = None,
        n_experts: int | None = None,
        gate: Any = None,
        method: str = "em",
        pooling: str = "average",
        init: str = "kmeans_xy",
        n_init: int = 1,
        max_iter: int = 100,
        tol: float = 1e-4,
        variance_floor: float = 1e-4,
        stacker: Any = None,
        stacking_cv: int = 5,
        random_state: Any = None,
    ) -> None:
        self.experts = experts
        self.n_experts = n_experts
        self.gate = gate
        self.method = method
        self.pooling = pooling
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.variance_floor = variance_floor
        self.stacker = stacker
        self.stacking_cv = stacking_cv
        self.random_state = random_state

    def _structure(self) -> tuple[int, int]:
        return 1, _flat_size(self)


class MixtureOfExpertsClassifier(ClassifierMixin, _ClassifierMixture):
    __doc__ = (
        """Mixture of classification experts (Jacobs et al. 1991; Jordan & Jacobs 1994).

    ``P(y | x) = sum_k g_k(x) P_k(y | x)`` where ``P_k`` is expert ``k``'s
    ``predict_proba``; the EM likelihood of a label is the probability the
    expert gives it.
"""
        + _PARAMS_DOC.format(
            default_expert="``StandardScaler`` + ``LogisticRegression``",
            default_stacker="``LogisticRegression``",
            extra="",
        )
        + """
        classes_: Class labels.
"""
    )

    def __init__(
        self,
        experts: Any = None,
        n_experts: int | None = None,
        gate: Any = None,
        method: str = "em",
        pooling: str = "average",
        init: str = "kmeans_xy",
        n_init: int = 1,
        max_iter: int = 100,
        tol: float = 1e-4,
        stacker: Any = None,
        stacking_cv: int = 5,
        random_state: Any = None,
    ) -> None:
        self.experts = experts
        self.n_experts = n_experts
        self.gate = gate
        self.method = method
        self.pooling = pooling
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.stacker = stacker
        self.stacking_cv = stacking_cv
        self.random_state = random_state

    def _structure(self) -> tuple[int, int]:
        return 1, _flat_size(self)


def _flat_size(model: _BaseMixture) -> int:
    check_int(model.n_experts, "n_experts", 1, allow_none=True)
    n = model.n_experts
    from_list = model._n_from_experts("n_experts", n, f"leave n_experts=None or give {n} estimators")
    if from_list is not None:
        return from_list
    return 2 if model.n_experts is None else int(model.n_experts)
