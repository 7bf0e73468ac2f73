"""Edge cases of expert parallelism in real gloo process groups (see ep_edge_workers.py)."""

from __future__ import annotations

import os

import ep_edge_workers as W
import pytest
import ranks
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def spawn(fn, world: int, tmp_path, *args, start_method: str = ranks.START_METHOD) -> None:
    ranks.start(fn, (world, ranks.store_path(tmp_path, fn.__name__), str(tmp_path), *args), world, start_method)


def results(tmp_path, case: str, world: int) -> None:
    for rank in range(world):
        msg = (tmp_path / f"{case}.{rank}").read_text()
        assert msg == "ok", f"{case}, rank {rank}: {msg}"


def test_models_on_separate_ranks_talk_only_to_their_own(tmp_path):
    spawn(W.stages_on_their_own_ranks, 4, tmp_path)
    results(tmp_path, "stages", 4)


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallelism_adds_two_host_reads_per_layer_call(tmp_path, world):
    spawn(W.host_reads_per_call, world, tmp_path)
    results(tmp_path, "host-reads", world)


def test_frozen_experts_stay_frozen_when_sharded(tmp_path):
    spawn(W.frozen_experts, 2, tmp_path)
    results(tmp_path, "frozen", 2)


def test_sigmoid_router_bias_stays_replicated_whatever_the_statistics(tmp_path):
    spawn(W.sigmoid_bias_replicated, 2, tmp_path)
    for statistics in ("local", "expert"):
        results(tmp_path, f"bias-{statistics}", 2)


def test_settings_that_differ_between_ranks_are_a_clear_setup_error(tmp_path):
    spawn(W.mismatched_settings, 2, tmp_path)
    for case in W.MISMATCHES:
        results(tmp_path, f"mismatch-{case}", 2)


def test_a_rank_without_tokens_joins_in_and_validation_uses_every_window(tmp_path):
    spawn(W.empty_rank, 2, tmp_path)
    for case in ("capacity", "expert_choice", "validation"):
        results(tmp_path, f"empty-{case}", 2)


@pytest.mark.parametrize("sync_each", [False, True])
def test_gradient_accumulation_with_one_sync_per_step_or_per_micro_batch(tmp_path, sync_each):
    spawn(W.accumulation, 2, tmp_path, 2, sync_each)
    results(tmp_path, f"accumulation-2{'-each' if sync_each else ''}", 2)


def test_soft_hierarchical_and_multigate_layers_train_data_parallel(tmp_path):
    spawn(W.other_layers_data_parallel, 2, tmp_path)
    for name in ("soft", "hierarchical", "multigate"):
        results(tmp_path, f"layers-{name}", 2)


def test_collectives_return_only_after_the_backend_released_their_tensors(tmp_path):
    """The cause of a rank aborting at exit (SIGABRT) right after a layer-call mismatch error:
    gloo's worker thread held the last reference to the call's tensors. Before the fix about a
    third of calls returned with the tensors still held."""
    spawn(W.collectives_release_their_tensors, 2, tmp_path)
    results(tmp_path, "collectives", 2)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through /proc")
def test_no_gloo_worker_thread_of_moekits_groups_is_left_when_the_interpreter_finalizes(tmp_path):
    """The other way a rank aborted at exit: FSDP's hooks (cycles) and DTensor's caches keep the
    mesh's process groups alive, so their worker threads outlived the interpreter's teardown."""
    spawn(W.no_gloo_thread_left_at_exit, 2, tmp_path, start_method="spawn")  # atexit runs only there
    results(tmp_path, "exit", 2)


def test_experts_that_raise_leave_no_all_to_all_handle_behind(tmp_path):
    """Before the fix the handle of a call whose experts raised stayed on the all-to-all hook's
    stack for good, holding that call's received rows and their graph."""
    spawn(W.experts_raise_once, 2, tmp_path)
    results(tmp_path, "raise-once", 2)


def test_each_stage_saves_and_loads_its_own_checkpoint_on_its_ranks(tmp_path):
    spawn(W.stage_checkpoints_on_their_own_ranks, 4, tmp_path)
    results(tmp_path, "stage-checkpoints", 4)
