"""The Triton kernels' self-check (:mod:`moekit.kernels.triton.check`: a small routed FFN, forward
and every gradient, against the loop reference) under Triton's CPU interpreter.
"""
import pytest
import torch

pytest.importorskip("triton")

from moekit.kernels.triton import INTERPRETED  # noqa: E402

if not INTERPRETED:
    pytest.skip("the Triton kernels are not interpreted in this process (see conftest.py)", allow_module_level=True)


def _fresh_verified(dtype):
    from moekit.kernels import _TRITON_VERIFIED, triton_verified

    _TRITON_VERIFIED.pop(("cpu", dtype), None)
    try:
        return triton_verified(torch.device("cpu"), dtype)
    finally:
        _TRITON_VERIFIED.pop(("cpu", dtype), None)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast", "reentrant_checkpoint"])
def test_self_check_passes_whatever_the_callers_mode(mode, recwarn):
    """'auto' runs the self-check inside the first forward that resolves the backend: an
    inference call (no_grad, inference_mode, a reentrant checkpoint's forward) or one under
    autocast must not fail it and pin 'grouped' (with a warning) for the rest of the process."""
    import contextlib
    from torch.utils.checkpoint import checkpoint

    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
           "autocast": torch.autocast("cpu", dtype=torch.float16),
           "reentrant_checkpoint": contextlib.nullcontext()}[mode]
    result = []
    with ctx:
        if mode == "reentrant_checkpoint":
            a = torch.ones(2, requires_grad=True)
            checkpoint(lambda t: result.append(_fresh_verified(torch.float32)) or t * 2, a, use_reentrant=True)
        else:
            result.append(_fresh_verified(torch.float32))
    assert result[0] is True, [str(w.message) for w in recwarn]


def test_self_check_in_float64():
    from moekit.kernels.triton.check import self_check

    self_check(torch.device("cpu"), torch.float64)  # raises on a mismatch


def test_self_check_leaves_global_state_alone(tmp_path):
    """The self-check neither advances the global RNG nor tunes (and persists) its own shape."""
    from moekit.kernels.triton import tune
    from moekit.kernels.triton.check import self_check

    t = tune.reset_tuner(tmp_path / "tuning.json", reps=1)
    tune.set_autotune(True)
    try:
        rng = torch.get_rng_state()
        self_check(torch.device("cpu"), torch.float32)
        assert torch.equal(rng, torch.get_rng_state())
        assert t.tuned_here == 0 and not t.entries and not (tmp_path / "tuning.json").exists()
    finally:
        tune.set_autotune(None)
        tune.reset_tuner(None)
