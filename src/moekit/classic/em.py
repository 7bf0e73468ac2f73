"""Training procedures: EM, hard EM and "divide, then train", plus initialisation.

* ``em`` -- the expectation-maximisation algorithm for mixtures of experts
  (Jordan & Jacobs 1994). E-step: responsibilities ``h_nk`` proportional to
  gate prior times expert likelihood. M-step: refit each expert with ``h_nk`` as
  sample weights and the gate on ``h_nk`` as soft targets.
* ``hard_em`` -- classification EM: each sample goes wholly to its most
  responsible expert (winner-take-all assignments).
* ``divide`` -- "divide, then train": alternate fitting one local model per
  part and moving every sample to the model that predicts it best, i.e.
  clusterwise regression (Späth 1979), which partitions by the relationship
  between inputs and target rather than by input similarity. The gate is fitted
  to the final partition.

All three start from a partition given by :func:`initial_labels`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from ._experts import ExpertSet
from .gating import Gating


@dataclass
class FitResult:
    """Outcome of one training run (one restart)."""

    experts: ExpertSet
    gating: Gating
    history: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """One-hot encode integer labels into shape ``(n, n_classes)``."""
    R = np.zeros((labels.shape[0], n_classes))
    R[np.arange(labels.shape[0]), labels] = 1.0
    return R


def _standardize(Z: np.ndarray) -> np.ndarray:
    Z = np.asarray(Z, dtype=float)
    std = Z.std(axis=0)
    return (Z - Z.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _kmeans_labels(Z: np.ndarray, k: int, w: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    n = Z.shape[0]
    if n <= k:
        return np.arange(n) % k
    km = KMeans(n_clusters=k, n_init=1, random_state=rng.randint(np.iinfo(np.int32).max))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than k
        km.fit(Z, sample_weight=w if w.sum() > 0 else None)
    return km.labels_


def initial_labels(
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    init: str,
    n_groups: int,
    n_per_group: int,
    classes: np.ndarray | None,
    seed: int,
) -> np.ndarray:
    """Initial hard partition of the samples over the leaf experts.

    Args:
        X: Inputs, shape ``(n, d)``.
        y: Targets, shape ``(n,)``.
        w: Sample weights, shape ``(n,)``.
        init: ``"kmeans_xy"`` (k-means on standardised inputs and target; the
            target is one-hot encoded for classification), ``"kmeans_x"``
            (k-means on standardised inputs) or ``"random"`` (a balanced random
            partition).
        n_groups: Groups of the tree (1 for a flat mixture). With several
            groups, k-means first splits into groups, then each group into experts.
        n_per_group: Experts per group.
        classes: Class labels for classification, ``None`` for regression.
        seed: Random seed.

    Returns:
        Leaf labels in ``0 .. n_groups * n_per_group - 1``, shape ``(n,)``.
    """
    rng = np.random.RandomState(seed)
    n = X.shape[0]
    n_leaves = n_groups * n_per_group
    if init == "random":
        return rng.permutation(np.arange(n) % n_leaves)
    Z = _standardize(X)
    if init == "kmeans_xy":
        if classes is None:
            yz = _standardize(np.asarray(y, dtype=float)[:, None])
        else:
            yz = one_hot(np.searchsorted(classes, y), len(classes))
        Z = np.hstack([Z, yz])
    top = _kmeans_labels(Z, n_groups, w, rng) if n_groups > 1 else np.zeros(n, dtype=int)
    if n_per_group == 1:
        return top
    labels = np.empty(n, dtype=int)
    for j in range(n_groups):
        idx = np.flatnonzero(top == j)
        if idx.size:
            labels[idx] = j * n_per_group + _kmeans_labels(Z[idx], n_per_group, w[idx], rng)
    return labels


def _weighted_mean(values: np.ndarray, w: np.ndarray) -> float:
    return float(np.dot(values, w) / w.sum())


def run_em(
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    experts: ExpertSet,
    gating: Gating,
    labels: np.ndarray,
    max_iter: int,
    tol: float,
    hard: bool = False,
) -> FitResult:
    """Soft (``hard=False``) or classification (``hard=True``) EM from a partition.

    ``history`` holds, after each M-step + E-step, the mean (sample-weighted)
    log-likelihood ``log sum_k g_k(x) p_k(y | x)`` for soft EM, and the mean
    complete-data log-likelihood of the winner-take-all assignment for hard EM.
    Both are non-decreasing (generalised EM). Iteration stops when the change is
    at most ``tol`` (or, for hard EM, when no assignment changes).
    """
    K = gating.n_leaves
    R = one_hot(labels, K)
    res = FitResult(experts, gating)
    pred = None
    for it in range(1, max_iter + 1):
        pred = experts.m_step(X, y, R * w[:, None], pred)
        gating.m_step(X, R, w)
        joint = experts.log_lik(pred, y) + gating.log_prior(X)
        if hard:
            z = np.argmax(joint, axis=1)
            obj = _weighted_mean(joint[np.arange(len(z)), z], w)
            R_new = one_hot(z, K)
            same = np.array_equal(R_new, R)
        else:
            ll = logsumexp(joint, axis=1)
            obj = _weighted_mean(ll, w)
            R_new = np.exp(joint - ll[:, None])
            same = False
        res.history.append(obj)
        res.n_iter = it
        R = R_new
        if same or (it > 1 and abs(res.history[-1] - res.history[-2]) <= tol):
            res.converged = True
            break
    return res


def run_divide(
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    experts: ExpertSet,
    gating: Gating,
    labels: np.ndarray,
    max_iter: int,
) -> FitResult:
    """ "Divide, then train": clusterwise fitting (Späth 1979), then fit the gate.

    Each iteration fits expert ``k`` on the samples of part ``k`` and moves
    every sample to the expert with the smallest loss (squared error for
    regression, log-loss for classification). ``history`` holds minus the mean
    loss of the current partition, which is non-decreasing. Stops when no
    sample moves.
    """
    K = gating.n_leaves
    res = FitResult(experts, gating)
    pred = None
    for it in range(1, max_iter + 1):
        pred = experts.m_step(X, y, one_hot(labels, K) * w[:, None], pred)
        loss = experts.loss(pred, y)
        res.history.append(-_weighted_mean(loss[np.arange(len(labels)), labels], w))
        res.n_iter = it
        new = np.argmin(loss, axis=1)
        # Keep the current owner on ties so that the partition settles.
        ties = loss[np.arange(len(labels)), labels] <= loss[np.arange(len(labels)), new]
        new[ties] = labels[ties]
        if np.array_equal(new, labels):
            res.converged = True
            break
        labels = new
    gating.m_step(X, one_hot(labels, K), w)
    return res


def run_method(
    method: str,
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    experts: ExpertSet,
    gating: Gating,
    labels: np.ndarray,
    max_iter: int,
    tol: float,
) -> FitResult:
    """Dispatch to :func:`run_em` or :func:`run_divide` by ``method`` name."""
    if method == "divide":
        return run_divide(X, y, w, experts, gating, labels, max_iter)
    return run_em(X, y, w, experts, gating, labels, max_iter, tol, hard=(method == "hard_em"))


def responsibilities(joint: np.ndarray) -> np.ndarray:
    """Normalise a ``(n, K)`` matrix of log joint probabilities into posteriors."""
    return np.exp(joint - logsumexp(joint, axis=1, keepdims=True))


__all__ = [
    "FitResult",
    "initial_labels",
    "one_hot",
    "responsibilities",
    "run_divide",
    "run_em",
    "run_method",
]
