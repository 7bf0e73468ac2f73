"""Tensor parallelism in real gloo process groups (see tp_workers.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist
import tp_workers as W
from test_ep_edge_cases import results, spawn

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "tp", "ep", "ac", "compiled"),
    [(2, 2, 1, "none", False), (4, 2, 2, "full", False), (4, 2, 1, "none", False), (2, 2, 1, "full", "aot_eager")],
)
def test_tensor_parallel_equals_one_process(tmp_path, world, tp, ep, ac, compiled):
    """TP=2 alone, TP=2 x EP=2 (with full activation checkpointing), TP=2 x DP=2, and TP=2
    compiled with full checkpointing: loss, every gradient, routing statistics, clipping and
    an AdamW step equal one process (float64); a meta-built model gets the one-process values.
    The compiled case traces with dynamo and AOTAutograd over the DTensors (backend aot_eager):
    inductor's code generation for it took ~80-150 s of CI on two cores, and is run under torchrun
    by test_train_ep.py's compiled run."""
    spawn(W.equals_one_process, world, tmp_path, tp, ep, ac, compiled)
    results(tmp_path, f"tp{tp}-ep{ep}-{ac}{'-compiled' if compiled else ''}", world)


def test_a_tensor_parallel_checkpoint_reshards_to_other_layouts(tmp_path):
    spawn(W.checkpoint_reshards, 4, tmp_path)
    results(tmp_path, "tp-dcp", 4)


def test_layouts_tensor_parallelism_cannot_take_are_refused(tmp_path):
    spawn(W.refused, 2, tmp_path)
    results(tmp_path, "tp-refused", 2)
