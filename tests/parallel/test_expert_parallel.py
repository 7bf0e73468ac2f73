"""Expert parallelism in real multi-process gloo groups (no mocks): the EP model on each rank's
slice of a global batch must equal the single-process model on the whole batch."""

from __future__ import annotations

import ep_workers as W
import pytest
import ranks
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def spawn(fn, world: int, tmp_path, *args) -> None:
    ranks.start(fn, (world, ranks.store_path(tmp_path, fn.__name__), *args), world)


def test_ep2_equals_single_process(tmp_path):
    spawn(W.layer_equivalence, 2, tmp_path, 2, list(W.SCENARIOS))


def test_ep4_equals_single_process(tmp_path):
    spawn(W.layer_equivalence, 4, tmp_path, 4, ["topk", "drop", "expert_choice"])


def test_ep2_dp2_optimizer_step_and_resharded_checkpoints(tmp_path):
    """EP=2 x DP=2; the gathered and the sharded (DCP) checkpoints reload into EP=1 (DP=4), EP=4
    and one process, exactly."""
    spawn(W.ep_dp_step, 4, tmp_path, 2, str(tmp_path))
    W.check_dcp_in_one_process(str(tmp_path), 4, 2)


def test_fewer_experts_per_rank_than_dp_ranks_shard_evenly(tmp_path):
    """EP=2 x DP=2 with 2 experts: every rank holds an equal, non-empty share of each expert."""
    spawn(W.balanced_expert_shards, 4, tmp_path, str(tmp_path))


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2), (4, 4)])
def test_targets_masked_unequally_across_ranks_give_one_process_gradients(tmp_path, world, ep):
    """Issue 25, fault 2: each rank's summed loss over the global target count, summed by FSDP."""
    spawn(W.masked_targets_step, world, tmp_path, ep)


def test_ep2_step_and_checkpoint_into_ep_world(tmp_path):
    """EP=2 on 2 ranks; its checkpoints (gathered, and DCP) reload into EP=1 (pure data parallel)
    and a single process."""
    spawn(W.ep_dp_step, 2, tmp_path, 2, str(tmp_path))
    W.check_dcp_in_one_process(str(tmp_path), 2, 2)


@pytest.mark.parametrize(
    "case, expect",
    [
        ("indivisible", "num_experts=7, which the expert-parallel size 2 must divide"),
        ("world", "expert_parallel=4 must divide the world size 2"),
        ("mismatch", "built a different model"),
        ("zero", "expert_parallel must be a positive integer; got 0"),
    ],
)
def test_setup_errors_are_clear_on_every_rank(tmp_path, case, expect):
    spawn(W.bad_setup, 2, tmp_path, case, str(tmp_path))
    for rank in range(2):
        msg = (tmp_path / f"{case}.{rank}").read_text()
        assert expect in msg, f"rank {rank}: {msg}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_mid_step_stops_the_others_with_a_clear_error(tmp_path, mode):
    timeout_s = 8.0  # the process-group timeout
    store = str(tmp_path / f"store-{mode}")
    ctx = ranks.context()
    procs = [ctx.Process(target=W.fails_mid_step, args=(r, 2, store, str(tmp_path), timeout_s, mode)) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(timeout=timeout_s + 60)
    stuck = procs[0].is_alive()
    for p in procs:
        p.kill() if p.is_alive() else None
        p.join()
    assert not stuck, f"rank 0 hung after its peer {'died' if mode == 'dies' else 'stopped answering'}"
    msg = (tmp_path / f"{mode}.0").read_text()
    assert msg.startswith("ExpertParallelError"), msg
    assert "rank 0" in msg and "peer rank" in msg, msg
    waited = float(msg.split("after ")[1].split("s:")[0])
    assert waited < timeout_s + 30, msg


def test_parallelize_refuses_activation_checkpointing_it_cannot_apply():
    """Checked before any communication: an unknown mode, and a module without the LM's switch."""
    from moekit import MoE, MoEConfig
    from moekit.parallel import parallelize

    with pytest.raises(ValueError, match="activation_checkpointing must be one of 'none', 'full', 'selective'"):
        parallelize(MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4)), activation_checkpointing="some")
    with pytest.raises(ValueError, match="MoE has no activation_checkpointing attribute"):
        parallelize(MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4)), activation_checkpointing="full")


@pytest.mark.parametrize("compile", ["inductr", 1, None])
def test_parallelize_names_the_compile_backends_it_takes(compile):
    from moekit import MoE, MoEConfig
    from moekit.parallel import parallelize

    with pytest.raises(
        ValueError,
        match=r"compile must be True \(inductor\), False, or the name of a torch.compile backend such as 'aot_eager'",
    ):
        parallelize(MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4)), compile=compile)
    with pytest.raises(ValueError, match="compile='aot_eager' compiles each transformer block: MoE has no blocks"):
        parallelize(MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4)), compile="aot_eager")


def test_apply_needs_an_initialised_process_group():
    from moekit import MoE, MoEConfig
    from moekit.parallel import apply_expert_parallel

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with pytest.raises(ValueError, match="torchrun"):
        apply_expert_parallel(MoE(MoEConfig(dim=8, hidden_dim=4, num_experts=4)), expert_parallel=2)


@pytest.mark.parametrize("world, eps", [(2, [2, 1]), (4, [4, 2])])
def test_meta_built_sharded_model_gets_the_single_process_init_on_every_layout(tmp_path, world, eps):
    """No rank builds the whole model (meta device, then only its shards are allocated), and the
    values equal one process's: EP=2 and EP=1 (data parallel) on 2 ranks, EP=4 and EP=2 x DP=2 on 4."""
    spawn(W.meta_init_equals_single_process, world, tmp_path, eps)


@pytest.mark.parametrize("case", ["top_k", "eval", "grad"])
def test_a_layer_called_differently_on_one_rank_is_a_clear_error_on_every_rank(tmp_path, case):
    spawn(W.call_mismatch, 2, tmp_path, case)
