"""Parameter checks and small fitting helpers shared by the classic mixtures."""

from __future__ import annotations

import numbers
import warnings
from typing import Any, cast

import numpy as np
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import has_fit_parameter

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _sk_validate_data
except ImportError:  # pragma: no cover - older scikit-learn

    def _sk_validate_data(estimator: Any, *args: Any, **kwargs: Any) -> Any:
        return estimator._validate_data(*args, **kwargs)


METHODS = ("em", "hard_em", "divide")
POOLINGS = ("average", "winner", "stacking")
INITS = ("kmeans_xy", "kmeans_x", "random")

_SUGGESTIONS = {
    "regression": "LinearRegression, Ridge, DecisionTreeRegressor, SVR, HistGradientBoostingRegressor",
    "classification": "LogisticRegression, DecisionTreeClassifier, GaussianNB, "
    "SVC(probability=True), HistGradientBoostingClassifier",
}


def validate_data(estimator: Any, *args: Any, **kwargs: Any) -> Any:
    """Call scikit-learn's ``validate_data`` (or the pre-1.6 method)."""
    return _sk_validate_data(estimator, *args, **kwargs)


def check_int(value: Any, name: str, minimum: int, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= ``minimum`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= {minimum}{extra}, got {value!r}.")


def check_float(value: Any, name: str, strictly_positive: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite non-negative (or positive) float."""
    real = cast(float, value)  # typeshed's numbers.Real has no comparison with int: checked as a float
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and np.isfinite(real)
        and (real > 0 if strictly_positive else real >= 0)
    )
    if not ok:
        bound = "> 0" if strictly_positive else ">= 0"
        raise ValueError(f"{name} must be a finite float {bound}, got {value!r}.")


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


def final_step(estimator: Any) -> Any:
    """The estimator that receives ``sample_weight`` (last step of a Pipeline)."""
    while isinstance(estimator, Pipeline):
        estimator = estimator.steps[-1][1]
    return estimator


def supports_sample_weight(estimator: Any) -> bool:
    """Whether ``estimator.fit`` (or a Pipeline's last step) accepts ``sample_weight``."""
    last = final_step(estimator)
    return last is not None and last != "passthrough" and has_fit_parameter(last, "sample_weight")


def no_sample_weight_message(estimator: Any, role: str, task: str) -> str:
    """The error text for an expert that cannot be trained on responsibilities."""
    name = type(final_step(estimator)).__name__
    return (
        f"The {role} {name} does not accept `sample_weight` in fit, which the "
        f"mixture needs to train it on soft responsibilities (method='em'). Use an "
        f"estimator that does, e.g. {_SUGGESTIONS[task]}, or use method='hard_em' "
        f"or method='divide', which train each expert on its own subset of samples."
    )


def fit_weighted(
    template: Any,
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    seed: int,
    *,
    role: str = "expert",
    task: str = "regression",
) -> Any:
    """Clone ``template``, seed it, and fit it with sample weights ``w``.

    A Pipeline passes the weights to every step that accepts them (so a
    ``StandardScaler`` uses weighted statistics). Estimators without
    ``sample_weight`` are fitted unweighted when all weights are equal.
    """
    est = clone(template)
    seed_estimator(est, seed)
    if supports_sample_weight(est):
        if isinstance(est, Pipeline):
            with warnings.catch_warnings():
                # A weighted StandardScaler can compute a variance of -1e-17 for a
                # constant feature; it detects such features and uses scale 1 anyway.
                warnings.filterwarnings(
                    "ignore", "invalid value encountered in sqrt", RuntimeWarning, "sklearn.preprocessing._data"
                )
                return est.fit(X, y, **{key: w for key in _pipeline_weight_keys(est)})
        return est.fit(X, y, sample_weight=w)
    if np.allclose(w, w[0]):
        return est.fit(X, y)
    raise ValueError(no_sample_weight_message(est, role, task))


def _pipeline_weight_keys(pipe: Pipeline, prefix: str = "") -> list[str]:
    keys = []
    for name, step in pipe.steps:
        if isinstance(step, Pipeline):
            keys += _pipeline_weight_keys(step, f"{prefix}{name}__")
        elif step is not None and step != "passthrough" and has_fit_parameter(step, "sample_weight"):
            keys.append(f"{prefix}{name}__sample_weight")
    return keys


def seed_estimator(estimator: Any, seed: int) -> None:
    """Set every unset ``random_state`` parameter of ``estimator`` to ``seed``."""
    params = estimator.get_params(deep=True)
    fixed = {
        key: seed
        for key, value in params.items()
        if (key == "random_state" or key.endswith("__random_state")) and value is None
    }
    if fixed:
        estimator.set_params(**fixed)


def is_estimator_like(obj: Any) -> bool:
    """Duck-typed check for an unfitted scikit-learn estimator."""
    return hasattr(obj, "fit") and hasattr(obj, "get_params")
