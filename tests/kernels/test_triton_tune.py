"""Launch configs of moekit's Triton kernels under the CPU interpreter: every tuning candidate
computes the same FFN as the loop reference (forward and gradients), the heuristic sizes tiles
to the rows per expert, and the tuner measures once per shape bucket, persists its choice and
reuses it in a new process-wide tuner, without touching the caller's autograd graph.

(Timings under the interpreter mean nothing; these tests check the machinery, not the choice.)
"""

import json

import pytest
import torch

pytest.importorskip("triton")

from moekit.kernels.reference import loop_ffn  # noqa: E402
from moekit.kernels.triton import (  # noqa: E402
    INTERPRETED,
    triton_moe_ffn,
    tune,  # noqa: E402
)
from moekit.kernels.triton.config import DECODE_CANDIDATES, TRAIN_CANDIDATES, candidates, heuristic_config  # noqa: E402
from moekit.layer.dispatch import plan_dispatch  # noqa: E402
from moekit.layer.experts import ACTIVATIONS  # noqa: E402

if not INTERPRETED:
    pytest.skip("the Triton kernels are not interpreted in this process (see conftest.py)", allow_module_level=True)


@pytest.fixture
def fresh_tuner(tmp_path):
    path = tmp_path / "tuning.json"
    t = tune.reset_tuner(path, reps=1)
    tune.set_autotune(True)
    yield t
    tune.set_autotune(None)
    tune.reset_tuner(None)


def _problem(T=10, K=2, E=3, D=32, F=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts_TK = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
    plan = plan_dispatch(experts_TK, E)
    x = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    w_up = (torch.randn(E, D, 2 * F, generator=g, dtype=torch.float64) / D**0.5).to(dtype)
    w_down = (torch.randn(E, F, D, generator=g, dtype=torch.float64) / F**0.5).to(dtype)
    s = torch.rand(T * K, generator=g, dtype=torch.float64).to(dtype)
    return plan, x, w_up, w_down, s


def _run(plan, x, w_up, w_down, s, config=None):
    """The slot-mode fused FFN and its gradients (x, w_up, w_down, s) for a fixed output gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w_up, w_down, s)]
    T = x.shape[0]
    K = plan.order_R.numel() // T
    y = triton_moe_ffn(
        leaves[0],
        plan.counts_E,
        leaves[1],
        leaves[2],
        "swiglu",
        scale_R=leaves[3][plan.order_R],
        out_idx_R=plan.order_R,
        top_k=K,
        config=config,
    )
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    return (y, *torch.autograd.grad(y, leaves, g))


def _reference(plan, x, w_up, w_down, s):
    leaves = [t.detach().double().clone().requires_grad_(True) for t in (x, w_up, w_down, s)]
    T, D = x.shape
    K = plan.order_R.numel() // T
    y_R = loop_ffn(leaves[0][plan.token_R], plan.counts_E, leaves[1], leaves[2], ACTIVATIONS["swiglu"])
    y_R = y_R * leaves[3][plan.order_R][:, None]
    y = y_R.new_zeros(T * K, D).index_copy(0, plan.order_R, y_R)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    return (y, *torch.autograd.grad(y, leaves, g))


def _assert_close(got, ref, tol=1e-4):
    for name, a, b in zip(["y", "dx", "dw_up", "dw_down", "ds"], got, ref):
        err = (a.double() - b).abs().max().item()
        assert err <= tol * max(b.abs().max().item(), 1e-6), f"{name}: error {err:.3e}"


@pytest.mark.parametrize(
    "cfg",
    DECODE_CANDIDATES + TRAIN_CANDIDATES,
    ids=lambda c: f"M{c['BLOCK_M']}N{c['BLOCK_N']}K{c['BLOCK_K']}P{c['WGRAD_BLOCK_P']}Q{c['WGRAD_BLOCK_Q']}",
)
def test_every_candidate_config_is_correct(cfg):
    """Each config the tuner may pick gives the loop's result (fp32, all gradients), with rows
    fewer than one tile, one expert idle and D, F smaller than some of the blocks."""
    problem = _problem(T=9, K=2, E=4, D=48, F=40)
    _assert_close(_run(*problem, config=cfg), _reference(*problem))


def test_heuristic_sizes_tiles_to_rows_per_expert():
    assert heuristic_config(8, 128)["BLOCK_M"] == 16  # decode: T=1, K=8
    assert heuristic_config(512, 128)["BLOCK_M"] == 16  # T=64, K=8: 4 rows per expert
    assert heuristic_config(64 * 32, 64)["BLOCK_M"] == 32
    assert heuristic_config(4096 * 8, 128)["BLOCK_M"] == 64
    assert heuristic_config(8192 * 2, 8)["BLOCK_M"] == 128  # mixtral-like training
    assert candidates(8, 128) == DECODE_CANDIDATES and candidates(8192 * 2, 8) == TRAIN_CANDIDATES


def test_bad_config_is_rejected():
    problem = _problem()
    with pytest.raises(ValueError, match="BLOCK_M must be a power of two"):
        _run(*problem, config={"BLOCK_M": 24})
    with pytest.raises(ValueError, match="unknown Triton config keys"):
        _run(*problem, config={"BLOCK_Z": 16})


def test_autotune_measures_once_persists_and_reuses(fresh_tuner):
    problem = _problem()
    ref = _reference(*problem)
    _assert_close(_run(*problem), ref)  # tuned inside the call; the caller's grads are unaffected
    assert fresh_tuner.tuned_here == 1
    data = json.loads(fresh_tuner.path.read_text())
    ((key, entry),) = data["entries"].items()
    assert "|R32|" in key and key.endswith("|train") and "float32" in key
    assert len(entry["tried"]) == len(candidates(20, 3))
    assert entry["config"] in [c for _, c in entry["tried"]]

    _run(*_problem(T=13, seed=1))  # 26 rows: same bucket, no new measurement
    assert fresh_tuner.tuned_here == 1
    with torch.no_grad():  # inference is its own key
        triton_moe_ffn(
            problem[1], problem[0].counts_E, problem[2], problem[3], "swiglu", out_idx_R=problem[0].order_R, top_k=2
        )
    assert fresh_tuner.tuned_here == 2

    again = tune.reset_tuner(fresh_tuner.path, reps=1)  # a new process reads the file
    _assert_close(_run(*problem), ref)
    assert again.tuned_here == 0
    assert again.lookup(key) == entry["config"]


def test_unreadable_cache_is_remeasured(fresh_tuner):
    fresh_tuner.path.write_text("{not json")
    t = tune.reset_tuner(fresh_tuner.path, reps=1)
    _run(*_problem())
    assert t.tuned_here == 1
    assert json.loads(fresh_tuner.path.read_text())["version"] == 1


def test_autotune_is_off_under_the_interpreter_by_default(tmp_path):
    tune.set_autotune(None)
    t = tune.reset_tuner(tmp_path / "never.json", reps=1)
    try:
        _run(*_problem())
        assert t.tuned_here == 0 and not (tmp_path / "never.json").exists()
    finally:
        tune.reset_tuner(None)


def test_tuners_sharing_a_cache_file_keep_each_others_entries(tmp_path):
    """Two processes (here two Tuner objects) that loaded the cache before either measured: the
    second save must not drop the first one's entry (a read-merge-replace, not a blind replace)."""
    import json

    from moekit.kernels.triton.tune import Tuner

    path = tmp_path / "tuning.json"
    a, b = Tuner(path, reps=1), Tuner(path, reps=1)
    assert a.lookup("A") is None and b.lookup("B") is None  # both have read the (absent) file
    cpu = torch.device("cpu")
    a.tune("A", lambda cfg: None, [{"BLOCK_M": 16}], cpu)
    b.tune("B", lambda cfg: None, [{"BLOCK_M": 32}], cpu)
    assert set(json.loads(path.read_text())["entries"]) == {"A", "B"}
