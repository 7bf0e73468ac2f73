"""`moekit train` under torchrun with expert parallelism (real processes, gloo on CPU): the run
equals the single-process run, and its sharded checkpoints (each rank writes its part) resume on
another layout, one process included, and are read by generate, inspect and convert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import moekit as moekit_pkg

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

TINY = [
    "--tokenizer",
    "bytes",
    "--set",
    "train.code_chars=100000",
    "--dim",
    "64",
    "--layers",
    "2",
    "--set",
    "model.n_heads=2",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--eval-every",
    "4",
    "--set",
    "train.eval_windows=7",
    "--set",
    "train.checkpoint_every=100",
    "--quiet",
]
SRC = Path(moekit_pkg.__file__).resolve().parents[1]  # the moekit under test


def _env(tmp_path: Path) -> dict:
    # the subprocesses run in tmp_path: an inherited relative PYTHONPATH (PYTHONPATH=src) would not
    # find this checkout there, and they would silently import whatever moekit is installed
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, MOEKIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("WORLD_SIZE", None)
    return env


def moekit(tmp_path, *args, nproc: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "moekit",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "moekit", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def _losses(run: Path, label: str = "moe") -> list[float]:
    return [json.loads(line)["loss"] for line in (run / label / "metrics.jsonl").read_text().splitlines()]


def _dcp(sub: Path, step: int, ep: int) -> None:
    """``sub`` holds a sharded checkpoint of ``step`` written by 2 ranks at EP=``ep``, and no file."""
    manifest = json.loads((sub / "checkpoint.dcp" / "moekit.json").read_text())
    assert manifest["meta"]["step"] == step and manifest["meta"]["expert_parallel"] == ep, manifest["meta"]
    assert sorted(manifest["files"]) == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its part
    assert not (sub / "checkpoint.safetensors").exists()


def _row_counts(run: Path, label: str) -> list[tuple[int, int]]:
    """(elements, first dimension) of every parameter of the run's model ``label``."""
    from moekit.models import MoETransformer
    from moekit.runs import load_run_config

    cfgs = load_run_config(run)
    cfg = cfgs[0] if label == "moe" else cfgs[0].dense_twin()
    with torch.device("meta"):
        model = MoETransformer(cfg)
    return [(p.numel(), p.shape[0]) for p in model.parameters()]


def _summary(run: Path, label: str = "moe") -> dict:
    return json.loads((run / label / "summary.json").read_text())


@pytest.mark.slow
def test_torchrun_expert_parallel_run_equals_the_single_process_run(tmp_path):
    ep = moekit(
        tmp_path, "train", "--name", "ep", "--out", "runs", "--steps", "8", "--expert-parallel", "2", *TINY, nproc=2
    )
    assert ep.returncode == 0, ep.stderr[-3000:]
    one = moekit(tmp_path, "train", "--name", "one", "--out", "runs", "--steps", "8", *TINY)
    assert one.returncode == 0, one.stderr[-3000:]
    runs = tmp_path / "runs"
    for label in ("moe", "dense"):  # the dense twin runs data parallel
        a, b = _losses(runs / "ep", label), _losses(runs / "one", label)
        assert len(a) == len(b) == 8
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (label, a, b)
        sa, sb = _summary(runs / "ep", label), _summary(runs / "one", label)
        assert abs(sa["val_loss"] - sb["val_loss"]) < 1e-4
        assert sa["params_total"] == sb["params_total"]
        # each rank holds half of every parameter (FSDP; experts split by EP), their gradients and
        # AdamW moments, give or take FSDP's padding of each tensor's first dimension to a multiple of 2
        ba, bb = sa["state_bytes_per_rank"], sb["state_bytes_per_rank"]
        pad = 4 * sum(n // rows for n, rows in _row_counts(runs / "one", label))
        assert (ba["ranks"], bb["ranks"]) == (2, 1), (ba, bb)
        assert bb["parameters"] / 2 <= ba["parameters"] <= bb["parameters"] / 2 + pad, (label, ba, bb)
        # AdamW: two moments per parameter element, plus one step scalar per tensor on both
        assert ba["optimizer"] - 2 * ba["parameters"] == bb["optimizer"] - 2 * bb["parameters"] > 0, (label, ba, bb)
    assert "dense - MoE validation loss" in ep.stdout and ep.stdout.count("run folder") == 1  # rank 0 prints once
    for label in ("moe", "dense"):
        _dcp(runs / "ep" / label, 8, 2)
    # the sharded checkpoint is read in one process: generate, inspect, and convert to the one file
    greedy = ["generate", "--run", "runs/ep", "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"]
    gen = moekit(tmp_path, *greedy)
    assert gen.returncode == 0, gen.stderr[-2000:]
    ins = moekit(tmp_path, "inspect", "--run", "runs/ep", "--windows", "4")
    assert ins.returncode == 0, ins.stderr[-2000:]
    assert '"steps": 8' in (runs / "ep" / "inspect" / "report.json").read_text()
    conv = moekit(tmp_path, "convert", "--run", "runs/ep")
    assert conv.returncode == 0, conv.stderr[-2000:]
    for label in ("moe", "dense"):
        assert (runs / "ep" / label / "checkpoint.safetensors").is_file() and not (
            runs / "ep" / label / "checkpoint.dcp"
        ).exists()
    again = moekit(tmp_path, *greedy)
    assert again.returncode == 0 and again.stdout == gen.stdout, (gen.stdout, again.stdout)


@pytest.mark.slow
def test_compile_under_expert_parallelism_takes_the_eager_steps(tmp_path):
    """Issue 25, item 8: `--compile` under torchrun (EP=2) compiles each block, with the expert
    all-to-all and the statistics' collectives run eagerly between its graphs; every step's loss
    equals the eager run's (to float32 rounding: inductor fuses the arithmetic differently).
    (Compiled blocks inside activation checkpointing, whose routing counts run between the graphs:
    test_tensor_parallel.py's compiled case; one compiled run here: CI time.)"""
    runs = tmp_path / "runs"
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        args = ("--steps", "3", "--expert-parallel", "2", "--no-baseline", *extra)
        res = moekit(tmp_path, "train", "--name", name, "--out", "runs", *args, *TINY, nproc=2, timeout=600)
        assert res.returncode == 0, (name, res.stderr[-3000:])
        assert "recompile_limit" not in res.stderr, res.stderr[-3000:]  # the collectives are not traced into
    a, b = _losses(runs / "eager", "moe"), _losses(runs / "compiled", "moe")
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


@pytest.mark.slow
def test_stop_under_expert_parallel_then_resume_on_other_layouts_is_exact(tmp_path):
    """EP=2 -> EP=1 (data parallel on 2 ranks) -> one process, and one process -> EP=2: the
    per-step losses are those of an uninterrupted run."""
    args = ["--steps", "10", "--no-baseline", *TINY]
    stop = moekit(
        tmp_path, "train", "--name", "r", "--out", "runs", "--expert-parallel", "2", "--stop-at", "4", *args, nproc=2
    )
    assert stop.returncode == 0, stop.stderr[-3000:]
    assert "stopped at step 4" in stop.stdout
    _dcp(tmp_path / "runs/r/moe", 4, 2)
    dp = moekit(tmp_path, "train", "--resume", "runs/r", "--expert-parallel", "1", "--stop-at", "7", "--quiet", nproc=2)
    assert dp.returncode == 0, dp.stderr[-3000:]
    _dcp(tmp_path / "runs/r/moe", 7, 1)
    resumed = moekit(tmp_path, "train", "--resume", "runs/r", "--expert-parallel", "1", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "runs/r/moe/checkpoint.safetensors").is_file()  # one process writes the one file,
    assert not (tmp_path / "runs/r/moe/checkpoint.dcp").exists()  # and removes the folder it replaces
    straight = moekit(tmp_path, "train", "--name", "s", "--out", "runs", *args)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = _losses(tmp_path / "runs/r"), _losses(tmp_path / "runs/s")
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    # and a single-process checkpoint resumes under expert parallelism
    stop1 = moekit(tmp_path, "train", "--name", "q", "--out", "runs", "--stop-at", "6", *args)
    assert stop1.returncode == 0, stop1.stderr[-3000:]
    res2 = moekit(tmp_path, "train", "--resume", "runs/q", "--expert-parallel", "2", "--quiet", nproc=2)
    assert res2.returncode == 0, res2.stderr[-3000:]
    _dcp(tmp_path / "runs/q/moe", 10, 2)
    c = _losses(tmp_path / "runs/q")
    assert max(abs(x - y) for x, y in zip(c, b)) < 1e-4, (c, b)


def test_expert_parallel_without_torchrun_is_a_clear_error(tmp_path):
    res = moekit(tmp_path, "train", "--name", "x", "--out", "runs", "--steps", "2", "--expert-parallel", "2", *TINY)
    assert res.returncode == 2
    assert "torchrun --nproc-per-node 2" in res.stderr


def test_world_size_that_expert_parallel_does_not_divide_is_a_clear_error(tmp_path):
    res = moekit(
        tmp_path, "train", "--name", "x", "--out", "runs", "--steps", "2", "--expert-parallel", "3", *TINY, nproc=2
    )
    assert res.returncode != 0
    assert "expert_parallel=3 must divide the number of ranks (2)" in res.stderr


def test_batch_size_the_ranks_do_not_divide_is_a_clear_error(tmp_path):
    args = [a if a != "8" else "7" for a in TINY]  # --batch-size 7 on 2 ranks
    res = moekit(
        tmp_path, "train", "--name", "x", "--out", "runs", "--steps", "2", "--expert-parallel", "2", *args, nproc=2
    )
    assert res.returncode != 0
    assert "batch_size=7 must be divisible by the number of ranks (2)" in res.stderr


@pytest.mark.slow
def test_tensor_parallel_run_equals_the_single_process_run_and_resumes_on_another_layout(tmp_path):
    """`moekit train --tensor-parallel 2` (2 ranks reading the same rows, each its share of the
    heads, the dense FFN and the shared expert): the losses and validation of one process; its
    checkpoint resumes with expert parallelism instead, and the run still equals one process."""
    args = ("--steps", "6", "--no-baseline", *TINY)
    tp = moekit(tmp_path, "train", "--name", "tp", "--out", "runs", "--tensor-parallel", "2", "--stop-at", "3", *args,
                nproc=2)  # fmt: skip
    assert tp.returncode == 0, tp.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "tp" / "moe" / "checkpoint.dcp" / "moekit.json").read_text())
    assert manifest["tensor_parallel"] == 2 and manifest["meta"]["tensor_parallel"] == 2, manifest
    ep = moekit(tmp_path, "train", "--resume", "runs/tp", "--tensor-parallel", "1", "--expert-parallel", "2", "--quiet",
                nproc=2)  # fmt: skip
    assert ep.returncode == 0, ep.stderr[-3000:]
    one = moekit(tmp_path, "train", "--name", "one", "--out", "runs", *args)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _losses(tmp_path / "runs" / "tp"), _losses(tmp_path / "runs" / "one")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert abs(_summary(tmp_path / "runs" / "tp")["val_loss"] - _summary(tmp_path / "runs" / "one")["val_loss"]) < 1e-4


def test_a_layout_tensor_parallelism_cannot_take_is_refused_before_the_run_starts(tmp_path):
    res = moekit(tmp_path, "train", "--name", "x", "--out", "runs", "--steps", "2", "--tensor-parallel", "2",
                 *TINY, "--set", "model.n_heads=1", nproc=2)  # fmt: skip
    assert res.returncode != 0
    assert "tensor_parallel=2: n_heads=1 must be divisible by tensor_parallel=2" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "runs" / "x").exists()


@pytest.mark.slow
def test_pipeline_parallel_run_resumes_across_layouts_as_one_process_accumulating(tmp_path):
    """Issue 25, items 11 and 9: `moekit train --pipeline-parallel 2` (a block per rank, 4
    microbatches, 1F1B) stopped at step 3 and resumed with expert parallelism instead, both with
    full activation checkpointing, against one process with `--microbatches 4` stopped at step 3
    and resumed as 2 pipeline stages (its single-file checkpoint read into the stages): the same 6
    steps and validation (tied embeddings: the default model's)."""
    args = ("--steps", "6", "--no-baseline", "--microbatches", "4", *TINY)
    ac = ("--activation-checkpointing", "full")
    pp = moekit(tmp_path, "train", "--name", "pp", "--out", "runs", "--pipeline-parallel", "2", "--stop-at", "3", *ac,
                *args, nproc=2)  # fmt: skip
    assert pp.returncode == 0, pp.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "pp" / "moe" / "checkpoint.dcp" / "moekit.json").read_text())
    assert manifest["meta"]["pipeline_parallel"] == 2 and manifest["meta"]["step"] == 3, manifest["meta"]
    ep = moekit(tmp_path, "train", "--resume", "runs/pp", "--pipeline-parallel", "1", "--expert-parallel", "2",
                *ac, "--quiet", nproc=2)  # fmt: skip
    assert ep.returncode == 0, ep.stderr[-3000:]
    one = moekit(tmp_path, "train", "--name", "one", "--out", "runs", "--stop-at", "3", *args)
    assert one.returncode == 0, one.stderr[-3000:]
    assert (tmp_path / "runs" / "one" / "moe" / "checkpoint.safetensors").is_file()
    again = moekit(tmp_path, "train", "--resume", "runs/one", "--pipeline-parallel", "2", "--quiet", nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = _losses(tmp_path / "runs" / "pp"), _losses(tmp_path / "runs" / "one")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert abs(_summary(tmp_path / "runs" / "pp")["val_loss"] - _summary(tmp_path / "runs" / "one")["val_loss"]) < 1e-4
    rows = [json.loads(line) for line in (tmp_path / "runs" / "one" / "moe" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["tokens_per_expert"]) == 2 for r in rows)  # both stages' layers in every row
