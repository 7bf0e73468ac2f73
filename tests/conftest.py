import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

torch.set_num_threads(1)  # tests run under pytest-xdist with one worker per core


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
