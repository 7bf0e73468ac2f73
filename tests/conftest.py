import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

torch.set_num_threads(1)  # tests run under pytest-xdist with one worker per core


def _import_triton_interpreted() -> None:
    """Import moekit's Triton kernels, and Triton with them, under ``TRITON_INTERPRET=1``, before
    any test module is collected: ``triton.jit`` reads the variable when it decorates, Triton's
    own library functions (``tl.sum``) included, and any earlier import of Triton (``torch._dynamo``
    imports it; ``moekit.parallel`` imports that) would leave them compiled-mode functions that the
    interpreted kernel tests cannot call (tests/kernels sets the variable around each of its tests)."""
    if torch.cuda.is_available():
        return  # a GPU runs the real kernels (tests marked gpu); the interpreter tests skip there
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        try:
            import moekit.kernels.triton  # noqa: F401
        except ImportError:
            pass


_import_triton_interpreted()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (those that take ~8 s or more: several processes, torch.compile) run
    first, in their files' order: with ``--dist worksteal`` (``make test``) the long ones start at
    once and the other worker steals the short ones from the end of the queue, so the two finish
    together instead of one waiting on a long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
