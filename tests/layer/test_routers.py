"""Invariants of each router, checked against direct re-computations."""

import math

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.layer.router import group_limited_mask


def _cfg(**kw):
    base = dict(dim=16, hidden_dim=8, num_experts=8, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def test_topk_softmax_then_topk_without_renormalisation():
    """GShard/Switch: the weights are the raw softmax probabilities of the chosen experts."""
    moe = MoE(_cfg(renormalize=False)).eval()
    x = torch.randn(20, 16)
    r = moe.router(x, 2)
    probs = torch.softmax(x @ moe.router.linear.weight.t(), -1)
    vals, idx = probs.topk(2, -1)
    assert torch.equal(r.experts_TK, idx)
    torch.testing.assert_close(r.weights_TK, vals)


def test_topk_renormalised_equals_topk_then_softmax():
    """Mixtral: softmax, top-k, renormalise == softmax over the top-k logits."""
    moe = MoE(_cfg(renormalize=True)).eval()
    x = torch.randn(20, 16)
    r = moe.router(x, 3)
    logits = x @ moe.router.linear.weight.t()
    top, idx = logits.topk(3, -1)
    assert torch.equal(r.experts_TK, idx)
    torch.testing.assert_close(r.weights_TK, top.softmax(-1))
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(20))


def test_switch_weight_is_top1_probability_and_router_gets_gradient():
    """Switch: one expert, weight = its probability, so the router learns through the output."""
    moe = MoE(_cfg(router="switch", top_k=1))
    x = torch.randn(20, 16)
    res = moe(x)
    r = moe.router(x, 1)
    torch.testing.assert_close(r.weights_TK[:, 0], torch.softmax(x @ moe.router.linear.weight.t(), -1).amax(-1))
    res.out.sum().backward()
    assert moe.router.linear.weight.grad.abs().sum() > 0


def test_per_call_top_k_override():
    """moe(x, top_k=1) uses one expert per token without retraining, and matches a k=1 router call."""
    moe = MoE(_cfg(top_k=4)).eval()
    x = torch.randn(30, 16)
    res1 = moe(x, top_k=1)
    assert int(res1.stats["tokens_per_expert"].sum()) == 30
    assert int(moe(x).stats["tokens_per_expert"].sum()) == 120
    r = moe.router(x, 1)
    e = r.experts_TK[:, 0]
    ref = torch.stack([moe.experts.expert(int(e_t))(x_t) for e_t, x_t in zip(e, x)])
    torch.testing.assert_close(res1.out, ref, rtol=1e-5, atol=1e-6)


def test_noisy_topk_noise_only_in_training():
    """Noisy top-k: deterministic in eval, noisy (learned std) in training."""
    moe = MoE(_cfg(router="noisy_topk"))
    with torch.no_grad():
        moe.router.noise.weight.normal_()
    x = torch.randn(50, 16)
    moe.eval()
    assert torch.equal(moe.router(x, 2).experts_TK, moe.router(x, 2).experts_TK)
    moe.train()
    a, b = moe.router(x, 2), moe.router(x, 2)
    assert not torch.equal(a.weights_TK, b.weights_TK)
    assert "load" in a.losses and a.losses["load"].requires_grad
    a.losses["load"].backward()
    assert moe.router.noise.weight.grad.abs().sum() > 0, "the load loss trains the noise network"


def test_noisy_topk_weights_are_softmax_over_kept_noisy_logits():
    """Shazeer et al. 2017: G = softmax(KeepTopK(H)), H = clean + N(0,1) * softplus(x W_noise)."""
    moe = MoE(_cfg(router="noisy_topk", noise_eps=0.0)).train()
    x = torch.randn(12, 16)
    torch.manual_seed(5)
    r = moe.router(x, 2)
    torch.manual_seed(5)
    clean = x @ moe.router.linear.weight.t()
    noisy = clean + torch.randn_like(clean) * torch.nn.functional.softplus(x @ moe.router.noise.weight.t())
    top, idx = noisy.topk(2, -1)
    assert torch.equal(r.experts_TK, idx)
    torch.testing.assert_close(r.weights_TK, top.softmax(-1))


@pytest.mark.parametrize("T,E,cf", [(40, 8, 2.0), (33, 5, 1.0), (16, 16, 0.5)])
def test_expert_choice_each_expert_gets_exactly_C_tokens(T, E, cf):
    """Expert choice (Zhou et al. 2022): C = ceil(T*c/E) tokens per expert, its top-C by score."""
    moe = MoE(_cfg(router="expert_choice", num_experts=E, capacity_factor=cf))
    x = torch.randn(T, 16)
    res = moe(x)
    C = math.ceil(T * cf / E)
    assert res.stats["tokens_per_expert"].tolist() == [C] * E
    r = moe.router(x, 2)
    probs = torch.softmax(x @ moe.router.linear.weight.t(), -1)
    for e in range(E):
        chosen = (r.experts_TK == e).nonzero()[:, 0].sort().values
        assert torch.equal(chosen, probs[:, e].topk(C).indices.sort().values)
    per_token = (r.experts_TK < E).sum(-1)
    assert per_token.min() >= 0 and per_token.max() <= E and per_token.sum() == E * C


def test_hash_router_is_a_fixed_function_of_the_token_id():
    """Hash layers (Roller et al. 2021): the expert depends only on the id, spreads ids evenly, needs ids."""
    moe = MoE(_cfg(router="hash", top_k=1))
    ids = torch.arange(8000)
    x = torch.randn(8000, 16)
    e1 = moe.router(x, 1, ids).experts_TK[:, 0]
    e2 = moe.router(torch.randn(8000, 16), 1, ids).experts_TK[:, 0]
    assert torch.equal(e1, e2)
    counts = torch.bincount(e1, minlength=8).float()
    assert counts.min() > 0.85 * 1000 and counts.max() < 1.15 * 1000
    assert len(list(moe.router.parameters())) == 0
    with pytest.raises(ValueError, match="token_ids"):
        moe(x)
    r2 = moe.router(x[:10], 2, ids[:10])
    assert (r2.experts_TK[:, 0] != r2.experts_TK[:, 1]).all()


def test_random_router_keeps_second_expert_with_probability_2g2():
    """GShard: the first expert always, the second with probability min(1, 2*g2); nothing dropped in eval."""
    moe = MoE(_cfg(router="random", num_experts=4))
    x = torch.randn(20000, 16) * 0.3
    moe.eval()
    assert (moe.router(x, 2).experts_TK < 4).all()
    moe.train()
    r = moe.router(x, 2)
    assert (r.experts_TK[:, 0] < 4).all()
    probs = torch.softmax(x @ moe.router.linear.weight.t(), -1)
    top = probs.topk(2, -1).values
    g2 = top[:, 1] / top.sum(-1)
    expected = (2 * g2).clamp(max=1).mean()
    kept = (r.experts_TK[:, 1] < 4).float().mean()
    assert abs(kept - expected) < 0.02
    assert (r.weights_TK[:, 1][r.experts_TK[:, 1] == 4] == 0).all()


def test_sigmoid_bias_changes_selection_not_weights():
    """DeepSeek-V3: the balancing bias picks experts but the weights are the unbiased sigmoid scores."""
    moe = MoE(_cfg(router="sigmoid", top_k=2, renormalize=False)).eval()
    x = torch.randn(30, 16)
    with torch.no_grad():
        moe.router.bias_E[3] = 100.0
    r = moe.router(x, 2)
    assert (r.experts_TK == 3).any(-1).all(), "a large bias forces expert 3 into every token's choice"
    scores = torch.sigmoid(x @ moe.router.linear.weight.t())
    torch.testing.assert_close(r.weights_TK, scores.gather(1, r.experts_TK))


def test_sigmoid_bias_update_moves_toward_balance():
    """Overloaded experts' bias goes down, underloaded experts' bias goes up, once per update call."""
    moe = MoE(_cfg(router="sigmoid", bias_update_rate=0.1))
    with torch.no_grad():
        moe.router.linear.weight[0] += 3.0 * torch.randn(16).sign()  # expert 0 overloaded
    x = torch.randn(200, 16)
    counts = moe(x).stats["tokens_per_expert"].float()
    moe(x)  # a second micro-batch before the step: load accumulates
    torch.testing.assert_close(moe.router.load_E, 2 * counts)
    moe.update_router_bias()
    expected = 0.1 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(moe.router.bias_E, expected)
    assert moe.router.load_E.sum() == 0
    moe.eval()
    moe(x)
    assert moe.router.load_E.sum() == 0, "eval forwards do not count toward the balance"


def test_sigmoid_bias_balances_load_over_steps():
    """Repeated updates flatten a skewed load without any auxiliary loss."""
    moe = MoE(_cfg(router="sigmoid", bias_update_rate=0.01, balance_loss_weight=0.0))
    with torch.no_grad():
        moe.router.linear.weight[:2] *= 4
        moe.router.linear.bias = None
    x = torch.randn(512, 16)
    first = moe(x).stats["tokens_per_expert"].float()
    stds = []
    for _ in range(200):
        moe.update_router_bias()
        stds.append(moe(x).stats["tokens_per_expert"].float().std())
    assert torch.stack(stds[-20:]).mean() < 0.3 * first.std()  # sign updates oscillate: average the tail


def test_group_limited_routing_stays_inside_top_groups():
    """Group-limited top-k: every chosen expert lies in one of the token's topk_groups best groups."""
    moe = MoE(_cfg(router="sigmoid", num_experts=16, top_k=4, num_groups=4, topk_groups=2)).eval()
    x = torch.randn(64, 16)
    r = moe.router(x, 4)
    groups = r.experts_TK // 4
    assert ((groups[:, :, None] == groups[:, None, :]).sum(-1) >= 1).all()
    assert torch.tensor([len(set(g.tolist())) for g in groups]).max() <= 2
    scores = torch.sigmoid(x @ moe.router.linear.weight.t())
    mask = group_limited_mask(scores, 4, 2, "top2")
    best_groups = scores.view(64, 4, 4).topk(2, -1).values.sum(-1).topk(2, -1).indices
    for t in range(64):
        assert set(groups[t].tolist()) <= set(best_groups[t].tolist())
        assert mask[t].view(4, 4).any(-1).sum() == 2


def test_disabled_experts_are_never_chosen_and_weights_renormalise():
    """Masking an expert at inference reroutes its tokens over the rest (weights still sum to 1)."""
    moe = MoE(_cfg()).eval()
    x = torch.randn(100, 16)
    moe.disable_experts([1, 5])
    r = moe.router(x, 2)
    assert not ((r.experts_TK == 1) | (r.experts_TK == 5)).any()
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(100))
    assert moe(x).stats["tokens_per_expert"][[1, 5]].sum() == 0


def test_router_jitter_only_in_training():
    """Switch's multiplicative jitter perturbs the router input in training only."""
    moe = MoE(_cfg(router_jitter=0.5))
    x = torch.randn(64, 16)
    moe.eval()
    torch.testing.assert_close(moe.router.logits(x), x @ moe.router.linear.weight.t())
    moe.train()
    assert not torch.allclose(moe.router.logits(x), x @ moe.router.linear.weight.t())


def test_router_runs_in_float32_under_bf16():
    """Router logits are computed in fp32 even when the layer runs in bf16 (Switch selective precision)."""
    moe = MoE(_cfg()).to(torch.bfloat16)
    r = moe.router(torch.randn(8, 16, dtype=torch.bfloat16), 2)
    assert r.logits_TE.dtype == torch.float32
    assert moe(torch.randn(8, 16, dtype=torch.bfloat16)).out.dtype == torch.bfloat16


def test_usage_stats_running_average():
    """expert_usage is a running average of each expert's share of routed slots; steps_unused counts idle steps."""
    moe = MoE(_cfg(usage_decay=0.5))
    x = torch.randn(64, 16)
    res = moe(x)
    share = res.stats["tokens_per_expert"].float() / 128
    torch.testing.assert_close(res.stats["expert_usage"], 0.5 * torch.full((8,), 1 / 8) + 0.5 * share)
    moe.after_optimizer_step()
    assert torch.equal(moe.steps_unused, (res.stats["tokens_per_expert"] == 0).long())
    assert res.stats["dropped_fraction"] == 0
    ent = (
        -(torch.softmax(x @ moe.router.linear.weight.t(), -1) * torch.log_softmax(x @ moe.router.linear.weight.t(), -1))
        .sum(-1)
        .mean()
    )
    torch.testing.assert_close(res.stats["router_entropy"], ent)


def test_expert_choice_rejects_per_call_capacity_factor():
    """Expert choice sets its capacity from the config or top_k; a per-call capacity_factor is an error, not ignored."""
    moe = MoE(_cfg(router="expert_choice"))
    with pytest.raises(ValueError, match="capacity_factor"):
        moe(torch.randn(8, 16), capacity_factor=2.0)
    assert moe(torch.randn(16, 16), top_k=1).stats["tokens_per_expert"].tolist() == [2] * 8


# ----------------------------------------------------------------------------- constant top-1 weights
# A renormalised top-1 weight is p / p = 1 (s / s = 1 for the sigmoid router; noisy top-k's softmax
# over one kept logit is 1): the router then gets no gradient from the layer's output. The layer
# warns at construction, the way a user would want to hear about it.
WARN_CASES = [  # (router, top_k, renormalize, warns)
    ("topk", 1, True, True),
    ("topk", 1, False, False),
    ("topk", 2, True, False),
    ("topk", 2, False, False),
    ("sigmoid", 1, True, True),
    ("sigmoid", 1, False, False),
    ("sigmoid", 2, True, False),
    ("sigmoid", 3, False, False),
    ("noisy_topk", 1, True, True),
    ("noisy_topk", 1, False, True),
    ("noisy_topk", 2, True, False),
    ("switch", 1, True, False),
    ("switch", 1, False, False),
    ("random", 2, True, False),
    ("hash", 1, True, False),
    ("expert_choice", 1, True, False),
]


@pytest.mark.parametrize("router,k,renormalize,warns", WARN_CASES)
def test_constant_top1_weight_warns_at_construction_and_is_true(router, k, renormalize, warns):
    """The warning fires exactly when the router's weights carry no gradient from the output
    (checked on the router's parameters: ~0 when it warns, clearly nonzero otherwise)."""
    import warnings

    cfg = _cfg(
        router=router, top_k=k, renormalize=renormalize, balance_loss_weight=0.0, z_loss_weight=0.0, router_dtype="same"
    )  # float64 throughout: 1 - p / p is exactly 0, not float32 rounding (~1e-8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moe = MoE(cfg).double()
    mine = [w for w in caught if "no gradient" in str(w.message)]
    assert len(mine) == int(warns), [str(w.message) for w in caught]
    if warns:
        w = mine[0]
        assert issubclass(w.category, UserWarning) and w.filename == __file__, "the warning points at the caller's line"
        assert f"router {router!r}" in str(w.message) and "top_k" in str(w.message)
        assert "renormalize=False" in str(w.message) or router == "noisy_topk"
    if not moe.router.learned:
        return
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (moe(x, token_ids=torch.arange(64)).out * torch.randn(64, 16, dtype=torch.float64)).sum().backward()
    g = moe.router.linear.weight.grad
    size = 0.0 if g is None else float(g.abs().max())
    assert (size < 1e-10) if warns else (size > 1e-4), size


def test_constant_weight_warning_points_at_the_user_code():
    """A UserWarning naming the router and the remedy, attributed to the caller's line also when
    the layer is built inside moekit (the drop-in module, a model); none for a single expert."""
    import warnings

    from moekit import MoEFeedForward
    from moekit.config import LMConfig
    from moekit.models.lm import MoETransformer

    with pytest.warns(UserWarning, match=r"router 'sigmoid' with top_k=1 gets no gradient.*renormalize=False") as rec:
        MoE(_cfg(router="sigmoid", top_k=1))
        MoEFeedForward(_cfg(router="sigmoid", top_k=1))
        MoETransformer(LMConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, moe=_cfg(router="sigmoid", top_k=1)))
    assert [w.filename for w in rec] == [__file__] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoE(_cfg(num_experts=1, top_k=1))


def test_sigmoid_router_defers_probs_in_eval():
    """In eval the sigmoid router hands over a function for probs_TE (a decode step never reads
    it); reading it gives the normalised sigmoid scores, and the deferred losses of an eval call
    equal those the same call computes in training mode (same routing: no jitter, no noise)."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, router="sigmoid", balance_loss_weight=0.1))
    x_TD = torch.randn(5, 8)
    moe.eval()
    r = moe.router(x_TD, 2)
    assert callable(r.probs)
    scores_TE = r.logits_TE.sigmoid()
    torch.testing.assert_close(r.probs_TE, scores_TE / scores_TE.sum(-1, keepdim=True))
    assert isinstance(r.probs, torch.Tensor)  # computed once, then kept
    eval_losses = {k: v.detach() for k, v in moe(x_TD).losses.items()}
    moe.train()
    assert isinstance(moe.router(x_TD, 2).probs, torch.Tensor)
    train_losses = moe(x_TD).losses
    assert eval_losses.keys() == train_losses.keys() and "balance" in eval_losses
    for k in eval_losses:
        torch.testing.assert_close(eval_losses[k], train_losses[k].detach())


def test_routing_keeps_its_constructor_and_pickles():
    """``Routing(..., probs_TE=...)`` by keyword, ``dataclasses.replace`` and pickling (of an eval
    sigmoid routing whose probabilities are still deferred) keep working."""
    import dataclasses
    import pickle

    from moekit.layer.router import Routing

    e, w, lg = torch.zeros(3, 2, dtype=torch.int64), torch.rand(3, 2), torch.randn(3, 4)
    p = lg.softmax(-1)
    r = Routing(e, w, lg, probs_TE=p, has_empty=True)
    assert r.probs_TE is p and r.has_empty and r.losses == {}
    r2 = dataclasses.replace(r, weights_TK=w * 2)
    assert r2.probs_TE is p and torch.equal(r2.weights_TK, w * 2)
    moe = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, router="sigmoid")).eval()
    deferred = moe.router(torch.randn(5, 8), 2)
    assert callable(deferred.probs)
    back = pickle.loads(pickle.dumps(deferred))
    torch.testing.assert_close(back.probs_TE, deferred.probs_TE)
    with pytest.raises(TypeError, match="probs_TE"):
        Routing(e, w, lg)
