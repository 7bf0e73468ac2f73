"""Classic mixtures of experts for any scikit-learn estimator.

Implements the mixture of experts of Jacobs, Jordan, Nowlan & Hinton (1991)
and its EM training and two-level hierarchy (Jordan & Jacobs 1994), with
"divide, then train" clusterwise fitting (Späth 1979) and stacked pooling
(Wolpert 1992). Pure numpy + scikit-learn; requires the ``classic`` extra.
"""

from .hierarchical import (
    HierarchicalMixtureOfExpertsClassifier,
    HierarchicalMixtureOfExpertsRegressor,
)
from .mixture import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from .plot import plot_experts

__all__ = [
    "HierarchicalMixtureOfExpertsClassifier",
    "HierarchicalMixtureOfExpertsRegressor",
    "MixtureOfExpertsClassifier",
    "MixtureOfExpertsRegressor",
    "plot_experts",
]
