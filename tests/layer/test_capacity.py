"""Expert capacity: the capacity formula, drop policies against a plain-Python reference walk,
re-routing of overflowing slots, and capacity as seen through the MoE layer.

Shape legend: T tokens, D model width, E experts, K slots per token, C capacity per expert.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.layer.dispatch import apply_capacity, expert_capacity
from reference import moe_reference


# ----------------------------------------------------------------------------- references
def ref_drop(experts_TK: torch.Tensor, weights_TK: torch.Tensor, C: int, E: int, priority: str):
    """Walk slots in priority order (all k=0 slots, then all k=1, ...; within a k, token order or
    descending max weight, stable) and keep a slot iff its expert has fewer than C kept so far."""
    experts = experts_TK.tolist()
    weights = weights_TK.detach().tolist()
    T, K = len(experts), len(experts[0]) if experts else 0
    if priority == "order":
        token_order = list(range(T))
    else:
        token_order = sorted(range(T), key=lambda t: -max(weights[t]))  # Python's sort is stable
    kept = [0] * E
    keep = [[False] * K for _ in range(T)]
    for k in range(K):
        for t in token_order:
            e = experts[t][k]
            if e < E and kept[e] < C:
                keep[t][k] = True
                kept[e] += 1
    return torch.tensor(keep, dtype=torch.bool).view(T, K), torch.tensor(kept, dtype=torch.int64)


def topk_routing(T: int, E: int, K: int, *, skew: float = 0.0, seed: int = 0, renormalize: bool = True):
    """Random softmax routing; ``skew`` adds that much to expert 0's logit (most tokens pick it)."""
    g = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=g)
    logits_TE[:, 0] += skew
    probs_TE = logits_TE.softmax(-1)
    vals_TK, experts_TK = probs_TE.topk(K, dim=-1)
    weights_TK = vals_TK / vals_TK.sum(-1, keepdim=True) if renormalize else vals_TK
    return experts_TK, weights_TK, probs_TE


def counts_of(experts_TK: torch.Tensor, E: int) -> torch.Tensor:
    """Non-empty slots per expert, by bincount."""
    e_S = experts_TK.reshape(-1)
    return torch.bincount(e_S[e_S < E], minlength=E)


CASES = [  # (T, E, K, skew)
    (1, 1, 1, 0.0),
    (5, 2, 1, 0.0),
    (7, 3, 2, 4.0),
    (16, 4, 2, 0.0),
    (16, 4, 2, 5.0),
    (9, 5, 3, 3.0),
    (20, 8, 2, 6.0),
    (12, 6, 6, 0.0),
    (3, 8, 1, 10.0),
    (31, 7, 4, 2.0),
]


# ----------------------------------------------------------------------------- the formula
@pytest.mark.parametrize(
    "T,K,E,cf,min_cap,expected",
    [
        (8, 2, 4, 1.0, 1, 4),  # 8*2/4 = 4
        (10, 1, 4, 1.0, 1, 3),  # ceil(2.5)
        (10, 2, 4, 1.25, 1, 7),  # ceil(6.25)
        (16, 1, 8, 0.25, 4, 4),  # ceil(0.5) = 1, raised to min_capacity 4
        (16, 1, 8, 0.25, 1, 1),
        (3, 2, 2, 4.0, 1, 3),  # ceil(12) clamped to T = 3
        (3, 1, 2, 1.0, 8, 3),  # min_capacity 8 still clamped to T
        (100, 2, 64, 0.5, 1, 2),  # ceil(1.5625)
    ],
)
def test_expert_capacity_hand_values(T, K, E, cf, min_cap, expected):
    """C = ceil(cf*T*K/E) clamped to [min_capacity, T]; a wrong C over- or under-drops tokens."""
    assert expert_capacity(T, K, E, cf, min_cap) == expected


def test_expert_capacity_grid():
    """The formula holds over a grid of binary-exact factors (no float ambiguity in the ceil)."""
    for T in (1, 2, 7, 16, 33):
        for E in (1, 2, 3, 8):
            for K in range(1, E + 1):
                for cf in (0.25, 0.5, 1.0, 1.5, 2.0, 3.0):
                    for min_cap in (1, 2, 5):
                        want = min(T, max(min_cap, math.ceil(cf * T * K / E)))
                        assert expert_capacity(T, K, E, cf, min_cap) == want, (T, K, E, cf, min_cap)


# ----------------------------------------------------------------------------- drop policy
@pytest.mark.parametrize("priority", ["order", "score"])
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
def test_no_expert_exceeds_capacity(priority, overflow):
    """No expert ever holds more than C slots, for random and heavily skewed routing."""
    for seed in range(4):
        for T, E, K, skew in CASES:
            experts_TK, weights_TK, probs_TE = topk_routing(T, E, K, skew=skew, seed=seed)
            for C in sorted({1, 2, max(1, T * K // E), T}):
                new_experts_TK, new_weights_TK = apply_capacity(
                    experts_TK, weights_TK, C, E, probs_TE=probs_TE, overflow=overflow, priority=priority
                )
                assert new_experts_TK.shape == (T, K) and new_weights_TK.shape == (T, K)
                assert int(counts_of(new_experts_TK, E).max()) <= C, (seed, T, E, K, skew, C)
                empty_TK = new_experts_TK == E
                assert torch.all(new_weights_TK[empty_TK] == 0), "an empty slot must carry weight 0"


def test_drop_order_hand_example():
    """Order priority: all first choices (token order) before any second choice; later slots drop."""
    E, C = 2, 2
    experts_TK = torch.tensor([[0, 1], [0, 1], [1, 0]])
    weights_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    # k=0: t0->e0, t1->e0, t2->e1 all kept (e0=2, e1=1); k=1: t0->e1 kept (e1=2), t1->e1 dropped, t2->e0 dropped
    new_experts_TK, new_weights_TK = apply_capacity(experts_TK, weights_TK, C, E, overflow="drop", priority="order")
    assert new_experts_TK.tolist() == [[0, 1], [0, 2], [1, 2]]
    torch.testing.assert_close(new_weights_TK, torch.tensor([[0.6, 0.4], [0.7, 0.0], [0.9, 0.0]]))


def test_drop_score_hand_example():
    """Score priority (V-MoE BPR): tokens with the highest top gate weight keep their slot first."""
    E, C = 2, 2
    experts_TK = torch.tensor([[0], [0], [0], [0]])
    weights_TK = torch.tensor([[0.1], [0.9], [0.5], [0.7]])
    new_experts_TK, new_weights_TK = apply_capacity(experts_TK, weights_TK, C, E, overflow="drop", priority="score")
    assert new_experts_TK.flatten().tolist() == [2, 0, 2, 0]
    assert new_weights_TK.flatten().tolist() == pytest.approx([0.0, 0.9, 0.0, 0.7])
    new_experts_TK, _ = apply_capacity(experts_TK, weights_TK, C, E, overflow="drop", priority="order")
    assert new_experts_TK.flatten().tolist() == [0, 0, 2, 2]


@pytest.mark.parametrize("priority", ["order", "score"])
def test_drop_matches_reference_walk(priority):
    """apply_capacity(drop) keeps exactly the slots the reference priority walk keeps."""
    for seed in range(5):
        for T, E, K, skew in CASES:
            experts_TK, weights_TK, _ = topk_routing(T, E, K, skew=skew, seed=seed)
            for C in sorted({1, 2, max(1, T * K // E), T}):
                keep_TK, kept_E = ref_drop(experts_TK, weights_TK, C, E, priority)
                new_experts_TK, new_weights_TK = apply_capacity(
                    experts_TK, weights_TK, C, E, overflow="drop", priority=priority
                )
                assert torch.equal(new_experts_TK, torch.where(keep_TK, experts_TK, E)), (seed, T, E, K, C)
                assert torch.equal(new_weights_TK, weights_TK * keep_TK)
                assert torch.equal(counts_of(new_experts_TK, E), kept_E)


def test_drop_score_ties_are_stable_and_empty_slots_ignored():
    """Equal top weights keep token order; pre-existing empty slots (id E) take no capacity."""
    E, C = 3, 2
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        T, K = 10, 2
        experts_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        experts_TK[torch.rand(T, K, generator=g) < 0.3] = E  # some slots already empty
        weights_TK = torch.randint(1, 4, (T, K), generator=g).float() / 4  # many ties
        weights_TK[experts_TK == E] = 0.0
        for priority in ("order", "score"):
            keep_TK, _ = ref_drop(experts_TK, weights_TK, C, E, priority)
            new_experts_TK, _ = apply_capacity(experts_TK, weights_TK, C, E, overflow="drop", priority=priority)
            assert torch.equal(new_experts_TK, torch.where(keep_TK, experts_TK, E))


# ----------------------------------------------------------------------------- re-routing
def check_reroute(experts_TK, weights_TK, probs_TE, C, E, priority):
    """Every reroute property against the drop policy on the same input; returns the result."""
    T, K = experts_TK.shape
    drop_experts_TK, drop_weights_TK = apply_capacity(experts_TK, weights_TK, C, E, overflow="drop", priority=priority)
    new_experts_TK, new_weights_TK = apply_capacity(
        experts_TK, weights_TK, C, E, probs_TE=probs_TE, overflow="reroute", priority=priority
    )
    counts_E = counts_of(new_experts_TK, E)
    assert int(counts_E.max()) <= C
    kept_TK = drop_experts_TK < E
    # slots the drop policy kept are untouched
    assert torch.equal(new_experts_TK[kept_TK], drop_experts_TK[kept_TK])
    assert torch.equal(new_weights_TK[kept_TK], drop_weights_TK[kept_TK])
    # fewer (or as many) drops than the drop policy
    assert int((new_experts_TK == E).sum()) <= int((drop_experts_TK == E).sum())
    for t in range(T):
        original = set(experts_TK[t].tolist()) - {E}
        now = [e for e in new_experts_TK[t].tolist() if e < E]
        assert len(now) == len(set(now)), f"token {t} got an expert twice: {now}"
        for k in range(K):
            e_new, e_old = int(new_experts_TK[t, k]), int(experts_TK[t, k])
            if e_old < E and not kept_TK[t, k] and e_new < E:  # a rerouted slot
                assert e_new not in original, f"token {t} rerouted to one of its original top-k {original}"
                want = probs_TE[t, e_new] * weights_TK[t, k] / probs_TE[t, e_old]
                torch.testing.assert_close(new_weights_TK[t, k], want, rtol=1e-6, atol=1e-7)
            if e_old < E and e_new == E:  # still dropped: every expert it could use must be full
                usable = set(range(E)) - original - set(now)
                usable = {e for e in usable if probs_TE[t, e] > 0}
                assert all(int(counts_E[e]) == C for e in usable), (
                    f"token {t} slot {k} dropped although experts {[e for e in usable if counts_E[e] < C]} have room"
                )
            if e_old == E:
                assert e_new == E, "an originally empty slot must stay empty"
    return new_experts_TK, new_weights_TK


@pytest.mark.parametrize("priority", ["order", "score"])
def test_reroute_properties(priority):
    """Reroute: within capacity, no duplicate expert per token, new experts outside the original top-k,
    weights p_new*w_old/p_old, never more drops than 'drop', and a slot stays dropped only if all
    its options are full."""
    for seed in range(4):
        for T, E, K, skew in CASES:
            for renormalize in (True, False):
                experts_TK, weights_TK, probs_TE = topk_routing(T, E, K, skew=skew, seed=seed, renormalize=renormalize)
                for C in sorted({1, 2, max(1, T * K // E)}):
                    check_reroute(experts_TK, weights_TK, probs_TE, C, E, priority)


def test_reroute_fills_all_room_top1():
    """E*C == T*K and every token prefers e0 then e1 then e2: rerouting leaves nothing dropped."""
    T, E, K, C = 6, 3, 1, 2
    probs_TE = torch.tensor([[0.6, 0.3, 0.1]]).expand(T, E).clone()
    experts_TK = torch.zeros(T, K, dtype=torch.int64)
    weights_TK = torch.full((T, K), 0.6)
    new_experts_TK, new_weights_TK = check_reroute(experts_TK, weights_TK, probs_TE, C, E, "order")
    assert new_experts_TK.flatten().tolist() == [0, 0, 1, 1, 2, 2]
    assert new_weights_TK.flatten().tolist() == pytest.approx([0.6, 0.6, 0.3, 0.3, 0.1, 0.1])


def test_reroute_fills_all_room_top2():
    """Top-2, E*C == T*K, everyone wants experts 0 and 1: dropped slots land on 2 and 3, none dropped."""
    T, E, K, C = 4, 4, 2, 2
    probs_TE = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).expand(T, E).clone()
    experts_TK = torch.tensor([[0, 1]]).expand(T, K).clone()
    weights_TK = probs_TE[:, :2] / probs_TE[:, :2].sum(-1, keepdim=True)
    new_experts_TK, new_weights_TK = check_reroute(experts_TK, weights_TK, probs_TE, C, E, "order")
    assert (new_experts_TK < E).all(), new_experts_TK
    assert new_experts_TK.tolist() == [[0, 1], [0, 1], [2, 3], [2, 3]]
    torch.testing.assert_close(
        new_weights_TK, torch.tensor([[4 / 7, 3 / 7], [4 / 7, 3 / 7], [2 / 7, 1 / 7], [2 / 7, 1 / 7]])
    )
    assert torch.equal(counts_of(new_experts_TK, E), torch.full((E,), C))


def test_reroute_with_total_room_only_forced_drops():
    """With E*C >= T*K (random skewed routings) a slot stays dropped only when every expert it may still use is full."""
    n_dropped = n_dropped_by_drop = 0
    for seed in range(10):
        for T, E, K, skew in [(8, 4, 2, 5.0), (12, 6, 3, 3.0), (9, 3, 1, 8.0), (10, 5, 2, 0.0)]:
            experts_TK, weights_TK, probs_TE = topk_routing(T, E, K, skew=skew, seed=seed)
            C = math.ceil(T * K / E)
            new_experts_TK, _ = check_reroute(experts_TK, weights_TK, probs_TE, C, E, "order")
            n_dropped += int((new_experts_TK == E).sum())
            n_dropped_by_drop += int((apply_capacity(experts_TK, weights_TK, C, E)[0] == E).sum())
            if K == 1:  # one slot per token: a token can always use any expert with room
                assert (new_experts_TK < E).all(), (seed, T, E, K, new_experts_TK)
    assert n_dropped < 0.1 * n_dropped_by_drop, (
        "rerouting should rescue almost every overflowing slot when there is room"
    )


def test_capacity_gradients_flow_through_kept_and_rerouted_weights():
    """d(new weights)/d(weights) is the keep mask; a rerouted slot's weight is differentiable in p_new."""
    T, E, K, C = 6, 3, 1, 2
    logits_TE = torch.tensor([[2.0, 1.0, 0.0]]).repeat(T, 1).requires_grad_(True)
    probs_TE = logits_TE.softmax(-1)
    probs_TE.retain_grad()
    weights_TK, experts_TK = probs_TE.topk(K, dim=-1)
    g_TK = torch.arange(1.0, T * K + 1).view(T, K)

    new_experts_TK, new_weights_TK = apply_capacity(experts_TK, weights_TK, C, E, overflow="drop")
    (new_weights_TK * g_TK).sum().backward()
    keep_T = new_experts_TK[:, 0] < E
    assert keep_T.tolist() == [True, True, False, False, False, False]
    want_TE = torch.zeros(T, E)
    want_TE[:, 0] = g_TK[:, 0] * keep_T  # d/dp0 of the kept weight p0
    torch.testing.assert_close(probs_TE.grad, want_TE)

    logits_TE.grad = None
    probs_TE = logits_TE.softmax(-1)
    probs_TE.retain_grad()
    weights_TK, experts_TK = probs_TE.topk(K, dim=-1)
    new_experts_TK, new_weights_TK = apply_capacity(experts_TK, weights_TK, C, E, probs_TE=probs_TE, overflow="reroute")
    assert new_experts_TK.flatten().tolist() == [0, 0, 1, 1, 2, 2]
    (new_weights_TK * g_TK).sum().backward()
    # w_new = p_new * w_old / p_old with w_old == p_old: d/dp_new = g, and w_old / p_old has zero
    # net derivative in p_old
    want_TE = torch.zeros(T, E)
    want_TE[torch.arange(T), new_experts_TK[:, 0]] = g_TK[:, 0]
    torch.testing.assert_close(probs_TE.grad, want_TE, rtol=1e-5, atol=1e-6)
    assert logits_TE.grad is not None and logits_TE.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- through MoE
def skewed_moe(cfg: MoEConfig, skew: float = 3.0) -> MoE:
    """A MoE whose router bias pushes most tokens to expert 0."""
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.linear.bias.zero_()
        moe.router.linear.bias[0] = skew
    return moe


def route_ref(moe: MoE, x_TD: torch.Tensor, k: int):
    """The router's own (capacity-free) routing for x_TD; deterministic for topk without jitter."""
    with torch.no_grad():
        r = moe.router(x_TD, k)
    return r.experts_TK, r.weights_TK, r.probs_TE


@pytest.mark.parametrize("priority", ["order", "score"])
def test_moe_dropped_tokens_output_zero_and_stats(priority):
    """Through MoE (top-1, small cf): dropped tokens output exactly 0, kept ones the expert's output,
    and the stats report the reference drop fraction and kept counts."""
    T, D, E = 24, 8, 4
    cfg = MoEConfig(
        dim=D,
        hidden_dim=16,
        num_experts=E,
        top_k=1,
        router="topk",
        renormalize=False,
        router_bias=True,
        capacity_factor=0.5,
        capacity_priority=priority,
    )
    moe = skewed_moe(cfg).eval()
    x_TD = torch.randn(T, D)
    res = moe(x_TD)
    C = expert_capacity(T, 1, E, 0.5, 1)
    assert C == 3
    experts_TK, weights_TK, _ = route_ref(moe, x_TD, 1)
    keep_TK, kept_E = ref_drop(experts_TK, weights_TK, C, E, priority)
    n_drop = int((~keep_TK).sum())
    assert n_drop > 0, "test setup must actually drop tokens"
    dropped_T = ~keep_TK[:, 0]
    assert torch.all(res.out[dropped_T] == 0), "a dropped token's MoE output must be exactly zero"
    assert torch.all(res.out[~dropped_T].abs().sum(-1) > 0)
    want_TD = moe_reference(
        x_TD,
        torch.where(keep_TK, experts_TK, E),
        weights_TK * keep_TK,
        moe.experts.w_up.detach(),
        moe.experts.w_down.detach(),
        cfg.expert,
    )
    torch.testing.assert_close(res.out, want_TD, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.stats["dropped_fraction"].float(), torch.tensor(n_drop / T))
    assert torch.equal(res.stats["tokens_per_expert"].cpu(), kept_E)


def test_moe_top2_capacity_matches_reference():
    """Top-2 with capacity through MoE equals the reference MoE on the reference-kept slots."""
    T, D, E, K = 20, 8, 4, 2
    cfg = MoEConfig(dim=D, hidden_dim=16, num_experts=E, top_k=K, router_bias=True, capacity_factor=0.75)
    moe = skewed_moe(cfg, skew=2.0).eval()
    x_TD = torch.randn(T, D)
    res = moe(x_TD)
    C = expert_capacity(T, K, E, 0.75, 1)
    experts_TK, weights_TK, _ = route_ref(moe, x_TD, K)
    keep_TK, kept_E = ref_drop(experts_TK, weights_TK, C, E, "order")
    assert int((~keep_TK).sum()) > 0
    want_TD = moe_reference(
        x_TD,
        torch.where(keep_TK, experts_TK, E),
        weights_TK * keep_TK,
        moe.experts.w_up.detach(),
        moe.experts.w_down.detach(),
        cfg.expert,
    )
    torch.testing.assert_close(res.out, want_TD, rtol=1e-5, atol=1e-6)
    assert torch.equal(res.stats["tokens_per_expert"].cpu(), kept_E)
    torch.testing.assert_close(res.stats["dropped_fraction"].float(), torch.tensor(int((~keep_TK).sum()) / (T * K)))


def test_moe_eval_capacity_factor_in_eval_train_factor_in_train():
    """capacity_factor applies in train mode, eval_capacity_factor in eval mode."""
    T, D, E = 32, 8, 4
    cfg = MoEConfig(
        dim=D,
        hidden_dim=16,
        num_experts=E,
        top_k=1,
        router="topk",
        renormalize=False,
        router_bias=True,
        capacity_factor=0.5,
        eval_capacity_factor=1.0,
    )
    moe = skewed_moe(cfg)
    x_TD = torch.randn(T, D)
    experts_TK, weights_TK, _ = route_ref(moe, x_TD, 1)
    results = {}
    for mode, cf in (("train", 0.5), ("eval", 1.0)):
        moe.train(mode == "train")
        res = moe(x_TD)
        C = expert_capacity(T, 1, E, cf, 1)
        keep_TK, kept_E = ref_drop(experts_TK, weights_TK, C, E, "order")
        assert torch.equal(res.stats["tokens_per_expert"].cpu(), kept_E), mode
        torch.testing.assert_close(res.stats["dropped_fraction"].float(), torch.tensor(int((~keep_TK).sum()) / T))
        results[mode] = kept_E
    assert not torch.equal(results["train"], results["eval"]), "setup must make the two factors differ"


def test_moe_eval_without_eval_factor_uses_capacity_factor():
    """With eval_capacity_factor=None, eval mode keeps the training capacity_factor."""
    T, D, E = 32, 8, 4
    cfg = MoEConfig(
        dim=D, hidden_dim=16, num_experts=E, top_k=1, renormalize=False, router_bias=True, capacity_factor=0.5
    )
    moe = skewed_moe(cfg).eval()
    x_TD = torch.randn(T, D)
    experts_TK, weights_TK, _ = route_ref(moe, x_TD, 1)
    _, kept_E = ref_drop(experts_TK, weights_TK, expert_capacity(T, 1, E, 0.5, 1), E, "order")
    assert torch.equal(moe(x_TD).stats["tokens_per_expert"].cpu(), kept_E)


def test_moe_reroute_through_layer():
    """overflow='reroute' through MoE: counts within C, fewer drops than 'drop', output equals the reference."""
    T, D, E, K = 24, 8, 4, 2
    kw = dict(dim=D, hidden_dim=16, num_experts=E, top_k=K, router_bias=True, capacity_factor=1.0)
    torch.manual_seed(1)
    moe_drop = skewed_moe(MoEConfig(**kw, overflow="drop"), skew=3.0).eval()
    moe_re = MoE(MoEConfig(**kw, overflow="reroute")).eval()
    moe_re.load_state_dict(moe_drop.state_dict())
    x_TD = torch.randn(T, D)
    r_drop, r_re = moe_drop(x_TD), moe_re(x_TD)
    C = expert_capacity(T, K, E, 1.0, 1)
    assert int(r_re.stats["tokens_per_expert"].max()) <= C
    assert float(r_drop.stats["dropped_fraction"]) > 0
    assert float(r_re.stats["dropped_fraction"]) <= float(r_drop.stats["dropped_fraction"])
    experts_TK, weights_TK, probs_TE = route_ref(moe_re, x_TD, K)
    new_experts_TK, new_weights_TK = check_reroute(experts_TK, weights_TK, probs_TE, C, E, "order")
    assert float(r_re.stats["dropped_fraction"]) == pytest.approx(int((new_experts_TK == E).sum()) / (T * K))
    want_TD = moe_reference(
        x_TD, new_experts_TK, new_weights_TK, moe_re.experts.w_up.detach(), moe_re.experts.w_down.detach(), "swiglu"
    )
    torch.testing.assert_close(r_re.out, want_TD, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "sigmoid"])
def test_moe_reroute_never_uses_disabled_expert(router):
    """Rerouted slots never land on a disabled expert (its probability is 0); capacity is shared by the enabled ones."""
    T, D, E, K = 24, 8, 4, 2
    cfg = MoEConfig(
        dim=D, hidden_dim=16, num_experts=E, top_k=K, router=router, capacity_factor=0.75, overflow="reroute"
    )
    moe = MoE(cfg).train()
    moe.disable_experts(1)
    for _ in range(3):
        res = moe(torch.randn(T, D))
        assert int(res.stats["tokens_per_expert"][1]) == 0
        assert int(res.stats["tokens_per_expert"].max()) <= expert_capacity(T, K, E - 1, 0.75, 1)


@pytest.mark.parametrize("overflow", ["drop", "reroute"])
def test_moe_capacity_router_gets_gradients(overflow):
    """With capacity on, the router and the experts used by kept/rerouted slots get finite nonzero grads."""
    T, D, E, K = 24, 8, 4, 2
    cfg = MoEConfig(
        dim=D,
        hidden_dim=16,
        num_experts=E,
        top_k=K,
        router_bias=True,
        capacity_factor=0.75,
        overflow=overflow,
        balance_loss_weight=0.0,
        z_loss_weight=0.0,
    )
    moe = skewed_moe(cfg, skew=2.0).train()
    x_TD = torch.randn(T, D)
    res = moe(x_TD)
    assert float(res.stats["dropped_fraction"]) > 0 or overflow == "reroute"
    (res.out * torch.randn_like(res.out)).sum().backward()
    g = moe.router.linear.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    used_E = res.stats["tokens_per_expert"] > 0
    g_up = moe.experts.w_up.grad
    assert torch.all(g_up[used_E].flatten(1).abs().sum(-1) > 0)
    assert torch.all(g_up[~used_E] == 0)


# ----------------------------------------------------------------------------- batch prioritized routing
# V-MoE (Riquelme et al. 2021): under capacity, the tokens whose best router probability is highest
# keep their slot first. The priority is the router's own score of the chosen expert (the softmax
# probability; the sigmoid affinity for DeepSeek-V3 routing), never the renormalised combine weight,
# which is the constant 1 at top-1 and p1 / (p1 + p2) at top-2.
def reference_routing(moe: MoE, x_TD: torch.Tensor, k: int):
    """Capacity-free routing recomputed from the router's parameters (eval mode, no noise):
    (experts_TK, weights_TK, scores_TK) with scores_TK the softmax probability / sigmoid score of
    each chosen expert before renormalisation."""
    cfg, router = moe.cfg, moe.router
    logits_TE = x_TD @ router.linear.weight.t() + router.linear.bias
    if cfg.router == "sigmoid":
        p_TE = logits_TE.sigmoid()
        experts_TK = (p_TE + router.bias_E.to(p_TE.dtype)).topk(k, dim=-1).indices  # selection on s + b
    else:
        p_TE = logits_TE.softmax(-1)
        experts_TK = p_TE.topk(k, dim=-1).indices
    scores_TK = p_TE.gather(1, experts_TK)
    renorm = cfg.renormalize if cfg.router in ("topk", "sigmoid") else cfg.router in ("noisy_topk", "random")
    weights_TK = scores_TK / scores_TK.sum(-1, keepdim=True) if renorm else scores_TK
    return experts_TK, weights_TK, scores_TK


def prio_moe(router: str, k: int, renormalize: bool, overflow: str = "drop") -> MoE:
    cfg = MoEConfig(
        dim=8,
        hidden_dim=16,
        num_experts=4,
        top_k=k,
        router=router,
        renormalize=renormalize,
        router_bias=True,
        router_dtype="same",
        capacity_factor=0.5,
        capacity_priority="score",
        overflow=overflow,
        balance_loss_weight=0.0,
        z_loss_weight=0.0,
    )
    moe = skewed_moe(cfg, skew=2.0).double()
    if router == "sigmoid":  # a balancing bias, so the selection (on s + b) differs from the score order
        with torch.no_grad():
            moe.router.bias_E.copy_(0.3 * torch.randn(4))
    return moe


def order_kept(experts_TK: torch.Tensor, C: int, E: int) -> torch.Tensor:
    keep_TK, _ = ref_drop(experts_TK, torch.zeros(experts_TK.shape), C, E, "order")
    return torch.where(keep_TK, experts_TK, E)


TOP1_CASES = [
    ("topk", True),
    ("topk", False),
    ("switch", False),
    ("noisy_topk", True),
    ("sigmoid", True),
    ("sigmoid", False),
]


@pytest.mark.filterwarnings("ignore:moekit.*no gradient")
@pytest.mark.parametrize("router,renormalize", TOP1_CASES)
def test_score_priority_top1_keeps_the_tokens_with_the_highest_router_probability(router, renormalize):
    """Top-1 under capacity with capacity_priority='score': at every expert the kept tokens are
    exactly the C with the highest router probability (softmax, or sigmoid score), whatever
    ``renormalize`` does to the combine weight; not the first C in token order. Output and gradients
    equal a reference MoE on those slots."""
    T, E = 40, 4
    moe = prio_moe(router, 1, renormalize).eval()
    C = expert_capacity(T, 1, E, 0.5, 1)
    for seed in range(3):
        x_TD = torch.randn(T, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        res = moe(x_TD)
        with torch.no_grad():
            experts_TK, _, scores_TK = reference_routing(moe, x_TD, 1)
        chosen_T, p_T = experts_TK[:, 0], scores_TK[:, 0]
        kept_T = res.experts_TK[:, 0]
        assert int((kept_T == E).sum()) > 0, "setup must drop tokens"
        assert not torch.equal(res.experts_TK, order_kept(experts_TK, C, E)), "setup must differ from token order"
        for e in range(E):
            mine_M = (chosen_T == e).nonzero().flatten()
            want = set(mine_M[p_T[mine_M].argsort(descending=True)[:C]].tolist())
            assert set((kept_T == e).nonzero().flatten().tolist()) == want, (seed, e)
        # output and gradients against the reference MoE on the slots kept by the reference rule
        keep_TK = torch.zeros_like(experts_TK, dtype=torch.bool)
        for e in range(E):
            mine_M = (chosen_T == e).nonzero().flatten()
            keep_TK[mine_M[p_T[mine_M].argsort(descending=True)[:C]], 0] = True
        _, weights_TK, _ = reference_routing(moe, x_TD, 1)
        want_TD = moe_reference(
            x_TD,
            torch.where(keep_TK, experts_TK, E),
            weights_TK * keep_TK,
            moe.experts.w_up,
            moe.experts.w_down,
            moe.cfg.expert,
        )
        torch.testing.assert_close(res.out, want_TD)
        g_TD = torch.randn_like(want_TD)
        params = [x_TD, moe.router.linear.weight, moe.router.linear.bias, moe.experts.w_up, moe.experts.w_down]
        got = torch.autograd.grad((res.out * g_TD).sum(), params, allow_unused=True)
        want = torch.autograd.grad((want_TD * g_TD).sum(), params, allow_unused=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(
                a if a is not None else torch.zeros_like(b), b if b is not None else torch.zeros_like(a)
            )


TOP2_CASES = [
    ("topk", True),
    ("topk", False),
    ("noisy_topk", True),
    ("sigmoid", True),
    ("sigmoid", False),
    ("random", True),
]


@pytest.mark.parametrize("router,renormalize", TOP2_CASES)
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
def test_score_priority_top2_ranks_by_router_probability(router, renormalize, overflow):
    """Top-2 under capacity with capacity_priority='score' keeps exactly the slots of the V-MoE walk
    (all first choices before any second choice; within a choice, descending top router
    probability, computed here from softmax(logits) / sigmoid(logits)), not by the renormalised
    weight p1 / (p1 + p2); output and gradients equal a reference MoE on those slots."""
    T, E, K = 40, 4, 2
    moe = prio_moe(router, K, renormalize, overflow).eval()
    C = expert_capacity(T, K, E, 0.5, 1)
    differs = 0
    for seed in range(3):
        x_TD = torch.randn(T, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        res = moe(x_TD)
        experts_TK, weights_TK, scores_TK = reference_routing(moe, x_TD, K)
        if overflow == "drop":
            keep_TK, kept_E = ref_drop(experts_TK, scores_TK, C, E, "score")
            new_experts_TK, new_weights_TK = torch.where(keep_TK, experts_TK, E), weights_TK * keep_TK
            assert torch.equal(res.stats["tokens_per_expert"], kept_E)
        else:  # the reroute result on top of the reference drop walk, with the priority from the router scores
            with torch.no_grad():
                p_TE = x_TD @ moe.router.linear.weight.t() + moe.router.linear.bias
                p_TE = (
                    p_TE.sigmoid() / p_TE.sigmoid().sum(-1, keepdim=True) if router == "sigmoid" else p_TE.softmax(-1)
                )
            new_experts_TK, _ = apply_capacity(
                experts_TK.detach(),
                weights_TK.detach(),
                C,
                E,
                probs_TE=p_TE,
                overflow="reroute",
                priority="score",
                scores_TK=scores_TK.detach(),
            )
            keep_TK, _ = ref_drop(experts_TK, scores_TK, C, E, "score")  # reroute leaves the walk's kept slots alone
            assert torch.equal(torch.where(keep_TK, res.experts_TK, E), torch.where(keep_TK, experts_TK, E))
        assert torch.equal(res.experts_TK, new_experts_TK), seed
        differs += not torch.equal(res.experts_TK, order_kept(experts_TK, C, E))
        if overflow == "drop":
            want_TD = moe_reference(
                x_TD, new_experts_TK, new_weights_TK, moe.experts.w_up, moe.experts.w_down, moe.cfg.expert
            )
            torch.testing.assert_close(res.out, want_TD)
            g_TD = torch.randn_like(want_TD)
            params = [x_TD, moe.router.linear.weight, moe.router.linear.bias, moe.experts.w_up, moe.experts.w_down]
            got = torch.autograd.grad((res.out * g_TD).sum(), params)
            want = torch.autograd.grad((want_TD * g_TD).sum(), params)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)
    assert differs, "setup must make score priority differ from token order"


def test_score_priority_random_router_in_training():
    """GShard's random second-expert dispatch (training) with score priority: the priority is the
    token's top-1 probability (its first slot is always kept), the coin flips come from the seed."""
    T, E, K = 40, 4, 2
    moe = prio_moe("random", K, True).train()
    C = expert_capacity(T, K, E, 0.5, 1)
    x_TD = torch.randn(T, 8, dtype=torch.float64)
    torch.manual_seed(7)
    r = moe.router(x_TD, K)
    torch.manual_seed(7)
    res = moe(x_TD)
    experts_TK, _, scores_TK = reference_routing(moe, x_TD, K)
    assert torch.equal(r.experts_TK[:, 0], experts_TK[:, 0])
    keep_TK, kept_E = ref_drop(r.experts_TK, scores_TK * (r.experts_TK < E), C, E, "score")
    assert torch.equal(res.experts_TK, torch.where(keep_TK, r.experts_TK, E))
    assert not torch.equal(res.experts_TK, order_kept(r.experts_TK, C, E))


def test_apply_capacity_ranks_by_scores_not_weights():
    """apply_capacity(priority='score') ranks by ``scores_TK`` when given: renormalised top-1
    weights are all 1, the scores still order the tokens."""
    E, C = 2, 2
    experts_TK = torch.tensor([[0], [0], [0], [0]])
    weights_TK = torch.ones(4, 1)
    scores_TK = torch.tensor([[0.3], [0.9], [0.5], [0.7]])
    new_experts_TK, new_weights_TK = apply_capacity(experts_TK, weights_TK, C, E, priority="score", scores_TK=scores_TK)
    assert new_experts_TK.flatten().tolist() == [2, 0, 2, 0]
    assert new_weights_TK.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]


def test_score_priority_hash_router_is_token_order():
    """The hash router has no scores (every weight is 1/K): 'score' priority is token order."""
    T, E = 32, 4
    kw = dict(dim=8, hidden_dim=16, num_experts=E, top_k=1, router="hash", capacity_factor=0.5)
    ids = torch.randint(0, 1000, (T,))
    x_TD = torch.randn(T, 8)
    a = MoE(MoEConfig(**kw, capacity_priority="score"))
    b = MoE(MoEConfig(**kw, capacity_priority="order"))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x_TD, token_ids=ids).experts_TK, b(x_TD, token_ids=ids).experts_TK)
