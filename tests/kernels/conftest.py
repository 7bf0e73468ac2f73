"""Triton's CPU interpreter for the kernel tests, without setting it for the rest of the process.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, and the interpreter reads it
again while kernels run. So tests/conftest.py (loaded before any test module is imported) imports
``moekit.kernels.triton`` once with the variable set, and an autouse fixture here sets it around
each test of this folder; between tests and in other folders it is as the caller left it. On a
machine without Triton the import fails and the Triton test modules skip themselves.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
