"""Sharded checkpoints (torch.distributed.checkpoint): damaged or foreign checkpoints are a clear
error on every rank, and a save killed at any point leaves a complete checkpoint. The round trips
across layouts are in test_expert_parallel.py (ep_dp_step) and test_train_ep.py (torchrun)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dcp_workers as W
import pytest
import ranks
import torch
import torch.distributed as dist
from ep_workers import _lm_cfg

from moekit.models import MoETransformer
from moekit.train.checkpoint import CheckpointError
from moekit.train.distcp import MANIFEST, load_distributed, old_path, read_manifest, repair, resolve, save_distributed
from moekit.train.distcp import tmp_path as tmp_of

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def test_damaged_or_foreign_checkpoints_are_a_clear_error_on_every_rank(tmp_path):
    store = ranks.store_path(tmp_path, "dcp")
    ranks.start(W.bad_checkpoints, (2, store, str(tmp_path)), 2)
    for case, expect in W.CASES.items():
        for rank in range(2):
            msg = (tmp_path / f"{case}.{rank}").read_text()
            assert msg.startswith("CheckpointError") and expect in msg, f"{case}, rank {rank}: {msg}"
            assert str(tmp_path / case) in msg and "\n" not in msg, f"{case}, rank {rank}: {msg}"
            assert float(msg.split("after ")[1].split("s:")[0]) < 20, msg  # not a collective's timeout
        if case == "flipped_byte":
            key = W.optimizer_item(str(tmp_path / "good"), 1)[0].split("@")[0]
            assert repr(key) in msg, msg
    for rank in range(2):
        assert (tmp_path / f"after.{rank}").read_text() == "ok"
    # the same in one process, without a process group
    for case, expect in W.CASES.items():
        model = MoETransformer(_lm_cfg()).double()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with pytest.raises(CheckpointError, match=expect) as err:
            load_distributed(tmp_path / case, model, opt)
        assert str(tmp_path / case) in str(err.value)
    # only what is read is checked: the model alone loads from the copy with a damaged optimizer tensor
    model = MoETransformer(_lm_cfg()).double()
    load_distributed(tmp_path / "flipped_byte", model, rng=False)
    good = MoETransformer(_lm_cfg()).double()
    load_distributed(tmp_path / "good", good, rng=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), good.state_dict().values()))


def _saved(path: Path, step: int) -> None:
    torch.manual_seed(step)
    model = MoETransformer(_lm_cfg())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    save_distributed(path, model, None, None, meta={"step": step})


def _step_of(path: Path) -> int:
    model = MoETransformer(_lm_cfg())
    meta, _ = load_distributed(path, model, rng=False)
    values = {float(v) for p in model.parameters() for v in p.detach().flatten().unique()}
    assert values == {float(meta["step"])}, f"{path}: weights {values} under step {meta['step']}"
    return meta["step"]


@pytest.mark.parametrize(
    "state, expect",
    [
        ("before the swap", 1),  # checkpoint.dcp (step 1) and a finished .tmp (step 2)
        ("between the renames", 2),  # .old (step 1) and the finished .tmp (step 2)
        ("before removing .old", 2),  # checkpoint.dcp (step 2) and .old (step 1)
        ("unfinished tmp", 1),  # checkpoint.dcp (step 1) and a .tmp without its manifest
        ("only .old", 1),
    ],
)
def test_every_state_a_crashed_save_leaves_reads_a_complete_checkpoint(tmp_path, state, expect):
    one, two = tmp_path / "one", tmp_path / "two"
    _saved(one, 1)
    _saved(two, 2)

    def crashed(path: Path) -> Path:
        if state == "before the swap":
            shutil.copytree(one, path), shutil.copytree(two, tmp_of(path))
        elif state == "between the renames":
            shutil.copytree(one, old_path(path)), shutil.copytree(two, tmp_of(path))
        elif state == "before removing .old":
            shutil.copytree(two, path), shutil.copytree(one, old_path(path))
        elif state == "unfinished tmp":
            shutil.copytree(one, path), shutil.copytree(two, tmp_of(path))
            (tmp_of(path) / MANIFEST).unlink()
        else:
            shutil.copytree(one, old_path(path))
        return path

    path = crashed(tmp_path / "a" / "checkpoint.dcp")
    assert _step_of(resolve(path)) == expect
    repair(path)
    assert path.is_dir() and not tmp_of(path).exists() and not old_path(path).exists()
    assert _step_of(path) == expect
    # the next save starts from such a state: it ends with only its own checkpoint
    path = crashed(tmp_path / "b" / "checkpoint.dcp")
    _saved(path, 3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.dcp"] and _step_of(path) == 3


@pytest.mark.slow
def test_a_save_killed_at_any_moment_leaves_the_last_complete_checkpoint(tmp_path):
    """SIGKILL a process that saves in a loop, at random moments: the checkpoint found is complete,
    its weights match its step, and no finished save is lost."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    rnd = random.Random(0)
    for trial in range(4):
        path = tmp_path / f"t{trial}" / "checkpoint.dcp"
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "dcp_workers.py"), str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        done = 0
        try:
            while done < 3 + trial:
                line = proc.stdout.readline()
                assert line, proc.stderr.read()[-2000:]
                done = int(line)
            time.sleep(rnd.uniform(0.0, 0.15))  # somewhere in the next save(s)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            for line in proc.stdout.read().split():
                done = max(done, int(line))
        finally:
            proc.kill() if proc.poll() is None else None
            proc.stdout.close(), proc.stderr.close()
        found = resolve(path)
        assert found is not None
        step = _step_of(found)
        assert step in (done, done + 1), (step, done)  # the last finished save, or one killed after its manifest
        repair(path)
        assert _step_of(path) == step and read_manifest(path)["meta"]["step"] == step


def test_load_trained_and_export_hf_read_a_sharded_checkpoint(tmp_path):
    """A sub-run folder whose checkpoint is an EP=2 DCP folder loads in one process (the model's
    tensors only), equal to the model the ranks started from, and exports to Hugging Face."""
    from safetensors.torch import load_file

    from moekit.interop import export_hf
    from moekit.train.trainer import load_trained

    sub = tmp_path / "moe"
    store = ranks.store_path(tmp_path, "dcp")
    ranks.start(W.save_mixtral, (2, store, str(sub)), 2)
    torch.manual_seed(0)
    ref = MoETransformer(W.mixtral_cfg())
    model = load_trained(sub, W.mixtral_cfg())
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    export_hf(model, tmp_path / "hf", "mixtral")
    export_hf(ref, tmp_path / "hf_ref", "mixtral")
    got, want = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf_ref" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_dtensor_parameters_fsdp2_round_trip(tmp_path):
    """Parameters that are DTensors already (FSDP2 over 2 ranks) are saved as they are, reload
    exactly on 2 ranks, and in one process equal the full tensors."""
    store = ranks.store_path(tmp_path, "dcp")
    ranks.start(W.fsdp_round_trip, (2, store, str(tmp_path)), 2)
    one = MoETransformer(_lm_cfg()).double()
    opt = torch.optim.AdamW(one.parameters(), lr=1e-2)
    load_distributed(tmp_path / "fsdp", one, opt)
    full = torch.load(tmp_path / "fsdp-full.pt")
    for k, v in full.items():
        assert torch.equal(one.state_dict()[k], v), k


def test_a_mesh_made_for_the_meta_device_is_refused(tmp_path):
    store = ranks.store_path(tmp_path, "dcp")
    ranks.start(W.meta_mesh_refused, (2, store, str(tmp_path)), 2)


@pytest.mark.parametrize("statistics", ["local", "global"])
def test_routing_statistics_kept_per_rank_come_back_to_their_rank(tmp_path, statistics):
    """Issue 25, fault 1: per-rank ``expert_usage`` / ``steps_unused`` were saved as one rank's copy."""
    store = ranks.store_path(tmp_path, "dcp")
    args = (2, store, str(tmp_path), statistics)
    ranks.start(W.per_rank_statistics, args, 2)
    from moekit.train.checkpoint import load_checkpoint
    from moekit.train.distcp import convert_to_single_file

    one = MoETransformer(_lm_cfg()).double()
    load_distributed(tmp_path / "stats", one, rng=False)  # one process: rank 0's statistics
    single = MoETransformer(_lm_cfg()).double()
    load_checkpoint(convert_to_single_file(tmp_path / "stats", tmp_path / "one.safetensors"), single)
    for k, v in torch.load(tmp_path / "stats-rank0.pt").items():
        assert torch.equal(one.state_dict()[k], v) and torch.equal(single.state_dict()[k], v), k
