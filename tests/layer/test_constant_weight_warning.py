"""The constant-weight warning (top-1 with renormalised weights: every weight is p / p = 1, so the
gate gets no gradient from the layer's output) beyond ``MoE(cfg)`` with ``cfg.top_k=1``: a
per-call ``top_k`` override in training, and :class:`HierarchicalMoE` at construction. Each
warning is checked to be true: the gate's gradient from the output is ~0 when it fires, clearly
nonzero where it does not."""

from __future__ import annotations

import warnings

import pytest
import torch

from moekit import HierarchicalMoE, MoE, MoEConfig


def _no_gradient_warnings(record) -> list:
    return [w for w in record if "no gradient" in str(w.message)]


def _output_grad(module, x, gate, **kw) -> float:
    """Largest |gradient| of ``gate``'s weight from a random projection of the output (no aux losses)."""
    module.zero_grad()
    out = module(x, **kw).out
    (out * torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))).sum().backward()
    g = gate.weight.grad
    return 0.0 if g is None else float(g.abs().max())


X = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- per-call top_k
def _moe(**kw) -> MoE:
    cfg = dict(dim=16, hidden_dim=8, num_experts=4, top_k=2, router_dtype="same", balance_loss_weight=0.0)
    cfg.update(z_loss_weight=0.0, **kw)
    return MoE(MoEConfig(**cfg)).double()


def test_per_call_top1_override_warns_once_in_training():
    moe = _moe(renormalize=True)
    with pytest.warns(
        UserWarning, match=r"router 'topk' with top_k=1 \(this call's top_k override.*renormalize=False"
    ) as rec:
        grad = _output_grad(moe, X, moe.router.linear, top_k=1)
    assert [w.filename for w in _no_gradient_warnings(rec)] == [__file__], "one warning, at the caller's line"
    assert grad < 1e-10, grad  # the warning is true
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe(X, top_k=1)  # once per layer
        moe(X, top_k=1).out.sum().backward()


@pytest.mark.parametrize(
    "kw, call",
    [
        (dict(renormalize=False), dict(top_k=1)),  # Switch-style weights: the softmax probability
        (dict(renormalize=True), dict(top_k=2)),  # the configured k
        (dict(renormalize=True), dict(top_k=3)),
        (dict(renormalize=True, router="switch", top_k=1), dict(top_k=1)),
    ],
)
def test_no_warning_where_the_weight_is_not_constant(kw, call):
    moe = _moe(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad = _output_grad(moe, X, moe.router.linear, **call)
    assert grad > 1e-4, grad


def test_no_warning_at_inference():
    """Decoding with fewer experts (``moekit generate --top-k-experts 1``) trains nothing: no warning
    in eval mode or without grad; the first training call still warns."""
    moe = _moe(renormalize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe.eval()
        moe(X, top_k=1)
        moe.train()
        with torch.no_grad():
            moe(X, top_k=1)
    with pytest.warns(UserWarning, match="this call's top_k override"):
        moe(X, top_k=1)


def test_lm_per_call_override_warns_at_the_callers_line():
    from moekit.config import LMConfig
    from moekit.models.lm import MoETransformer

    model = MoETransformer(
        LMConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, max_seq_len=16, moe=MoEConfig(16, 8, 4, top_k=2))
    )
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model(idx, top_k=1)
        model(idx, top_k=1)
    mine = _no_gradient_warnings(rec)
    assert len(mine) == 2 and {w.filename for w in mine} == {__file__}, [(w.filename, str(w.message)) for w in mine]


# ---------------------------------------------------------------------------------------------- HierarchicalMoE
def _hmoe(kg, ke, renormalize=True, groups=2, per_group=4) -> HierarchicalMoE:
    return HierarchicalMoE(
        16, 8, groups, per_group, kg, ke, importance_loss_weight=0.0, balance_loss_weight=0.0, renormalize=renormalize
    ).double()


@pytest.mark.parametrize(
    "kg, ke, names, gates",
    [
        (1, 2, "top_k_groups=1", ["primary"]),
        (2, 1, "top_k_experts=1", ["group"]),
        (1, 1, "top_k_groups=1 and top_k_experts=1", ["primary", "group"]),
    ],
)
def test_hierarchical_top1_with_renormalisation_warns(kg, ke, names, gates):
    with pytest.warns(UserWarning, match=rf"HierarchicalMoE with {names} gets no gradient.*renormalize=False") as rec:
        m = _hmoe(kg, ke)
    assert [w.filename for w in _no_gradient_warnings(rec)] == [__file__]
    _output_grad(m, X, m.primary)
    primary = float(m.primary.weight.grad.abs().max())
    group = max(float(g.weight.grad.abs().max()) for g in m.group_gates if g.weight.grad is not None)
    assert (primary < 1e-10) == ("primary" in gates), primary
    assert (group < 1e-10) == ("group" in gates), group


@pytest.mark.parametrize(
    "kg, ke, renormalize, groups, per_group",
    [
        (1, 2, False, 2, 4),  # raw softmax probabilities
        (1, 1, False, 2, 4),
        (2, 2, True, 2, 4),  # two choices at both levels
        (1, 2, True, 1, 4),  # a single group: the primary gate has nothing to choose
        (2, 1, True, 2, 1),  # a single expert per group
    ],
)
def test_hierarchical_no_warning_where_the_weights_are_not_constant(kg, ke, renormalize, groups, per_group):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = _hmoe(kg, ke, renormalize, groups, per_group)
    _output_grad(m, X, m.primary)
    if groups > 1:
        assert float(m.primary.weight.grad.abs().max()) > 1e-4
    if per_group > 1:
        assert max(float(g.weight.grad.abs().max()) for g in m.group_gates if g.weight.grad is not None) > 1e-4
