"""Behaviour of MixtureOfExpertsRegressor on problems with known structure."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.neighbors import KNeighborsRegressor
from sklearn.tree import DecisionTreeRegressor

from moekit.classic import MixtureOfExpertsRegressor


def _lines(model):
    """(slope, intercept) of each linear expert, sorted by slope."""
    return sorted((float(e.coef_[0]), float(e.intercept_)) for e in model.experts_)


def _agreement(owner, truth):
    """Share of samples whose owning expert matches the true regime, up to relabelling."""
    same = float(np.mean(owner == truth))
    return max(same, 1.0 - same)


@pytest.mark.parametrize("method", ["em", "hard_em", "divide"])
def test_recovers_two_regimes(regimes, method):
    (X, y, _), (Xt, yt, rt) = regimes
    moe = MixtureOfExpertsRegressor(n_experts=2, method=method, random_state=0).fit(X, y)
    (a1, b1), (a2, b2) = _lines(moe)
    assert a1 == pytest.approx(-3.0, abs=0.1) and b1 == pytest.approx(0.5, abs=0.1)
    assert a2 == pytest.approx(2.0, abs=0.1) and b2 == pytest.approx(1.0, abs=0.1)
    r2_single = LinearRegression().fit(X, y).score(Xt, yt)
    assert moe.score(Xt, yt) > 0.98
    assert moe.score(Xt, yt) - r2_single > 0.5
    assert _agreement(moe.predict_expert(Xt), rt) > 0.95


def test_recovers_interleaved_laws(laws):
    (X, y, _), (Xt, yt, lt) = laws
    moe = MixtureOfExpertsRegressor(n_experts=2, random_state=0).fit(X, y)
    coefs = sorted((float(e.coef_[0]), float(e.coef_[1]), float(e.intercept_)) for e in moe.experts_)
    assert coefs[0] == pytest.approx((-2.0, 0.0, 1.0), abs=0.1)
    assert coefs[1] == pytest.approx((1.5, 0.0, -1.0), abs=0.1)
    assert moe.score(Xt, yt) - LinearRegression().fit(X, y).score(Xt, yt) > 0.5
    assert _agreement(moe.predict_expert(Xt), lt) > 0.95
    # The gate splits on the second feature, the one that selects the law.
    assert _agreement(moe.predict_expert(np.c_[np.zeros(5), [-1.5, -1, -0.5, -0.3, -1.8]]), np.zeros(5)) == 1.0


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("method,init", [("em", "random"), ("em", "kmeans_x"), ("hard_em", "random")])
def test_loglik_non_decreasing(laws, method, init):
    (X, y, _), _ = laws
    moe = MixtureOfExpertsRegressor(n_experts=3, method=method, init=init, tol=0.0, max_iter=25, random_state=3).fit(
        X, y
    )
    hist = moe.loglik_history_
    assert hist.shape == (moe.n_iter_,) and moe.n_iter_ >= 2
    assert np.all(np.diff(hist) >= -1e-9), np.diff(hist).min()
    if method == "em":  # the last entry is the log-likelihood of the returned model
        assert moe.log_likelihood(X, y) == pytest.approx(hist[-1], rel=1e-9, abs=1e-9)


def test_converges_and_reports(regimes):
    (X, y, _), _ = regimes
    moe = MixtureOfExpertsRegressor(tol=1e-6, max_iter=200, random_state=0).fit(X, y)
    assert moe.converged_ is True
    assert 1 <= moe.n_iter_ < 200
    assert abs(moe.loglik_history_[-1] - moe.loglik_history_[-2]) <= 1e-6
    assert moe.expert_std_ == pytest.approx([0.2, 0.2], abs=0.05)


def test_predictive_std(laws):
    (X, y, _), _ = laws
    moe = MixtureOfExpertsRegressor(random_state=0).fit(X, y)
    # Far from the boundary x1 = 0 the gate is sure; on it, the laws disagree by 2 * 3.5.
    inside = np.c_[[2.0, 2.0, -2.0], [-1.5, 1.5, 1.5]]
    border = np.c_[[2.0, -2.0], [0.0, 0.0]]
    _, std_in = moe.predict(inside, return_std=True)
    _, std_border = moe.predict(border, return_std=True)
    assert np.all(std_in > 0)
    assert np.all(std_in < 0.3)
    assert np.all(std_border > 1.0)
    # The std is that of the Gaussian mixture: var = sum g (sigma^2 + mu^2) - mu^2.
    Xq = np.r_[inside, border]
    g = moe.gate_proba(Xq)
    mu = np.column_stack([e.predict(Xq) for e in moe.experts_])
    mean, std = moe.predict(Xq, return_std=True)
    np.testing.assert_allclose(mean, np.sum(g * mu, axis=1))
    var = np.sum(g * (moe.expert_std_**2 + mu**2), axis=1) - mean**2
    np.testing.assert_allclose(std, np.sqrt(var), rtol=1e-6)


def test_heterogeneous_experts(regimes):
    (X, y, _), (Xt, yt, _) = regimes
    experts = [LinearRegression(), DecisionTreeRegressor(max_depth=3), Ridge(alpha=0.1)]
    moe = MixtureOfExpertsRegressor(experts=experts, random_state=0).fit(X, y)
    assert moe.n_experts_ == 3
    assert [type(e) for e in moe.experts_] == [LinearRegression, DecisionTreeRegressor, Ridge]
    assert all(e is not t for e, t in zip(moe.experts_, experts))  # templates are cloned
    assert moe.score(Xt, yt) > 0.95


def test_expert_without_sample_weight_is_rejected(regimes):
    (X, y, _), _ = regimes
    moe = MixtureOfExpertsRegressor(experts=KNeighborsRegressor())
    with pytest.raises(ValueError, match="KNeighborsRegressor.*sample_weight") as info:
        moe.fit(X, y)
    assert "LinearRegression" in str(info.value) and "DecisionTreeRegressor" in str(info.value)
    # Hard partitions need no weights: "divide" trains each expert on its own subset.
    moe = MixtureOfExpertsRegressor(experts=KNeighborsRegressor(), method="divide", random_state=0).fit(X, y)
    assert np.isfinite(moe.predict(X)).all()


def test_poolings(regimes):
    (X, y, _), (Xt, yt, _) = regimes
    avg = MixtureOfExpertsRegressor(random_state=0).fit(X, y)
    win = MixtureOfExpertsRegressor(pooling="winner", random_state=0).fit(X, y)
    stack = MixtureOfExpertsRegressor(pooling="stacking", random_state=0).fit(X, y)
    for model in (avg, win, stack):
        assert model.score(Xt, yt) > 0.97
    # Winner-take-all returns the owning expert's prediction and noise level.
    owner = win.predict_expert(Xt)
    mu = np.column_stack([e.predict(Xt) for e in win.experts_])
    mean, std = win.predict(Xt, return_std=True)
    np.testing.assert_allclose(mean, mu[np.arange(len(Xt)), owner])
    np.testing.assert_allclose(std, win.expert_std_[owner])
    assert hasattr(stack, "stacker_") and not hasattr(avg, "stacker_")
    assert np.all(stack.predict(Xt, return_std=True)[1] > 0)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_reproducible_with_random_state(laws):
    (X, y, _), (Xt, _, _) = laws
    kwargs = dict(n_experts=3, init="random", n_init=2, max_iter=20)
    a = MixtureOfExpertsRegressor(random_state=7, **kwargs).fit(X, y)
    b = MixtureOfExpertsRegressor(random_state=7, **kwargs).fit(X, y)
    np.testing.assert_array_equal(a.predict(Xt), b.predict(Xt))
    np.testing.assert_array_equal(a.loglik_history_, b.loglik_history_)


def test_restarts_keep_the_best(regimes):
    (X, y, _), (Xt, yt, _) = regimes
    kwargs = dict(method="divide", init="random", random_state=0)
    one = MixtureOfExpertsRegressor(n_init=1, **kwargs).fit(X, y)
    many = MixtureOfExpertsRegressor(n_init=6, **kwargs).fit(X, y)
    # The first restart of n_init=6 is the n_init=1 run, so the best is at least as good.
    assert many.loglik_history_[-1] >= one.loglik_history_[-1]
    assert many.score(Xt, yt) > 0.98


def test_weights_equal_repetitions():
    """Given the same initial partition, integer weights act as repeated rows."""
    rng = np.random.RandomState(0)
    x = np.r_[rng.uniform(-3, -1, 80), rng.uniform(1, 3, 80)]  # k-means splits these alike
    X = x[:, None]
    y = np.where(x < 0, 2 * x + 1, -3 * x + 0.5) + 0.3 * rng.randn(160)
    w = rng.randint(0, 4, 160)
    kwargs = dict(init="kmeans_x", tol=0.0, max_iter=15, random_state=0)
    a = MixtureOfExpertsRegressor(**kwargs).fit(X, y, sample_weight=w)
    b = MixtureOfExpertsRegressor(**kwargs).fit(np.repeat(X, w, axis=0), np.repeat(y, w))
    Xq = np.linspace(-3, 3, 25)[:, None]
    np.testing.assert_allclose(a.predict(Xq, return_std=True), b.predict(Xq, return_std=True), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(a.loglik_history_, b.loglik_history_, rtol=1e-6)


def test_responsibilities_are_posteriors(regimes):
    (X, y, r), _ = regimes
    moe = MixtureOfExpertsRegressor(random_state=0).fit(X, y)
    R = moe.responsibilities(X, y)
    assert R.shape == (len(X), 2)
    np.testing.assert_allclose(R.sum(axis=1), 1.0)
    # Posteriors use the target: they are at least as confident as the gate.
    assert _agreement(R.argmax(axis=1), r) >= _agreement(moe.predict_expert(X), r) - 1e-12


def test_single_expert_is_the_expert(regimes):
    (X, y, _), (Xt, _, _) = regimes
    moe = MixtureOfExpertsRegressor(n_experts=1).fit(X, y)
    np.testing.assert_allclose(moe.predict(Xt), LinearRegression().fit(X, y).predict(Xt))
    np.testing.assert_allclose(moe.gate_proba(Xt), 1.0)
