"""Synthetic problems shared by the classic mixture-of-experts tests."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

matplotlib.use("Agg")


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_worker():
    """Small fits run fastest single-threaded; BLAS/OpenMP threads only oversubscribe
    the cores that pytest-xdist workers already share."""
    with threadpool_limits(limits=1):
        yield


def two_regimes(n: int, seed: int, noise: float = 0.2):
    """y = 2x + 1 for x < 0 and y = -3x + 0.5 for x >= 0, plus Gaussian noise."""
    rng = np.random.RandomState(seed)
    X = rng.uniform(-3, 3, size=(n, 1))
    y = np.where(X[:, 0] < 0, 2 * X[:, 0] + 1, -3 * X[:, 0] + 0.5) + noise * rng.randn(n)
    return X, y, (X[:, 0] >= 0).astype(int)


def interleaved_laws(n: int, seed: int, noise: float = 0.1):
    """Two linear laws in x0, selected by the sign of a second feature x1."""
    rng = np.random.RandomState(seed)
    X = rng.uniform(-2, 2, size=(n, 2))
    law = (X[:, 1] >= 0).astype(int)
    y = np.where(law == 1, 1.5 * X[:, 0] - 1.0, -2.0 * X[:, 0] + 1.0) + noise * rng.randn(n)
    return X, y, law


def four_regimes(n: int, seed: int, noise: float = 0.2):
    """A continuous piecewise-linear function with four pieces on [-4, 4]."""
    rng = np.random.RandomState(seed)
    x = rng.uniform(-4, 4, size=n)
    y = np.select([x < -2, x < 0, x < 2], [3 * x + 8, -2 * x - 2, 2 * x - 2], -3 * x + 10)
    return x[:, None], y + noise * rng.randn(n)


@pytest.fixture(scope="session")
def regimes():
    """Train and test sets of the two-regime problem."""
    return two_regimes(300, 0), two_regimes(300, 100)


@pytest.fixture(scope="session")
def laws():
    """Train and test sets of the interleaved-laws problem."""
    return interleaved_laws(400, 1), interleaved_laws(400, 101)


@pytest.fixture(scope="session")
def four():
    """Train and test sets of the four-regime problem."""
    return four_regimes(600, 2), four_regimes(600, 102)
