"""``routing_plan`` (the fused counting-sort kernels) against ``plan_dispatch`` under Triton's CPU
interpreter: the same order, counts and inverse permutation, exactly, on the one-program path
(S <= FUSED_MAX_S) and the multi-block path, with empty slots, capacity bounds, E = 1 and
E = 512, int32 and int64 ids; and the errors for bad input.

The interpreter is switched on by this folder's conftest.py.
"""

import pytest
import torch

pytest.importorskip("triton")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moekit.kernels.triton import (  # noqa: E402
    INTERPRETED,
    routing,  # noqa: E402
    routing_plan,
)
from moekit.layer.dispatch import apply_capacity, expert_capacity, plan_dispatch  # noqa: E402

if not INTERPRETED:
    pytest.skip("the Triton kernels are not interpreted in this process (see conftest.py)", allow_module_level=True)


def _ids(T, K, E, empty=0.0):
    experts_TK = torch.randint(0, E, (T, K))
    return torch.where(torch.rand(T, K) < empty, E, experts_TK)


def _check(experts_TK, E, **kw):
    """routing_plan == plan_dispatch, field by field, dtypes included."""
    ref = plan_dispatch(experts_TK.long(), E, max_rows=kw.get("max_rows"), has_empty=kw.get("has_empty", False))
    got = routing_plan(experts_TK, E, **kw)
    assert torch.equal(got.order_R, ref.order_R), f"order_R\n{got.order_R}\n{ref.order_R}"
    assert torch.equal(got.counts_E, ref.counts_E), f"counts_E\n{got.counts_E}\n{ref.counts_E}"
    assert (got.inverse_S is None) == (ref.inverse_S is None)
    if ref.inverse_S is not None:
        assert torch.equal(got.inverse_S, ref.inverse_S), "inverse_S"
        assert got.inverse_S.dtype == torch.int64
    assert got.order_R.dtype == got.counts_E.dtype == torch.int64
    assert (got.num_tokens, got.top_k, got.has_empty) == (ref.num_tokens, ref.top_k, ref.has_empty)
    return got


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "T,K,E,empty,block_s",
    [
        (1, 8, 128, 0.0, None),  # decode: one token, K = 8
        (64, 8, 128, 0.0, None),  # S = 512 in one program
        (200, 8, 16, 0.1, None),  # S = 1600 > FUSED_MAX_S: default blocks, the last one partial
        (13, 1, 1, 0.0, None),  # E = 1
        (13, 2, 1, 0.4, 16),
        (7, 8, 512, 0.0, None),  # E = 512: the one-hot tile loops over chunks of ids
        (50, 4, 512, 0.2, 64),
        (37, 3, 8, 0.0, 16),  # S = 111, not a multiple of the block
        (37, 3, 8, 0.5, 32),
        (20, 4, 6, 1.0, 16),  # every slot empty
    ],
)
def test_matches_plan_dispatch(T, K, E, empty, block_s, dtype):
    _check(_ids(T, K, E, empty).to(dtype), E, block_s=block_s, has_empty=empty > 0)


@pytest.mark.parametrize("block_s", [None, 16])
def test_every_slot_to_one_expert(block_s):
    experts_TK = torch.full((40, 2), 3)
    got = _check(experts_TK, 8, block_s=block_s)
    assert torch.equal(got.order_R, torch.arange(80))  # ties keep slot order


@pytest.mark.parametrize("block_s", [None, 16])
@pytest.mark.parametrize("max_rows", [0, 5, 40, 1000])
def test_max_rows(max_rows, block_s):
    _check(_ids(30, 2, 5, 0.3), 5, max_rows=max_rows, has_empty=True, block_s=block_s)


@pytest.mark.parametrize("block_s", [None, 16])
def test_capacity_plan(block_s):
    T, K, E = 48, 2, 6
    experts_TK = _ids(T, K, E)
    capped_TK, _ = apply_capacity(experts_TK, torch.rand(T, K), expert_capacity(T, K, E, 1.0), E)
    _check(capped_TK, E, max_rows=E * expert_capacity(T, K, E, 1.0), has_empty=True, block_s=block_s)


@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (0, 0)])
def test_no_slots_gives_an_empty_plan(shape):
    got = _check(torch.zeros(shape, dtype=torch.int64), 4)
    assert got.order_R.numel() == 0 and torch.equal(got.counts_E, torch.zeros(4, dtype=torch.int64))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    T=st.integers(1, 90),
    K=st.integers(1, 4),
    E=st.integers(1, 40),
    empty=st.sampled_from([0.0, 0.3]),
    block_s=st.sampled_from([None, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_random_routings(T, K, E, empty, block_s, seed):
    torch.manual_seed(seed)
    _check(_ids(T, K, E, empty), E, block_s=block_s, has_empty=empty > 0)


def test_unvalidated_out_of_range_ids_are_empty_slots():
    experts_TK = torch.tensor([[0, 9], [-1, 2], [2, 1], [5, 0]])
    got = routing_plan(experts_TK, 4, validate=False)
    ref = plan_dispatch(experts_TK.clamp(0, 4).masked_fill(experts_TK < 0, 4), 4)
    assert torch.equal(got.order_R, ref.order_R) and torch.equal(got.counts_E, ref.counts_E)


@pytest.mark.parametrize(
    "args,kw,match",
    [
        ((torch.zeros(6, dtype=torch.int64), 4), {}, "experts_TK"),  # 1-D
        ((torch.zeros(2, 3), 4), {}, "experts_TK"),  # float
        ((torch.zeros(2, 3, dtype=torch.int16), 4), {}, "experts_TK"),
        (([[0, 1]], 4), {}, "experts_TK"),  # not a tensor
        ((torch.zeros(2, 3, dtype=torch.int64), 0), {}, "num_experts"),
        ((torch.zeros(2, 3, dtype=torch.int64), 2.0), {}, "num_experts"),
        ((torch.tensor([[0, 5]]), 4), {}, r"experts_TK ids must lie in \[0, num_experts=4\]"),
        ((torch.tensor([[0, -1]], dtype=torch.int32), 4), {}, "experts_TK ids"),
        ((torch.zeros(2, 3, dtype=torch.int64), 4), {"max_rows": -1}, "max_rows"),
        ((torch.zeros(2, 3, dtype=torch.int64), 4), {"block_s": 24}, "block_s"),
    ],
)
def test_bad_input_raises(args, kw, match):
    with pytest.raises(ValueError, match=match):
        routing_plan(*args, **kw)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(routing, "INTERPRETED", False)
    with pytest.raises(ValueError, match="CUDA device"):
        routing_plan(torch.zeros(2, 3, dtype=torch.int64), 4)
