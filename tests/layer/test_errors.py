"""Bad inputs fail early with a ValueError/TypeError that names the offending argument.

Shape legend: T tokens, D model width, E experts.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from moekit import FeedForward, MoE, MoEConfig

D, F_ = 8, 16


def cfg(**kw) -> MoEConfig:
    base = dict(dim=D, hidden_dim=F_, num_experts=4, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


# ----------------------------------------------------------------------------- input tensor
@pytest.mark.parametrize("shape", [(3, D + 1), (D - 1,), (2, 3, 1)])
def test_wrong_last_dimension(shape):
    """x whose last dimension is not cfg.dim is rejected, naming dim."""
    with pytest.raises(ValueError, match=r"dim"):
        MoE(cfg())(torch.randn(shape))


def test_scalar_input():
    """A 0-d tensor is rejected, naming dim."""
    with pytest.raises(ValueError, match=r"dim"):
        MoE(cfg())(torch.tensor(1.0))


@pytest.mark.parametrize("x", [[[0.0] * D], np.zeros((2, D), dtype=np.float32), 3.0])
def test_non_tensor_input(x):
    """Lists, numpy arrays and floats are rejected with TypeError naming x."""
    with pytest.raises(TypeError, match=r"\bx\b.*Tensor"):
        MoE(cfg())(x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input(dtype):
    """Integer/bool inputs are rejected with TypeError naming x and floating point."""
    with pytest.raises(TypeError, match=r"\bx\b.*floating"):
        MoE(cfg())(torch.zeros(3, D, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite(bad):
    """check_finite=True raises on NaN/inf; check_finite=False does not check."""
    x_TD = torch.randn(4, D)
    x_TD[2, 3] = bad
    with pytest.raises(ValueError, match=r"\bx\b.*(NaN|inf)"):
        MoE(cfg(check_finite=True))(x_TD)
    res = MoE(cfg(check_finite=False))(x_TD)
    assert res.out.shape == (4, D)
    assert MoE(cfg(check_finite=True))(torch.randn(4, D)).out.shape == (4, D)


def test_empty_batch():
    """Zero tokens give an empty output of the right shape (or a clear ValueError naming x), not a reshape crash."""
    moe = MoE(cfg())
    for x in (torch.randn(0, D), torch.randn(2, 0, D)):
        try:
            res = moe(x)
        except ValueError as err:
            assert "x" in str(err)
            continue
        assert res.out.shape == x.shape
        assert torch.isfinite(res.aux_loss)


# ----------------------------------------------------------------------------- top_k
@pytest.mark.parametrize("k", [0, -1, 5, 2.0, True])
def test_top_k_in_config(k):
    """top_k <= 0, > num_experts, or not an int is rejected by MoEConfig, naming top_k."""
    with pytest.raises(ValueError, match="top_k"):
        cfg(top_k=k)


@pytest.mark.parametrize("k", [0, -2, 5, 1.5, "2", True])
def test_top_k_per_call(k):
    """A per-call top_k <= 0, > num_experts, or not an int is rejected, naming top_k."""
    with pytest.raises(ValueError, match="top_k"):
        MoE(cfg())(torch.randn(3, D), top_k=k)


def test_top_k_per_call_valid():
    """A valid per-call top_k is honoured (T*k routed slots)."""
    res = MoE(cfg())(torch.randn(3, D), top_k=4)
    assert int(res.stats["tokens_per_expert"].sum()) == 12


def test_switch_top_k():
    """router='switch' with top_k != 1 is rejected in config and per call."""
    with pytest.raises(ValueError, match="top_k"):
        cfg(router="switch", top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        MoE(cfg(router="switch", top_k=1))(torch.randn(3, D), top_k=2)


# ----------------------------------------------------------------------------- capacity
@pytest.mark.parametrize("cf", [0, 0.0, -1.0, float("nan"), "1.0", True])
def test_capacity_factor_in_config(cf):
    """capacity_factor / eval_capacity_factor <= 0 (or NaN, or not a number) is rejected, naming the field."""
    with pytest.raises(ValueError, match="capacity_factor"):
        cfg(capacity_factor=cf)
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        cfg(eval_capacity_factor=cf)


@pytest.mark.parametrize("cf", [0, -0.5, float("nan"), "1.0"])
def test_capacity_factor_per_call(cf):
    """A per-call capacity_factor override <= 0, NaN or non-numeric is rejected, naming capacity_factor."""
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(cfg())(torch.randn(3, D), capacity_factor=cf)


def test_capacity_factor_infinite():
    """capacity_factor=inf is either rejected (naming capacity_factor) or means 'no limit' - never an OverflowError."""
    try:
        c = cfg(capacity_factor=math.inf)
    except ValueError as err:
        assert "capacity_factor" in str(err)
    else:
        res = MoE(c)(torch.randn(6, D))
        assert float(res.stats["dropped_fraction"]) == 0.0
    moe = MoE(cfg())
    try:
        res = moe(torch.randn(6, D), capacity_factor=math.inf)
    except ValueError as err:
        assert "capacity_factor" in str(err)
    else:
        assert float(res.stats["dropped_fraction"]) == 0.0


def test_min_capacity_in_config():
    """min_capacity must be a positive integer."""
    with pytest.raises(ValueError, match="min_capacity"):
        cfg(capacity_factor=1.0, min_capacity=0)


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "field,value",
    [
        ("router", "top2"),
        ("expert", "tanh"),
        ("backend", "cuda"),
        ("overflow", "spill"),
        ("capacity_priority", "random"),
        ("router_dtype", "bfloat16"),
    ],
)
def test_unknown_names(field, value):
    """Unknown router/expert/backend/overflow/priority names raise ValueError naming the field and the bad value."""
    with pytest.raises(ValueError, match=rf"{field}.*{value}"):
        cfg(**{field: value})


@pytest.mark.parametrize("router", ["expert_choice", "hash"])
def test_reroute_needs_scored_token_choice_router(router):
    """overflow='reroute' with a router that has no per-token scores is rejected, naming overflow."""
    with pytest.raises(ValueError, match="overflow"):
        cfg(router=router, overflow="reroute", capacity_factor=1.0)


def test_from_dict_unknown_field():
    """MoEConfig.from_dict names unknown fields instead of a TypeError from the constructor."""
    with pytest.raises(ValueError, match="capacity_facter"):
        MoEConfig.from_dict(dict(dim=D, hidden_dim=F_, capacity_facter=1.0))


def test_cfg_type():
    """MoE(cfg) with a dict instead of MoEConfig raises TypeError naming cfg."""
    with pytest.raises(TypeError, match="cfg"):
        MoE(dict(dim=D, hidden_dim=F_))


def test_backend_triton_on_cpu():
    """backend='triton' with a CPU input raises ValueError naming backend (and suggests 'auto'),
    unless Triton's CPU interpreter is on (a pytest-xdist worker that ran the interpreter tests)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: the triton backend runs on the CPU")
    moe = MoE(cfg(backend="triton"))
    with pytest.raises(ValueError, match=r"backend.*triton"):
        moe(torch.randn(3, D))


# ----------------------------------------------------------------------------- heterogeneous experts
class Widen(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def test_heterogeneous_wrong_count():
    """A list of experts whose length differs from cfg.num_experts is rejected, naming num_experts."""
    with pytest.raises(ValueError, match="num_experts"):
        MoE(cfg(num_experts=4), experts=[FeedForward(D, F_) for _ in range(3)])


@pytest.mark.parametrize("bad", [Widen(D, D + 1), Widen(D + 2, D), Widen(D, 1)])
def test_heterogeneous_wrong_dims(bad):
    """An expert that does not map (N, dim) -> (N, dim) is rejected, naming its index."""
    experts = [FeedForward(D, F_), bad, FeedForward(D, 2 * F_), FeedForward(D, F_, "relu")]
    with pytest.raises(ValueError, match=r"experts\[1\]"):
        MoE(cfg(), experts=experts)


def test_heterogeneous_not_a_module():
    """A non-Module entry is rejected with TypeError naming its index."""
    experts = [FeedForward(D, F_), FeedForward(D, F_), lambda x: x, FeedForward(D, F_)]
    with pytest.raises(TypeError, match=r"experts\[2\]"):
        MoE(cfg(), experts=experts)


def test_heterogeneous_ok():
    """Mixed widths and kinds are accepted and run."""
    experts = [FeedForward(D, F_), FeedForward(D, 2 * F_, "gelu"), FeedForward(D, 4, "relu"), Widen(D, D)]
    assert MoE(cfg(), experts=experts)(torch.randn(5, D)).out.shape == (5, D)


# ----------------------------------------------------------------------------- hash router
def test_hash_router_needs_token_ids():
    """router='hash' without token_ids raises ValueError naming token_ids."""
    moe = MoE(cfg(router="hash"))
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(2, 3, D))


@pytest.mark.parametrize("shape", [(6,), (2, 4), (3, 2), (2, 3, 1)])
def test_hash_router_wrong_token_id_shape(shape):
    """token_ids not shaped like x.shape[:-1] raise ValueError naming token_ids."""
    moe = MoE(cfg(router="hash"))
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(2, 3, D), token_ids=torch.zeros(shape, dtype=torch.int64))


def test_hash_router_token_id_types():
    """Float or non-tensor token_ids raise TypeError naming token_ids; good ids work."""
    moe = MoE(cfg(router="hash"))
    x_BSD = torch.randn(2, 3, D)
    with pytest.raises(TypeError, match="token_ids"):
        moe(x_BSD, token_ids=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="token_ids"):
        moe(x_BSD, token_ids=[[0, 1, 2], [3, 4, 5]])
    assert moe(x_BSD, token_ids=torch.arange(6).view(2, 3)).out.shape == (2, 3, D)


# ----------------------------------------------------------------------------- surgery arguments
def test_surgery_argument_errors():
    """Surgery methods name their bad argument: n, copy_from, experts, ffn, and the cfg/FFN mismatch."""
    moe = MoE(cfg())
    with pytest.raises(ValueError, match=r"\bn\b"):
        moe.add_experts(0)
    with pytest.raises(ValueError, match="copy_from"):
        moe.add_experts(1, copy_from=7)
    with pytest.raises(ValueError, match="copy_from"):
        moe.add_experts(3, copy_from=[0, 1])
    with pytest.raises(ValueError, match="experts"):
        moe.disable_experts(4)
    with pytest.raises(ValueError, match="experts"):
        moe.disable_experts([-1])
    with pytest.raises(TypeError, match="ffn"):
        MoE.from_dense(nn.Linear(D, D), cfg())
    with pytest.raises(ValueError, match="hidden_dim"):
        MoE.from_dense(FeedForward(D, 2 * F_), cfg())
    with pytest.raises(ValueError, match="expert"):
        MoE.from_dense(FeedForward(D, F_, "relu"), cfg())
    assert moe.num_experts == 4, "failed add_experts calls must not change the layer"


def test_empty_batch_backward_works():
    """A batch with no tokens gives an empty output whose backward runs (gradient accumulation loops may hit one)."""
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2))
    x = torch.randn(2, 0, 8, requires_grad=True)
    res = moe(x)
    (res.out.sum() + res.aux_loss).backward()
    assert res.out.shape == (2, 0, 8) and x.grad.shape == (2, 0, 8)
