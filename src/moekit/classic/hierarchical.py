"""Two-level hierarchical mixtures of experts (Jordan & Jacobs 1994).

A top gate ``g_j(x)`` chooses among ``n_groups`` groups; inside group ``j`` a
gate ``g_{k|j}(x)`` chooses among ``n_experts_per_group`` experts, so leaf
``jk`` has prior ``g_j(x) g_{k|j}(x)``. EM over the tree computes joint leaf
posteriors ``h_jk``; the top gate is fitted to ``h_j = sum_k h_jk``, the gate of
group ``j`` to ``h_{k|j} = h_jk / h_j`` with sample weights ``h_j``, and expert
``jk`` with sample weights ``h_jk``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin, RegressorMixin

from ._base import _BaseMixture, _ClassifierMixture, _RegressorMixture
from ._validation import check_int

_PARAMS_DOC = """
    Args:
        experts: One estimator cloned for every leaf, or a list of
            ``n_groups * n_experts_per_group`` estimators in group-major order
            (leaf ``j * n_experts_per_group + k`` is expert ``k`` of group ``j``).
            Default: {default_expert}.
        n_groups: Number of groups under the top gate.
        n_experts_per_group: Number of experts under each group gate.
        gate: Classifier with ``predict_proba`` cloned for the top gate and for
            every group gate. Default: multinomial logistic regression on
            standardised inputs.
        method: ``"em"``, ``"hard_em"`` or ``"divide"`` (see the flat mixtures).
        pooling: ``"average"``, ``"winner"`` or ``"stacking"`` over the leaves.
        init: ``"kmeans_xy"``, ``"kmeans_x"`` (k-means into groups, then each
            group into experts) or ``"random"``.
        n_init: Number of restarts; the best final objective is kept.
        max_iter: Maximum number of iterations.
        tol: Convergence threshold on the change of the mean log-likelihood.{extra}
        stacker: Combiner for ``pooling="stacking"``.
        stacking_cv: Number of folds for the out-of-fold stacking inputs.
        random_state: Seed or ``RandomState``.

    Attributes:
        experts_: Fitted leaf experts, group-major.
        gate_: Fitted top gate (classes are group indices).
        group_gates_: Fitted gate of each group (classes are expert indices).
        n_experts_: Number of leaf experts.
        loglik_history_: Objective after each iteration (see the flat mixtures).
        n_iter_: Iterations run.
        converged_: Whether the method converged before ``max_iter``.
        n_features_in_: Number of input features."""


class _HierarchicalMixin(_BaseMixture):
    """Structure and inspection specific to the two-level tree."""

    def _structure(self) -> tuple[int, int]:
        check_int(self.n_groups, "n_groups", 1)
        check_int(self.n_experts_per_group, "n_experts_per_group", 1)
        n_leaves = self.n_groups * self.n_experts_per_group
        self._n_from_experts(
            "n_groups * n_experts_per_group",
            n_leaves,
            "pass one estimator per leaf, or a single estimator to clone",
        )
        return int(self.n_groups), int(self.n_experts_per_group)

    def _set_gate_attributes(self) -> None:
        gating = self._gating
        self.gate_ = gating.top_ if gating.n_groups > 1 else gating.groups_[0]
        self.group_gates_ = list(gating.groups_)

    def group_proba(self, X: Any) -> np.ndarray:
        """Top-gate probability of each group, shape ``(n_samples, n_groups)``."""
        X = self._validate_X(X)
        return self._gating.group_proba(X)

    def predict_group(self, X: Any) -> np.ndarray:
        """Index of the group that owns each input."""
        return np.argmax(self.group_proba(X), axis=1)


class HierarchicalMixtureOfExpertsRegressor(_HierarchicalMixin, RegressorMixin, _RegressorMixture):
    __doc__ = (
        """Two-level hierarchical mixture of Gaussian regression experts (Jordan & Jacobs 1994).
"""
        + _PARAMS_DOC.format(
            default_expert="``LinearRegression()``",
            extra="""
        variance_floor: Lower bound of each expert's noise variance, as a
            fraction of the variance of ``y``.""",
        )
        + """
        expert_std_: Noise standard deviation of each leaf expert.
"""
    )

    def __init__(
        self,
        experts: Any = None,
        n_groups: int = 2,
        n_experts_per_group: int = 2,
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
        self.n_groups = n_groups
        self.n_experts_per_group = n_experts_per_group
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


class HierarchicalMixtureOfExpertsClassifier(_HierarchicalMixin, ClassifierMixin, _ClassifierMixture):
    __doc__ = (
        """Two-level hierarchical mixture of classification experts (Jordan & Jacobs 1994).
"""
        + _PARAMS_DOC.format(default_expert="``StandardScaler`` + ``LogisticRegression``", extra="")
        + """
        classes_: Class labels.
"""
    )

    def __init__(
        self,
        experts: Any = None,
        n_groups: int = 2,
        n_experts_per_group: int = 2,
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
        self.n_groups = n_groups
        self.n_experts_per_group = n_experts_per_group
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
