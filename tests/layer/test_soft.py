"""Soft MoE (Puigcerver et al. 2023)."""

import pytest
import torch
import torch.nn.functional as F

from moekit import SoftMoE


def _moe(**kw):
    args = dict(dim=8, hidden_dim=16, num_experts=3, slots_per_expert=2)
    args.update(kw)
    return SoftMoE(**args).double()


def test_shapes_and_weight_sums():
    moe = _moe()
    res = moe(torch.randn(2, 5, 8, dtype=torch.float64))
    assert res.out.shape == (2, 5, 8)
    assert float(res.aux_loss) == 0.0
    assert res.dispatch_BNM.shape == (2, 5, 6) and res.combine_BNM.shape == (2, 5, 6)
    torch.testing.assert_close(res.dispatch_BNM.sum(1), torch.ones(2, 6, dtype=torch.float64))  # columns over tokens
    torch.testing.assert_close(res.combine_BNM.sum(2), torch.ones(2, 5, dtype=torch.float64))  # rows over slots


def test_token_permutation_equivariance():
    moe = _moe()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    perm = torch.randperm(7)
    torch.testing.assert_close(moe(x[:, perm]).out, moe(x).out[:, perm])


def test_not_causal():
    moe = _moe()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[0, -1] += 1.0  # change only the last token
    assert not torch.allclose(moe(x).out[0, 0], moe(x2).out[0, 0])  # the first token's output moves


def test_every_slot_and_expert_gets_gradient():
    moe = _moe()
    moe(torch.randn(3, 5, 8, dtype=torch.float64)).out.square().sum().backward()
    assert (moe.phi_DM.grad.abs().sum(0) > 0).all()  # every slot column
    assert moe.scale.grad is not None and moe.scale.grad.abs() > 0
    for p in (moe.experts.w_up, moe.experts.w_down):
        assert (p.grad.flatten(1).abs().sum(1) > 0).all()  # every expert


def test_matches_reference_equations():
    moe = _moe(slots_per_expert=2, expert="gelu")
    with torch.no_grad():
        moe.scale.fill_(1.7)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    E, S = 3, 2
    ref = torch.empty_like(x)
    for b in range(2):
        xn = x[b] / x[b].norm(dim=-1, keepdim=True)
        phin = moe.phi_DM / moe.phi_DM.norm(dim=0, keepdim=True)
        logits = 1.7 * xn @ phin  # (N, M)
        D = torch.exp(logits) / torch.exp(logits).sum(0, keepdim=True)
        C = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
        slots = D.t() @ x[b]  # (M, D)
        ys = []
        for m in range(E * S):
            e = m // S
            ys.append(F.gelu(slots[m] @ moe.experts.w_up[e]) @ moe.experts.w_down[e])
        ref[b] = C @ torch.stack(ys)
    torch.testing.assert_close(moe(x).out, ref)


def test_unnormalised_variant_and_loop_backend_agree():
    moe = _moe(normalize=False)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    out = moe(x).out
    moe.backend = "loop"
    torch.testing.assert_close(moe(x).out, out)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoE(8, 8, 2, 0)
    with pytest.raises(ValueError, match="expert must be"):
        SoftMoE(8, 8, 2, 1, expert="tanh")


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch, tokens, dim"):
        SoftMoE(8, 8, 2, 1)(torch.randn(4, 8))  # Soft MoE needs sequences: it mixes over their tokens


def test_empty_inputs():
    assert SoftMoE(8, 8, 2, 1)(torch.randn(2, 0, 8)).out.shape == (2, 0, 8)
