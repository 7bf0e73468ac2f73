"""``triton_moe_ffn``'s autograd op in slot mode (:mod:`moekit.kernels.triton.autograd`) under
Triton's CPU interpreter, small shapes: strided inputs, double backward, autocast, and the
tuner's trial calls inside the caller's autograd graph (activation checkpointing) and with stale
cache entries.
"""

import pytest
import torch

pytest.importorskip("triton")

from moekit.kernels.reference import loop_ffn  # noqa: E402
from moekit.kernels.triton import INTERPRETED, triton_moe_ffn  # noqa: E402
from moekit.layer.dispatch import combine, dispatch, plan_dispatch  # noqa: E402
from moekit.layer.experts import ACTIVATIONS  # noqa: E402

if not INTERPRETED:
    pytest.skip("the Triton kernels are not interpreted in this process (see conftest.py)", allow_module_level=True)

ACT = "swiglu"


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _problem(T=7, K=2, E=3, D=16, F=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts_TK = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
    plan = plan_dispatch(experts_TK, E)
    x_TD = torch.randn(T, D, generator=g, dtype=dtype)
    w_up = torch.randn(E, D, 2 * F, generator=g, dtype=dtype) / D**0.5
    w_down = torch.randn(E, F, D, generator=g, dtype=dtype) / F**0.5
    weights_TK = torch.rand(T, K, generator=g, dtype=dtype)
    return plan, x_TD, w_up, w_down, weights_TK


def test_strided_scale_is_read_through_its_stride():
    """scale_R given as a strided view (a column of a (R, 2) tensor) scales each row by its own
    entry, forward and gradients, as a contiguous copy does."""
    plan, x_TD, w_up, w_down, weights_TK = _problem()
    K = plan.top_k
    s_R = weights_TK.reshape(-1)[plan.order_R]
    outs = []
    for strided in (False, True):
        x, wu, wd, ss = _leaf(x_TD), _leaf(w_up), _leaf(w_down), _leaf(s_R)
        s = torch.stack([ss, torch.full_like(ss, 7.0)], 1)[:, 0] if strided else ss
        assert s.is_contiguous() != strided
        y = triton_moe_ffn(x, plan.counts_E, wu, wd, ACT, scale_R=s, out_idx_R=plan.order_R, top_k=K)
        g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        outs.append([y, *torch.autograd.grad(y, (x, wu, wd, ss), g)])
    for name, a, b in zip(("y", "dx", "dw_up", "dw_down", "ds"), *outs):
        torch.testing.assert_close(b, a, msg=name)


@pytest.fixture
def fresh_tuner(tmp_path):
    from moekit.kernels.triton import tune

    t = tune.reset_tuner(tmp_path / "tuning.json", reps=1)
    tune.set_autotune(True)
    yield t
    tune.set_autotune(None)
    tune.reset_tuner(None)


def _slot_call(plan, x, w_up, w_down, weights_TK):
    return triton_moe_ffn(
        x,
        plan.counts_E,
        w_up,
        w_down,
        ACT,
        scale_R=weights_TK.reshape(-1)[plan.order_R],
        out_idx_R=plan.order_R,
        top_k=plan.top_k,
    )


def _reference_grads(plan, x_TD, w_up, w_down, weights_TK):
    leaves = [_leaf(t) for t in (x_TD, w_up, w_down, weights_TK)]
    ref = combine(
        loop_ffn(dispatch(leaves[0], plan), plan.counts_E, leaves[1], leaves[2], ACTIVATIONS[ACT]), plan, leaves[3]
    )
    ref.sum().backward()
    return ref, [t.grad for t in leaves]


def test_autotune_inside_a_non_reentrant_checkpoint(fresh_tuner):
    """The tuner's trial calls (forward + backward on detached copies) run inside the caller's
    forward; under torch.utils.checkpoint(use_reentrant=False) their saved tensors must not go
    through the checkpoint's hooks (the trial's backward then tried to recompute the caller's
    region and every candidate 'failed')."""
    from torch.utils.checkpoint import checkpoint

    problem = _problem(dtype=torch.float32)
    plan = problem[0]
    leaves = [_leaf(t) for t in problem[1:]]
    out = checkpoint(
        lambda x, wu, wd, w: _slot_call(plan, x, wu, wd, w).view(-1, plan.top_k, x.shape[1]).sum(1),
        *leaves,
        use_reentrant=False,
    )
    out.sum().backward()
    assert fresh_tuner.tuned_here == 1
    ref, grads = _reference_grads(*problem)
    torch.testing.assert_close(out, ref.to(out.dtype))
    for got, want in zip((t.grad for t in leaves), grads):
        torch.testing.assert_close(got, want)


def test_stale_cached_config_is_retuned(fresh_tuner):
    """A cache entry written by an older moekit (here: without the down-projection backward's
    DBWD_* keys, added after the tuner) or an invalid one is measured again, not launched."""
    import json

    from moekit.kernels.triton import tune

    problem = _problem(dtype=torch.float32)
    leaves = [_leaf(t) for t in problem[1:]]
    _slot_call(problem[0], *leaves).sum().backward()
    assert fresh_tuner.tuned_here == 1
    data = json.loads(fresh_tuner.path.read_text())
    ((key, entry),) = data["entries"].items()
    for k in ("DBWD_BLOCK_N", "DBWD_num_warps"):
        entry["config"].pop(k)
    fresh_tuner.path.write_text(json.dumps(data))

    for stale in (entry["config"], {**entry["config"], "DBWD_BLOCK_N": 16, "DBWD_num_warps": 4, "BLOCK_M": 24}):
        data["entries"][key]["config"] = stale
        fresh_tuner.path.write_text(json.dumps(data))
        t = tune.reset_tuner(fresh_tuner.path, reps=1)
        leaves = [_leaf(t) for t in problem[1:]]
        _slot_call(problem[0], *leaves).sum().backward()
        assert t.tuned_here == 1


def test_double_backward_raises_instead_of_dropping_the_term():
    """The kernels' backward is not differentiable: a gradient penalty built with
    create_graph=True must raise, not be silently treated as a constant."""
    plan, x_TD, w_up, w_down, weights_TK = _problem()
    x, wu, wd = _leaf(x_TD), _leaf(w_up), _leaf(w_down)
    y = triton_moe_ffn(x, plan.counts_E, wu, wd, ACT, out_idx_R=plan.order_R, top_k=plan.top_k)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (y.sum() + gx.pow(2).sum()).backward()


def test_autocast_leaves_float64_alone_as_matmul_does():
    """Autocast does not cast float64 (torch keeps a float64 matmul in float64); the fused path
    must not round float64 rows to autocast's dtype either."""
    from moekit.kernels import compute_dtype
    from moekit.layer.experts import GroupedExperts

    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.float16):
        assert compute_dtype(x) == (x @ x.T).dtype == torch.float64
        assert compute_dtype(x.float()) == torch.float16
    experts = GroupedExperts(3, 16, 16, "swiglu").double()
    plan = plan_dispatch(torch.rand(5, 3).argsort(-1)[:, :2], 3)
    w_TK = torch.rand(5, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.float16):
        got = experts.fused(x, plan, w_TK)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, experts.fused(x, plan, w_TK))
