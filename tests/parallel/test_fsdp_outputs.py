"""FSDP2 hooks every tensor a wrapped module returns for its backward; a view among them draws a
warning ("FSDP2-wrapped module (FSDPBlock) returned a view tensor"), which every torchrun run used to
print. The LM's blocks and root return none, and the sharded model still trains as one process."""

from __future__ import annotations

import fsdp_output_workers as FW
import pytest
import ranks
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def test_sharded_lm_returns_no_views_and_trains_as_one_process(tmp_path):
    store = ranks.store_path(tmp_path, "fsdp")
    ranks.start(FW.steps_without_view_outputs, (2, store, 2, 3), 2)
