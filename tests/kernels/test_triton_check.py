"""The Triton kernels' self-check (:mod:`moekit.kernels.triton.check`: a small routed FFN, forward
and every gradient, against the loop reference): under Triton's CPU interpreter here, and on a
GPU in the test marked ``gpu`` (run in a fresh process, without the interpreter).
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")


def _interpreted() -> bool:
    from moekit.kernels.triton import INTERPRETED

    return INTERPRETED


cpu_only = pytest.mark.skipif(
    torch.cuda.is_available() or not _interpreted(),
    reason="the Triton kernels are not interpreted in this process (see conftest.py)",
)


def _passes(dtype):
    from moekit.kernels.triton.check import self_check

    self_check(torch.device("cpu"), dtype)  # raises on a mismatch
    return True


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_self_check_passes(dtype):
    """The check passes here (interpreted)."""
    assert _passes(dtype)


@cpu_only
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast", "reentrant_checkpoint"])
def test_self_check_passes_whatever_the_callers_mode(mode, recwarn):
    """The self-check runs whatever the caller's mode: called from an inference context (no_grad,
    inference_mode, a reentrant checkpoint's forward) or under autocast it still checks the
    forward and every gradient in the dtype asked for, and passes."""
    import contextlib

    from torch.utils.checkpoint import checkpoint

    ctx = {
        "no_grad": torch.no_grad(),
        "inference_mode": torch.inference_mode(),
        "autocast": torch.autocast("cpu", dtype=torch.float16),
        "reentrant_checkpoint": contextlib.nullcontext(),
    }[mode]
    result = []
    with ctx:
        if mode == "reentrant_checkpoint":
            a = torch.ones(2, requires_grad=True)
            checkpoint(lambda t: result.append(_passes(torch.float32)) or t * 2, a, use_reentrant=True)
        else:
            result.append(_passes(torch.float32))
    assert result[0] is True, [str(w.message) for w in recwarn]


@cpu_only
def test_self_check_refuses_a_dtype_the_kernels_do_not_take():
    from moekit.kernels.triton.check import self_check

    with pytest.raises(ValueError, match="float64/32/16 and bfloat16"):
        self_check(torch.device("cpu"), torch.int32)


@cpu_only
def test_self_check_in_float64():
    from moekit.kernels.triton.check import self_check

    self_check(torch.device("cpu"), torch.float64)  # raises on a mismatch


@cpu_only
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_self_check_passes_on_the_gpu(dtype):
    """The kernels compile and reproduce the loop reference on the GPU, forward and gradients (the
    check ``backend="auto"`` once ran at run time; ``auto`` now picks ``grouped`` and ``triton`` is
    opt-in). A fresh process, so that no kernel here was decorated under the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)  # this process's moekit
    code = (
        "import torch; from moekit.kernels.triton.check import self_check; "
        f"self_check(torch.device('cuda'), torch.{dtype})"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
