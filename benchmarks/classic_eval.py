"""Cross-validated comparison of the classic mixture of experts with single models.

For each dataset, 5-fold cross-validated scores (R^2 for regression, accuracy for
classification) of:

* the mixture of experts (EM, gate-weighted average) with 2 and with 4 linear experts
  (``LinearRegression`` / scaled ``LogisticRegression``), and with 2 experts pooled
  winner-take-all,
* the best single expert of the same (linear) family: ``RidgeCV`` /
  ``LogisticRegression`` on standardised inputs, with the regularisation chosen by
  internal cross-validation (``RidgeCV``'s efficient leave-one-out, or a 5-fold
  grid search over ``C`` in 1e-3 .. 1e3),
* ``HistGradientBoostingRegressor`` / ``HistGradientBoostingClassifier`` (defaults).

Datasets: two synthetic piecewise problems and scikit-learn's bundled diabetes,
digits, breast cancer and wine (no downloads).

Usage::

    PYTHONPATH=src python benchmarks/classic_eval.py [--n-jobs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from typing import Any

import numpy as np
import sklearn
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from moekit.classic import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor

SEED = 0


def slope_sign(n: int = 600, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """y = 2x + 1 for x < 0 and -3x + 0.5 for x >= 0, noise sd 0.3, one nuisance feature."""
    rng = np.random.RandomState(seed)
    X = rng.uniform(-3, 3, size=(n, 2))
    return X, _slope_sign_mean(X) + 0.3 * rng.randn(n)


def _slope_sign_mean(X: np.ndarray) -> np.ndarray:
    return np.where(X[:, 0] < 0, 2 * X[:, 0] + 1, -3 * X[:, 0] + 0.5)


def interleaved(n: int = 600, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """y = 1.5 x0 - 1 where x1 >= 0 and -2 x0 + 1 where x1 < 0, noise sd 0.2."""
    rng = np.random.RandomState(seed)
    X = rng.uniform(-2, 2, size=(n, 2))
    return X, _interleaved_mean(X) + 0.2 * rng.randn(n)


def _interleaved_mean(X: np.ndarray) -> np.ndarray:
    return np.where(X[:, 1] >= 0, 1.5 * X[:, 0] - 1.0, -2.0 * X[:, 0] + 1.0)


#: Noise-free regression functions of the synthetic problems, for the R^2 ceiling.
TRUE_MEAN = {"synthetic: slope changes sign": _slope_sign_mean, "synthetic: interleaved laws": _interleaved_mean}


DATASETS: list[tuple[str, str, Any]] = [
    ("synthetic: slope changes sign", "regression", slope_sign),
    ("synthetic: interleaved laws", "regression", interleaved),
    ("diabetes", "regression", lambda: load_diabetes(return_X_y=True)),
    ("digits", "classification", lambda: load_digits(return_X_y=True)),
    ("breast cancer", "classification", lambda: load_breast_cancer(return_X_y=True)),
    ("wine", "classification", lambda: load_wine(return_X_y=True)),
]


def models(task: str) -> dict[str, Any]:
    """The compared estimators for a task, by column name."""
    if task == "regression":
        return {
            "MoE, 2 experts": MixtureOfExpertsRegressor(n_experts=2, random_state=SEED),
            "MoE, 4 experts": MixtureOfExpertsRegressor(n_experts=4, random_state=SEED),
            "MoE, 2 experts, winner": MixtureOfExpertsRegressor(n_experts=2, pooling="winner", random_state=SEED),
            "best single expert": make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))),
            "HistGradientBoosting": HistGradientBoostingRegressor(random_state=SEED),
        }
    return {
        "MoE, 2 experts": MixtureOfExpertsClassifier(n_experts=2, random_state=SEED),
        "MoE, 4 experts": MixtureOfExpertsClassifier(n_experts=4, random_state=SEED),
        "MoE, 2 experts, winner": MixtureOfExpertsClassifier(n_experts=2, pooling="winner", random_state=SEED),
        "best single expert": GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
            {"logisticregression__C": np.logspace(-3, 3, 7)},
            cv=5,
        ),
        "HistGradientBoosting": HistGradientBoostingClassifier(random_state=SEED),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-jobs", type=int, default=2, help="parallel CV folds")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    print(
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"scikit-learn {sklearn.__version__}, {platform.machine()}"
    )
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name, task, load in DATASETS:
        X, y = load()
        cv = (
            KFold(5, shuffle=True, random_state=SEED)
            if task == "regression"
            else StratifiedKFold(5, shuffle=True, random_state=SEED)
        )
        scoring = "r2" if task == "regression" else "accuracy"
        row: dict[str, Any] = {
            "dataset": name,
            "task": task,
            "n": int(X.shape[0]),
            "d": int(X.shape[1]),
            "metric": scoring,
            "scores": {},
        }
        for label, model in models(task).items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                out = cross_validate(model, X, y, cv=cv, scoring=scoring, n_jobs=args.n_jobs)
            scores = out["test_score"]
            row["scores"][label] = {
                "mean": float(scores.mean()),
                "std": float(scores.std()),
                "fit_s": float(out["fit_time"].mean()),
            }
            print(
                f"  {name:32s} {label:22s} {scoring} {scores.mean():.3f} "
                f"± {scores.std():.3f}  (fit {out['fit_time'].mean():.2f} s/fold)",
                flush=True,
            )
        if name in TRUE_MEAN:  # R^2 of the true function on the same test folds
            ceiling = [r2_score(y[test], TRUE_MEAN[name](X[test])) for _, test in cv.split(X, y)]
            row["ceiling_r2"] = float(np.mean(ceiling))
            print(f"  {name:32s} {'(true function)':22s} r2 {np.mean(ceiling):.3f}")
        results.append(row)
    total = time.perf_counter() - start

    labels = list(results[0]["scores"])
    print("\n| dataset | n × d | metric | " + " | ".join(labels) + " |")
    print("|---|---|---|" + "---|" * len(labels))
    for row in results:
        best = max(round(v["mean"], 3) for v in row["scores"].values())
        cells = []
        for label in labels:
            s = row["scores"][label]
            cell = f"{s['mean']:.3f} ± {s['std']:.3f}"
            cells.append(f"**{cell}**" if round(s["mean"], 3) == best else cell)
        print(f"| {row['dataset']} | {row['n']} × {row['d']} | {row['metric']} | " + " | ".join(cells) + " |")
    for row in results:
        if "ceiling_r2" in row:
            print(f"R^2 of the noise-free function on the same folds, {row['dataset']}: {row['ceiling_r2']:.3f}")
    print(f"\ntotal {total:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "total_s": total}, fh, indent=2)


if __name__ == "__main__":
    main()
