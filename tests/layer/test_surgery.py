"""Expert surgery: sparse upcycling, growing the layer, masking experts, reviving dead ones.

Shape legend: T tokens, D model width, E experts, K slots per token, H up-projection width.
"""

from __future__ import annotations

import pytest
import torch

from moekit import FeedForward, MoE, MoEConfig
from moekit.config import EXPERT_KINDS
from reference import dense_ffn, moe_reference

D, F_ = 8, 16


def routed_reference(moe: MoE, x_TD: torch.Tensor, k: int, removed=()) -> torch.Tensor:
    """Top-k softmax MoE computed by hand with the experts in ``removed`` deleted from the layer."""
    E = moe.cfg.num_experts
    keep = [e for e in range(E) if e not in set(removed)]
    W = moe.router.linear.weight.detach()
    logits_TE = x_TD @ W[keep].t()
    if moe.router.linear.bias is not None:
        logits_TE = logits_TE + moe.router.linear.bias.detach()[keep]
    probs_TE = logits_TE.softmax(-1)
    vals_TK, idx_TK = probs_TE.topk(k, dim=-1)
    if moe.cfg.renormalize:
        vals_TK = vals_TK / vals_TK.sum(-1, keepdim=True)
    experts_TK = torch.tensor(keep)[idx_TK]
    return moe_reference(
        x_TD, experts_TK, vals_TK, moe.experts.w_up.detach(), moe.experts.w_down.detach(), moe.cfg.expert
    )


# ----------------------------------------------------------------------------- sparse upcycling
@pytest.mark.parametrize("kind", EXPERT_KINDS)
@pytest.mark.parametrize("router,top_k", [("topk", 1), ("topk", 2), ("topk", 4), ("noisy_topk", 2), ("sigmoid", 2)])
def test_from_dense_equals_dense_ffn(kind, router, top_k):
    """Upcycled MoE with renormalised top-k (all experts equal) reproduces the dense FFN exactly."""
    ffn = FeedForward(D, F_, kind)
    cfg = MoEConfig(dim=D, hidden_dim=F_, num_experts=4, top_k=top_k, expert=kind, router=router, renormalize=True)
    moe = MoE.from_dense(ffn, cfg)
    for e in range(4):
        assert torch.equal(moe.experts.w_up[e], ffn.fused_up) and torch.equal(moe.experts.w_down[e], ffn.w_down)
    x_BSD = torch.randn(2, 5, D)
    want_BSD = dense_ffn(x_BSD, ffn.fused_up.detach(), ffn.w_down.detach(), kind)
    for mode in (True, False):
        moe.train(mode)
        res = moe(x_BSD)
        assert res.out.shape == x_BSD.shape
        torch.testing.assert_close(res.out.detach(), want_BSD, rtol=1e-5, atol=1e-6)


def test_from_dense_float64_and_noise():
    """Upcycling keeps the FFN's dtype; noise makes the experts differ from the FFN (and each other)."""
    ffn = FeedForward(D, F_, "gelu").double()
    cfg = MoEConfig(dim=D, hidden_dim=F_, num_experts=3, top_k=2, expert="gelu")
    moe = MoE.from_dense(ffn, cfg)
    assert moe.experts.w_up.dtype == torch.float64
    x_TD = torch.randn(6, D, dtype=torch.float64)
    torch.testing.assert_close(moe(x_TD).out.detach(), ffn(x_TD).detach(), rtol=1e-6, atol=1e-6)
    noisy = MoE.from_dense(ffn, cfg, noise=0.1)
    diffs = (noisy.experts.w_up.detach() - ffn.w_up.detach()).flatten(1).norm(dim=-1)
    assert torch.all(diffs > 0)
    assert not torch.equal(noisy.experts.w_up[0], noisy.experts.w_up[1])


# ----------------------------------------------------------------------------- add_experts
def test_add_experts_keeps_old_and_grows():
    """add_experts(n) keeps old expert weights and router rows, grows every per-expert tensor, and forward works."""
    cfg = MoEConfig(dim=D, hidden_dim=F_, num_experts=4, top_k=2, router_bias=True)
    moe = MoE(cfg)
    old_up, old_down = moe.experts.w_up.detach().clone(), moe.experts.w_down.detach().clone()
    old_W, old_b = moe.router.linear.weight.detach().clone(), moe.router.linear.bias.detach().clone()
    moe.add_experts(2)
    assert moe.cfg.num_experts == 6 and moe.num_experts == 6
    assert moe.router.num_experts == 6
    assert moe.experts.w_up.shape == (6, D, 2 * F_) and moe.experts.w_down.shape == (6, F_, D)
    assert moe.router.linear.weight.shape == (6, D) and moe.router.linear.bias.shape == (6,)
    assert torch.equal(moe.experts.w_up[:4], old_up) and torch.equal(moe.experts.w_down[:4], old_down)
    assert torch.equal(moe.router.linear.weight[:4], old_W) and torch.equal(moe.router.linear.bias[:4], old_b)
    assert moe.expert_usage.shape == (6,) and moe.steps_unused.shape == (6,) and moe.router.disabled_E.shape == (6,)
    assert not torch.equal(moe.experts.w_up[4], moe.experts.w_up[5]), "fresh experts must be freshly initialised"
    res = moe(torch.randn(3, 4, D))
    assert res.out.shape == (3, 4, D) and res.stats["tokens_per_expert"].shape == (6,)
    assert int(res.stats["tokens_per_expert"].sum()) == 3 * 4 * 2
    res.out.sum().backward()
    assert moe.router.linear.weight.grad.shape == (6, D)


def test_add_experts_unreachable_new_experts_keep_output():
    """New experts the router never picks leave the layer's output unchanged (renormalised top-k)."""
    cfg = MoEConfig(dim=D, hidden_dim=F_, num_experts=4, top_k=2, router_bias=True)
    moe = MoE(cfg).eval()
    x_TD = torch.randn(10, D)
    before = moe(x_TD).out.detach()
    moe.add_experts(2)
    with torch.no_grad():
        moe.router.linear.bias[4:] = -1e4
    res = moe(x_TD)
    torch.testing.assert_close(res.out.detach(), before, rtol=1e-5, atol=1e-6)
    assert res.stats["tokens_per_expert"][4:].tolist() == [0, 0]


def test_add_experts_copy_from():
    """add_experts(1, copy_from=j) copies expert j's weights and router row: the new logit equals j's."""
    cfg = MoEConfig(dim=D, hidden_dim=F_, num_experts=4, top_k=2, router_bias=True)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.linear.bias.normal_()
    moe.add_experts(1, copy_from=2)
    assert torch.equal(moe.experts.w_up[4], moe.experts.w_up[2])
    assert torch.equal(moe.experts.w_down[4], moe.experts.w_down[2])
    assert torch.equal(moe.router.linear.weight[4], moe.router.linear.weight[2])
    assert torch.equal(moe.router.linear.bias[4], moe.router.linear.bias[2])
    x_TD = torch.randn(7, D)
    logits_TE = moe.router.logits(x_TD)
    torch.testing.assert_close(logits_TE[:, 4], logits_TE[:, 2], rtol=0, atol=0)
    moe.add_experts(2, copy_from=[0, 1])
    assert torch.equal(moe.experts.w_up[5], moe.experts.w_up[0]) and torch.equal(
        moe.experts.w_up[6], moe.experts.w_up[1]
    )
    assert torch.equal(moe.router.linear.weight[6], moe.router.linear.weight[1])


@pytest.mark.parametrize("router", ["noisy_topk", "sigmoid"])
def test_add_experts_copy_from_copies_all_router_state(router):
    """A copied expert is routed exactly like its source: noisy top-k's noise row and the sigmoid
    router's selection bias too."""
    moe = MoE(MoEConfig(dim=D, hidden_dim=F_, num_experts=4, top_k=2, router=router))
    with torch.no_grad():
        if router == "noisy_topk":
            moe.router.noise.weight.normal_()
        else:
            moe.router.bias_E.copy_(torch.tensor([0.3, -0.2, 0.5, -0.1]))
    moe.add_experts(1, copy_from=2)
    assert torch.equal(moe.router.linear.weight[4], moe.router.linear.weight[2])
    if router == "noisy_topk":
        assert torch.equal(moe.router.noise.weight[4], moe.router.noise.weight[2]), "noise row not copied"
    else:
        assert float(moe.router.bias_E[4]) == float(moe.router.bias_E[2]), "selection bias not copied"
        assert moe.router.bias_E[:4].tolist() == pytest.approx([0.3, -0.2, 0.5, -0.1])


def test_add_experts_keeps_disabled_and_mode():
    """Growing keeps the disabled mask of old experts (new ones enabled) and the train/eval mode."""
    moe = MoE(MoEConfig(dim=D, hidden_dim=F_, num_experts=4, top_k=2)).eval()
    moe.disable_experts(1)
    moe.add_experts(2)
    assert moe.router.disabled_E.tolist() == [False, True, False, False, False, False]
    assert not moe.router.training
    res = moe(torch.randn(20, D))
    assert int(res.stats["tokens_per_expert"][1]) == 0


def test_add_experts_keeps_parameter_dtype(router="noisy_topk"):
    """A float64 layer stays float64 after add_experts (router rows kept exactly, not rounded to fp32)."""
    moe = MoE(MoEConfig(dim=D, hidden_dim=F_, num_experts=4, top_k=2, router=router, router_dtype="same")).double()
    old_W = moe.router.linear.weight.detach().clone()
    moe.add_experts(1)
    dtypes = {name: p.dtype for name, p in moe.named_parameters()}
    assert set(dtypes.values()) == {torch.float64}, dtypes
    assert torch.equal(moe.router.linear.weight[:4], old_W)


# ----------------------------------------------------------------------------- disable / enable
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_disable_experts_matches_removed_reference(renormalize, k):
    """A disabled expert gets no token, weights sum to 1 (renormalize), and the output equals a layer without it."""
    cfg = MoEConfig(dim=D, hidden_dim=F_, num_experts=5, top_k=k, renormalize=renormalize, router_bias=True)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.router.linear.bias[3] = 2.0  # expert 3 is popular, so disabling it changes many tokens
    x_TD = torch.randn(16, D)
    original = moe(x_TD).out.detach()
    moe.disable_experts([3])
    res = moe(x_TD)
    assert int(res.stats["tokens_per_expert"][3]) == 0
    r = moe.router(x_TD, k)
    assert not (r.experts_TK == 3).any()
    if renormalize:
        torch.testing.assert_close(r.weights_TK.sum(-1).detach(), torch.ones(16))
    torch.testing.assert_close(res.out.detach(), routed_reference(moe, x_TD, k, removed=[3]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(res.out.detach(), original)
    moe.enable_experts()
    torch.testing.assert_close(moe(x_TD).out.detach(), original, rtol=0, atol=0)


def test_disable_two_then_enable_one():
    """enable_experts(ids) re-enables only those ids."""
    moe = MoE(MoEConfig(dim=D, hidden_dim=F_, num_experts=5, top_k=2)).eval()
    x_TD = torch.randn(12, D)
    moe.disable_experts([0, 4])
    moe.enable_experts(4)
    assert moe.router.disabled_E.tolist() == [True, False, False, False, False]
    torch.testing.assert_close(
        moe(x_TD).out.detach(), routed_reference(moe, x_TD, 2, removed=[0]), rtol=1e-5, atol=1e-6
    )


def test_disable_all_or_too_many_raises():
    """Disabling every expert, or leaving fewer enabled experts than top_k, raises ValueError."""
    moe = MoE(MoEConfig(dim=D, hidden_dim=F_, num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="every expert"):
        moe.disable_experts([0, 1, 2, 3])
    assert not moe.router.disabled_E.any(), "a failed disable must not leave experts disabled"
    x_TD = torch.randn(3, D)
    with pytest.raises(ValueError, match="top_k"):
        moe.disable_experts([0, 1, 2])
        moe(x_TD)
    moe.enable_experts()
    moe.disable_experts([0, 1])
    assert moe(x_TD).out.shape == (3, D)  # top_k == enabled is fine
    with pytest.raises(ValueError, match="top_k"):
        moe(x_TD, top_k=3)


# ----------------------------------------------------------------------------- dead experts
def dead_moe(revive_after=None, E=4, k=2):
    """A MoE whose router bias makes the last expert unreachable."""
    cfg = MoEConfig(
        dim=D,
        hidden_dim=F_,
        num_experts=E,
        top_k=k,
        router_bias=True,
        revive_after=revive_after,
        usage_decay=0.5,
        revive_noise=1e-2,
    )
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.router.linear.bias.zero_()
        moe.router.linear.bias[E - 1] = -1e4
    return moe


def test_revive_dead_experts():
    """An expert with no token for N steps is re-initialised near the most used live expert, router row reset."""
    moe = dead_moe()
    E = 4
    usage_E = torch.full((E,), 1.0 / E)
    for _ in range(3):
        res = moe(torch.randn(32, D))
        moe.after_optimizer_step()
        counts_E = res.stats["tokens_per_expert"].float()
        usage_E = 0.5 * usage_E + 0.5 * counts_E / counts_E.sum()
        torch.testing.assert_close(res.stats["expert_usage"], usage_E)
    assert moe.steps_unused.tolist() == [0, 0, 0, 3]
    assert moe.revive_dead_experts(4) == []
    src = int(usage_E[:3].argmax())
    old_up, old_W = moe.experts.w_up.detach().clone(), moe.router.linear.weight.detach().clone()
    assert moe.revive_dead_experts(3) == [3]
    new_up = moe.experts.w_up.detach()
    assert torch.equal(new_up[:3], old_up[:3]), "live experts must not change"
    rel_E = (new_up - old_up[src]).flatten(1).norm(dim=-1) / old_up[src].norm()
    assert 0 < rel_E[3] < 0.05, rel_E
    assert rel_E[3] < rel_E[[e for e in range(3) if e != src]].min(), (
        "revived expert is not a copy of the most used one"
    )
    assert float(moe.router.linear.bias.detach()[3]) > -1.0, "the dead expert's router row must be reset"
    assert not torch.equal(moe.router.linear.weight[3], old_W[3])
    assert torch.equal(moe.router.linear.weight[:3], old_W[:3])
    assert moe.steps_unused.tolist() == [0, 0, 0, 0]
    assert float(moe.expert_usage[3]) == pytest.approx(1.0 / E)
    res = moe(torch.randn(64, D))
    assert int(res.stats["tokens_per_expert"][3]) > 0, "a revived expert must be reachable again"


def test_eval_forwards_do_not_count_unused_steps():
    """Eval-mode forwards neither advance steps_unused nor update usage."""
    moe = dead_moe().eval()
    for _ in range(3):
        moe(torch.randn(16, D))
    assert moe.steps_unused.tolist() == [0, 0, 0, 0]
    assert int(moe.step_counts.sum()) == 0, "eval forwards do not count toward the step's load"
    assert moe.expert_usage.tolist() == [0.25] * 4


def test_automatic_revival_via_revive_after():
    """With cfg.revive_after=N the dead expert is re-initialised by after_optimizer_step after N idle steps."""
    moe = dead_moe(revive_after=3)
    up0 = moe.experts.w_up.detach().clone()
    for step in range(2):
        moe(torch.randn(32, D))
        assert moe.after_optimizer_step() == []
        assert torch.equal(moe.experts.w_up[3], up0[3]), f"revived too early (after {step + 1} steps)"
    assert int(moe.steps_unused[3]) == 2
    for _ in range(3):
        moe(torch.randn(32, D))
        assert torch.equal(moe.experts.w_up[3], up0[3]), "forwards alone must not revive"
    assert moe.after_optimizer_step() == [3]
    assert not torch.equal(moe.experts.w_up[3], up0[3])
    assert float(moe.router.linear.bias.detach()[3]) > -1.0
    assert int(moe.steps_unused[3]) == 0
    res = moe(torch.randn(32, D))
    assert int(res.stats["tokens_per_expert"][3]) > 0, "the revived expert is routed to on the next step"


def test_revival_never_copies_a_disabled_expert():
    """The source of a revived expert is the most used *enabled* expert, never a disabled (possibly faulty) one."""
    moe = dead_moe(k=2)
    with torch.no_grad():
        moe.router.linear.bias[0] = 5.0  # expert 0 takes every first slot: by far the most used
    for _ in range(3):
        moe(torch.randn(32, D))
        moe.after_optimizer_step()
    assert int(moe.expert_usage.argmax()) == 0 and int(moe.steps_unused[3]) == 3
    moe.disable_experts(0)  # e.g. its device failed
    src = 1 + int(moe.expert_usage[1:3].argmax())
    assert moe.revive_dead_experts(3) == [3]
    up = moe.experts.w_up.detach()
    dist_E = (up - up[3]).flatten(1).norm(dim=-1)
    assert dist_E[src] < dist_E[0], "revived expert copied the disabled expert 0"


def test_reenabled_expert_is_not_revived():
    """An expert disabled during training is not wiped by revive_after as soon as it is re-enabled."""
    cfg = MoEConfig(dim=D, hidden_dim=F_, num_experts=4, top_k=2, revive_after=3)
    moe = MoE(cfg).train()
    moe.disable_experts(2)
    for _ in range(5):
        moe(torch.randn(32, D))
        moe.after_optimizer_step()
    assert int(moe.steps_unused[2]) == 0, "a disabled expert is not idle-counted"
    up2 = moe.experts.w_up[2].detach().clone()
    moe.enable_experts()
    moe(torch.randn(32, D))
    moe.after_optimizer_step()
    assert torch.equal(moe.experts.w_up[2], up2), "re-enabled expert 2 was re-initialised as 'dead'"


def test_automatic_revival_keeps_gradient_accumulation_working():
    """Two micro-batches then one backward (gradient accumulation) still works when revive_after fires in between."""
    moe = dead_moe(revive_after=1)
    loss1 = moe(torch.randn(16, D)).out.sum()  # expert 3 unused: steps_unused[3] = 1
    loss2 = moe(torch.randn(16, D)).out.sum()
    (loss1 + loss2).backward()
    assert torch.isfinite(moe.experts.w_up.grad).all()
    assert moe.after_optimizer_step() == [3], "revival happens after the step, not between micro-batches"
