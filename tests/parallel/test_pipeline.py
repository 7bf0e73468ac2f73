"""Pipeline parallelism on torch.distributed.pipelining in real gloo process groups (see
pp_workers.py), and what it refuses before any communication."""

from __future__ import annotations

import dataclasses

import pp_workers as W
import pytest
import torch.distributed as dist
from test_ep_edge_cases import results, spawn

from moekit.models import MoETransformer
from moekit.parallel.pipeline import pipeline_stage, stage_bounds

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.mark.parametrize(
    "world,schedule,tie", [(2, "1f1b", False), (4, "1f1b", False), (2, "gpipe", False), (4, "1f1b", True)]
)
def test_pipeline_stages_give_one_process_accumulating_the_microbatches(tmp_path, world, schedule, tie):
    spawn(W.pipeline_equals_accumulation, world, tmp_path, schedule, tie)
    results(tmp_path, f"pipeline-{schedule}{'-tied' if tie else ''}", world)


def test_stage_bounds_and_what_a_pipeline_refuses():
    assert stage_bounds(4, 2) == [(0, 2), (2, 4)]
    assert stage_bounds(5, 3) == [(0, 2), (2, 4), (4, 5)]
    cfg = W._config()
    for change, msg in [
        (dict(balance_pooling="model"), 'balance_pooling="layer"'),
    ]:
        with pytest.raises(ValueError, match=msg):
            pipeline_stage(MoETransformer(dataclasses.replace(cfg, **change)), 0, 2, 4)
    with pytest.raises(ValueError, match="between 1 and the model's 4 layers"):
        pipeline_stage(MoETransformer(cfg), 0, 5, 8)
    with pytest.raises(ValueError, match="microbatches must be at least the 2 stages"):
        pipeline_stage(MoETransformer(cfg), 0, 2, 1)
    with pytest.raises(ValueError, match=r"stage must be in \[0, 2\)"):
        pipeline_stage(MoETransformer(cfg), 2, 2, 4)


@pytest.mark.parametrize("tie", [False, True])
def test_pipeline_stages_save_one_checkpoint_that_loads_per_stage_and_whole(tmp_path, tie):
    spawn(W.pipeline_checkpoint, 2, tmp_path, tie)
    results(tmp_path, f"pipeline-checkpoint{'-tied' if tie else ''}", 2)


@pytest.mark.parametrize("tie", [False, True])
def test_a_stage_built_on_meta_gets_the_one_process_values_of_its_part(tie):
    """Each of 3 stages, built on the meta device and materialised, holds exactly the values the
    same seed gives one process, drawing (and dropping) the other stages' parameters in order."""
    import torch

    cfg = dataclasses.replace(W._config(tie), n_layers=5)
    torch.manual_seed(3)
    ref = MoETransformer(cfg)
    after = torch.rand(3)  # where the generator is once the whole model is drawn
    for s in range(3):
        torch.manual_seed(3)
        with torch.device("meta"):
            model = MoETransformer(cfg)
        stage = pipeline_stage(model, s, 3, 4)
        stage.model.materialize_("cpu")
        assert torch.equal(torch.rand(3), after), s
        want = ref.state_dict()
        got = stage.model.state_dict()
        assert got and all(torch.equal(v, want[k]) for k, v in got.items()), s
        assert ("embed.weight" in got) == (s == 0 or (tie and s == 2))


@pytest.mark.parametrize(("dp", "ep", "tie"), [(1, 2, False), (2, 1, True)])
def test_pipeline_stages_with_expert_or_data_parallelism_equal_one_process(tmp_path, dp, ep, tie):
    """PP=2 x EP=2 and PP=2 x DP=2 (tied embeddings) on 4 ranks (each stage parallelized on its slice)."""
    spawn(W.pipeline_with_expert_and_data_parallelism, 4, tmp_path, dp, ep, tie)
    results(tmp_path, f"pipeline-dp{dp}-ep{ep}{'-tied' if tie else ''}", 4)
