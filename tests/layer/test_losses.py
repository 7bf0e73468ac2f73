"""Auxiliary routing losses against hand-computed values on tiny explicit inputs, how MoE weights
them into aux_loss, and noisy top-k's smooth load estimator against a direct re-implementation.

Shape legend: T tokens, D model width, E experts, K slots per token.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig
from moekit.layer import losses as L


def close(a, b, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), rtol=tol, atol=tol
    )


PROBS_TE = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # P = [0.65, 0.35]


# ----------------------------------------------------------------------------- pure functions
def test_load_balancing_loss_hand_value():
    """E * sum f_i P_i: f = [3/4, 1/4], P = [0.65, 0.35] -> 2 * (0.4875 + 0.0875) = 1.15."""
    experts_TK = torch.tensor([[0], [0], [1], [0]])
    close(L.load_balancing_loss(PROBS_TE, experts_TK), 1.15)


def test_load_balancing_loss_uniform_is_one():
    """Uniform probabilities and uniform assignment give exactly 1 (the documented minimum)."""
    probs_TE = torch.full((4, 2), 0.5)
    close(L.load_balancing_loss(probs_TE, torch.tensor([[0], [1], [0], [1]])), 1.0)
    probs_TE = torch.full((6, 3), 1 / 3)
    close(L.load_balancing_loss(probs_TE, torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2], [2, 0]])), 1.0)


def test_load_balancing_loss_top2_and_empty_slots():
    """f counts only non-empty slots (id E): here f = [1/2, 1/2] so the loss is 2 * 0.5 * (0.65 + 0.35) = 1."""
    experts_TK = torch.tensor([[0, 2], [2, 2], [1, 2], [2, 2]])
    close(L.load_balancing_loss(PROBS_TE, experts_TK), 1.0)
    # top-2 with E = 3: f = counts / 6 = [2, 2, 2] / 6; P = column means
    probs_TE = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    experts_TK = torch.tensor([[0, 1], [1, 2], [2, 0]])
    P = [0.8 / 3, 1.1 / 3, 1.1 / 3]
    close(L.load_balancing_loss(probs_TE, experts_TK), 3 * sum(p / 3 for p in P))  # = 1.0
    experts_TK = torch.tensor([[0, 1], [0, 1], [0, 2]])  # f = [3, 2, 1] / 6
    close(L.load_balancing_loss(probs_TE, experts_TK), 3 * (3 / 6 * P[0] + 2 / 6 * P[1] + 1 / 6 * P[2]))


def test_sq_load_loss_hand_value():
    """E * sum P_i^2: 2 * (0.65^2 + 0.35^2) = 1.09; uniform gives 1."""
    close(L.sq_load_loss(PROBS_TE), 1.09)
    close(L.sq_load_loss(torch.full((5, 4), 0.25)), 1.0)


def test_importance_loss_hand_value():
    """CV^2 (population variance) of summed gate weights: imp = [1.8, 0.9, 0.3] -> 0.38 / 1.0^2 = 0.38."""
    experts_TK = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 3]])  # last token: two empty slots (id E=3)
    weights_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.0, 0.0]])
    close(L.importance_loss(experts_TK, weights_TK, 3), 0.38, tol=1e-5)
    # equal importance -> 0
    close(L.importance_loss(torch.tensor([[0], [1], [2]]), torch.tensor([[0.5], [0.5], [0.5]]), 3), 0.0)


def test_z_loss_hand_value():
    """mean logsumexp^2: rows [0, 0] -> ln 2, [ln 3, 0] -> ln 4; (ln2^2 + 4 ln2^2) / 2 = 2.5 ln2^2."""
    logits_TE = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    close(L.z_loss(logits_TE), 2.5 * math.log(2.0) ** 2)
    close(L.z_loss(torch.tensor([[0.0, float("-inf")]])), 0.0)  # a masked expert does not count


def test_routing_entropy_hand_value():
    """Mean entropy in nats: [0.5, 0.5] -> ln 2, [1, 0] -> 0 (no NaN from 0 log 0), mean ln2 / 2."""
    probs_TE = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    close(L.routing_entropy(probs_TE), math.log(2.0) / 2)
    close(L.routing_entropy(torch.full((3, 4), 0.25)), math.log(4.0))


def test_cv_squared_hand_value():
    """Population variance / mean^2: [1, 2, 3, 4] -> 1.25 / 6.25 = 0.2 (unbiased variance would give 0.2667)."""
    close(L.cv_squared(torch.tensor([1.0, 2.0, 3.0, 4.0])), 0.2)
    close(L.cv_squared(torch.tensor([3.0, 3.0, 3.0])), 0.0)
    close(L.cv_squared(torch.tensor([7.0])), 0.0)
    close(L.cv_squared(torch.tensor([0.0, 2.0])), 1.0)  # var 1, mean 1


def test_slot_counts_ignores_empty_id():
    """slot_counts counts non-empty slots per expert and ignores the empty id E."""
    experts_TK = torch.tensor([[0, 3], [2, 3], [2, 0], [3, 3]])
    counts_E = L.slot_counts(experts_TK, 3)
    assert counts_E.dtype == torch.int64
    assert counts_E.tolist() == [2, 0, 2]


# ----------------------------------------------------------------------------- MoE weighting
def direct_losses(moe: MoE, x_TD: torch.Tensor) -> dict:
    """The unweighted losses computed straight from the router's decision."""
    E = moe.cfg.num_experts
    with torch.no_grad():
        r = moe.router(x_TD, moe.cfg.top_k)
    return {
        "balance": L.load_balancing_loss(r.probs_TE, r.experts_TK),
        "sq_load": L.sq_load_loss(r.probs_TE),
        "importance": L.importance_loss(r.experts_TK, r.weights_TK, E),
        "z": L.z_loss(r.logits_TE),
        "entropy": L.routing_entropy(r.probs_TE),
    }


def test_moe_aux_loss_is_weighted_sum():
    """aux_loss == sum weight_i * losses[i]; a zero-weight loss is reported but not added."""
    weights = dict(
        balance_loss_weight=0.5,
        sq_load_loss_weight=0.25,
        importance_loss_weight=0.125,
        z_loss_weight=0.01,
        entropy_loss_weight=0.0,
    )
    cfg = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, **weights)
    moe = MoE(cfg).eval()
    x_TD = torch.randn(10, 8)
    res = moe(x_TD)
    want = direct_losses(moe, x_TD)
    assert set(want) <= set(res.losses)
    for name, value in want.items():
        close(res.losses[name].detach(), value, tol=1e-5)
    assert float(res.losses["entropy"].detach()) > 0.1, "entropy is computed even though its weight is 0"
    total = 0.5 * want["balance"] + 0.25 * want["sq_load"] + 0.125 * want["importance"] + 0.01 * want["z"]
    close(res.aux_loss.detach(), total, tol=1e-5)
    assert res.aux_loss.requires_grad


def test_moe_aux_loss_negative_entropy_weight_and_all_zero():
    """A negative entropy weight subtracts the entropy; all-zero weights give aux_loss == 0."""
    cfg = MoEConfig(
        dim=8,
        hidden_dim=16,
        num_experts=4,
        top_k=1,
        balance_loss_weight=0.0,
        z_loss_weight=0.0,
        entropy_loss_weight=-0.3,
    )
    moe = MoE(cfg).eval()
    x_TD = torch.randn(6, 8)
    res = moe(x_TD)
    close(res.aux_loss.detach(), -0.3 * direct_losses(moe, x_TD)["entropy"], tol=1e-5)
    cfg = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=1, balance_loss_weight=0.0, z_loss_weight=0.0)
    res = MoE(cfg)(x_TD)
    assert float(res.aux_loss.detach()) == 0.0
    assert float(res.losses["balance"].detach()) > 0  # still reported


# ----------------------------------------------------------------------------- noisy top-k load
def shazeer_load_loss(clean_TE, noisy_TE, std_TE, k):
    """Shazeer et al. 2017, eq. 8-10, written with loops: P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i),
    load_i = sum_x P(x, i), loss = CV(load)^2 with the population variance."""
    T, E = clean_TE.shape
    P = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        for i in range(E):
            others = sorted((float(noisy_TE[t, j]) for j in range(E) if j != i), reverse=True)
            kth = others[k - 1]
            z = (float(clean_TE[t, i]) - kth) / float(std_TE[t, i])
            P[t, i] = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    load = P.sum(0)
    return load.var(unbiased=False) / load.mean() ** 2


def noisy_moe(E=5, k=2, D=6):
    cfg = MoEConfig(
        dim=D,
        hidden_dim=8,
        num_experts=E,
        top_k=k,
        router="noisy_topk",
        load_loss_weight=0.7,
        balance_loss_weight=0.0,
        z_loss_weight=0.0,
        noise_eps=1e-2,
    )
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.noise.weight.normal_(0.0, 0.5)  # make the noise std depend on the token
    return moe


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_topk_load_eval_matches_paper(k):
    """Eval mode (noisy == clean): losses['load'] equals the paper's smooth load CV^2."""
    moe = noisy_moe(k=k).eval()
    x_TD = torch.randn(12, 6)
    r = moe.router(x_TD, k)
    W, Wn = moe.router.linear.weight.detach(), moe.router.noise.weight.detach()
    clean_TE = x_TD @ W.t()
    std_TE = F.softplus(x_TD @ Wn.t()) + 1e-2
    want = shazeer_load_loss(clean_TE, clean_TE, std_TE, k)
    close(r.losses["load"].detach(), want, tol=1e-5)
    res = moe(x_TD)
    close(res.losses["load"].detach(), want, tol=1e-5)
    close(res.aux_loss.detach(), 0.7 * want, tol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_noisy_topk_train_seeded_matches_paper(k):
    """Train mode with seeded noise: selection = top-k of H, weights = softmax of those H, load = paper's estimator."""
    moe = noisy_moe(k=k).train()
    T, E = 16, 5
    x_TD = torch.randn(T, 6)
    torch.manual_seed(1234)
    r = moe.router(x_TD, k)
    torch.manual_seed(1234)
    noise_TE = torch.randn(T, E)
    W, Wn = moe.router.linear.weight.detach(), moe.router.noise.weight.detach()
    clean_TE = x_TD @ W.t()
    std_TE = F.softplus(x_TD @ Wn.t()) + 1e-2
    noisy_TE = clean_TE + noise_TE * std_TE
    top_TK, idx_TK = noisy_TE.topk(k, dim=-1)
    assert torch.equal(r.experts_TK, idx_TK)
    torch.testing.assert_close(r.weights_TK.detach(), top_TK.softmax(-1), rtol=1e-5, atol=1e-6)
    close(r.losses["load"].detach(), shazeer_load_loss(clean_TE, noisy_TE, std_TE, k), tol=1e-5)
    assert r.losses["load"].requires_grad, "the smooth load estimator must be differentiable"


def test_noisy_topk_load_gradient_reaches_noise_weights():
    """The load loss is differentiable in both the gate and the noise weights (it is what trains W_noise)."""
    moe = noisy_moe(k=2).train()
    r = moe.router(torch.randn(16, 6), 2)
    r.losses["load"].backward()
    assert moe.router.linear.weight.grad.abs().sum() > 0
    assert moe.router.noise.weight.grad.abs().sum() > 0


def test_eval_defers_losses_and_stats_until_read():
    """In eval mode the losses and stats are computed on first access (decoding never reads
    them, so it launches none of their ops) and equal what a training-mode call computes."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from moekit import MoE, MoEConfig

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[func] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=2, z_loss_weight=1e-3, balance_loss_weight=0.01))
    x = torch.randn(2, 5, 16)
    train = moe.train()(x)
    moe.eval()
    with CountOps() as bare:
        res = moe(x)
    assert "deferred=True" in repr(res)
    with CountOps() as read:
        aux = res.aux_loss
    assert "deferred=False" in repr(res)
    assert sum(read.n.values()) >= 20 and sum(bare.n.values()) > 0  # the work moved, it did not vanish
    torch.testing.assert_close(res.out, train.out)
    torch.testing.assert_close(aux, train.aux_loss)
    assert set(res.losses) == set(train.losses)
    for name in train.losses:
        torch.testing.assert_close(res.losses[name], train.losses[name])
    for name in ("tokens_per_expert", "dropped_fraction", "router_entropy"):
        torch.testing.assert_close(res.stats[name], train.stats[name])


def test_lm_aux_loss_sums_the_layers_on_access():
    from moekit.config import LMConfig
    from moekit.models.lm import MoETransformer

    torch.manual_seed(0)
    lm = MoETransformer(
        LMConfig(
            vocab_size=50,
            dim=32,
            n_layers=2,
            n_heads=2,
            max_seq_len=16,
            moe=dict(dim=32, num_experts=4, top_k=2, hidden_dim=32),
        )
    )
    idx = torch.randint(0, 50, (2, 8))
    out = lm.eval()(idx)
    expected = sum(r.aux_loss for r in out.moe if r is not None)
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss is out.aux_loss  # cached
