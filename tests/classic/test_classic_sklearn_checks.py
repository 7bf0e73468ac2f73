"""scikit-learn's own estimator checks for the classic mixtures."""

from __future__ import annotations

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from moekit.classic import (
    HierarchicalMixtureOfExpertsClassifier,
    HierarchicalMixtureOfExpertsRegressor,
    MixtureOfExpertsClassifier,
    MixtureOfExpertsRegressor,
)

# The checks fit with a tiny max_iter on purpose; not converging there is expected.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

# Small max_iter keeps the ~60 checks per estimator fast; they test the API, not accuracy.
ESTIMATORS = [
    MixtureOfExpertsRegressor(max_iter=3, random_state=0),
    MixtureOfExpertsClassifier(max_iter=3, random_state=0),
    HierarchicalMixtureOfExpertsRegressor(max_iter=2, random_state=0),
    HierarchicalMixtureOfExpertsClassifier(max_iter=2, random_state=0),
    # The other training methods and a learned combiner.
    MixtureOfExpertsRegressor(method="divide", pooling="stacking", max_iter=3, random_state=0),
    MixtureOfExpertsClassifier(method="hard_em", pooling="stacking", max_iter=3, random_state=0),
]

_SW_REASON = (
    "The initial partition (k-means or random) draws samples at random, so a row "
    "repeated twice and the same row with weight 2 lead to different random streams "
    "and different local optima. Given the same initial partition, weights and "
    "repetitions give the same fit: see test_weights_equal_repetitions."
)


def _expected_failures(estimator):
    return {"check_sample_weight_equivalence_on_dense_data": _SW_REASON}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failures)
def test_sklearn_compatible(estimator, check):
    check(estimator)
