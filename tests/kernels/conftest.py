"""Triton's CPU interpreter for the kernel tests, without setting it for the rest of the process.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, and the interpreter reads it
again while kernels run. So this conftest (loaded before the test modules of this folder are
imported) imports ``moekit.kernels.triton`` once with the variable set, and an autouse fixture sets
it around each test here; between tests and in other folders it is as the caller left it. On a
machine without Triton the import fails and the Triton test modules skip themselves.
"""

import pytest
import torch


def _import_kernels_interpreted() -> None:
    if torch.cuda.is_available():
        return  # a GPU runs the real kernels (tests marked gpu); the interpreter tests skip there
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        try:
            import moekit.kernels.triton  # noqa: F401  (decorated now: interpreted for this process)
        except ImportError:
            pass


_import_kernels_interpreted()


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
