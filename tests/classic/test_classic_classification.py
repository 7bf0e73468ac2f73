"""Behaviour of MixtureOfExpertsClassifier."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from moekit.classic import MixtureOfExpertsClassifier


def _xor(n, seed):
    """Label = x1 > 0 left of x0 = 0 and x1 < 0 right of it: linear per half, not overall."""
    rng = np.random.RandomState(seed)
    X = rng.uniform(-2, 2, size=(n, 2))
    return X, np.where(X[:, 0] < 0, X[:, 1] > 0, X[:, 1] < 0).astype(int)


@pytest.fixture(scope="module")
def xor():
    return _xor(300, 0), _xor(300, 1)


@pytest.mark.parametrize("method", ["em", "hard_em"])
def test_two_linear_experts_solve_xor(xor, method):
    (X, y), (Xt, yt) = xor
    moe = MixtureOfExpertsClassifier(method=method, n_init=3, random_state=0).fit(X, y)
    assert LogisticRegression().fit(X, y).score(Xt, yt) < 0.7
    assert moe.score(Xt, yt) > 0.9
    # Splitting along either axis makes both halves linear; either way every
    # quadrant is owned by one expert and both experts are used.
    owner = moe.predict_expert(Xt)
    majority = []
    for sx in (-1, 1):
        for sy in (-1, 1):
            q = (sx * Xt[:, 0] > 0.3) & (sy * Xt[:, 1] > 0.3)
            counts = np.bincount(owner[q], minlength=2)
            assert counts.max() / counts.sum() > 0.95
            majority.append(counts.argmax())
    assert set(majority) == {0, 1}


@pytest.mark.parametrize("pooling", ["average", "winner", "stacking"])
def test_predict_proba_is_a_distribution(xor, pooling):
    (X, y), (Xt, _) = xor
    moe = MixtureOfExpertsClassifier(pooling=pooling, random_state=0).fit(X, y)
    P = moe.predict_proba(Xt)
    assert P.shape == (len(Xt), 2)
    assert np.all(P >= 0) and np.all(P <= 1)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    np.testing.assert_array_equal(moe.predict(Xt), moe.classes_[P.argmax(axis=1)])


@pytest.mark.parametrize("loader,minimum", [(load_wine, 0.9), (load_breast_cancer, 0.93)])
def test_accuracy_on_bundled_datasets(loader, minimum):
    X, y = loader(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    moe = MixtureOfExpertsClassifier(n_experts=2, random_state=0).fit(Xtr, ytr)
    assert moe.score(Xte, yte) >= minimum
    assert set(moe.classes_) == set(np.unique(y))


def test_string_labels_and_heterogeneous_experts(xor):
    (X, y), (Xt, yt) = xor
    names = np.array(["no", "yes"])
    experts = [LogisticRegression(), DecisionTreeClassifier(max_depth=2), GaussianNB()]
    moe = MixtureOfExpertsClassifier(experts=experts, random_state=0).fit(X, names[y])
    assert list(moe.classes_) == ["no", "yes"]
    assert [type(e) for e in moe.experts_] == [LogisticRegression, DecisionTreeClassifier, GaussianNB]
    pred = moe.predict(Xt)
    assert set(pred) <= {"no", "yes"}
    assert np.mean(pred == names[yt]) > 0.85


def test_responsibilities_and_gate(xor):
    (X, y), _ = xor
    moe = MixtureOfExpertsClassifier(n_experts=3, random_state=0).fit(X, y)
    R = moe.responsibilities(X, y)
    G = moe.gate_proba(X)
    assert R.shape == G.shape == (len(X), 3)
    np.testing.assert_allclose(R.sum(axis=1), 1.0)
    np.testing.assert_allclose(G.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="not seen during fit"):
        moe.responsibilities(X[:3], [0, 1, 7])


def test_classifier_expert_errors(xor):
    (X, y), _ = xor
    with pytest.raises(ValueError, match="SVC has no predict_proba.*probability=True"):
        MixtureOfExpertsClassifier(experts=SVC()).fit(X, y)
    with pytest.raises(ValueError, match="KNeighborsClassifier.*sample_weight.*LogisticRegression"):
        MixtureOfExpertsClassifier(experts=KNeighborsClassifier()).fit(X, y)


def test_gate_without_sample_weight_falls_back_to_hard_targets(xor):
    (X, y), (Xt, yt) = xor
    moe = MixtureOfExpertsClassifier(gate=KNeighborsClassifier(15), random_state=0)
    with pytest.warns(UserWarning, match="hard targets"):
        moe.fit(X, y)
    assert moe.score(Xt, yt) > 0.85
