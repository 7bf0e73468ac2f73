"""Review 22's bad inputs, each a one-line ``moekit <cmd>: error: ...`` naming what is wrong (never a
traceback, never lost work): layout checks before the run folder exists, read-only and full disks,
a model too big for the machine, broken run-folder files, odd names and small CLI gaps.

Read-only and full file systems are real: a tmpfs (or a read-only bind mount) in a private mount
namespace of the command's own (``unshare``), so nothing outside the test sees them; those tests
skip where the machine allows no such namespace."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import moekit as moekit_pkg
from moekit.cli import main
from moekit.config import LMConfig, MoEConfig, TrainConfig
from moekit.data.stream import covering_windows
from moekit.train.checkpoint import read_checkpoint
from moekit.train.run import available_memory, check_parallel_layout
from moekit.train.trainer import METRICS, TIMING_WARMUP_STEPS
from tiny_run import tiny_args

TINY = tiny_args(6, 3, 2, 16, 32, 1, 30000, 4, 16, 32, "--set", "train.checkpoint_every=2")
SRC = Path(moekit_pkg.__file__).resolve().parents[1]  # the moekit under test


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache(cache, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(cache))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    """A finished tiny run (MoE + dense, 6 steps); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(cache))
        assert main(["train", "--out", str(out), "--name", "done", *TINY]) == 0
    return out / "done"


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def one_line_error(capsys, argv, *words, code=2):
    assert main(argv) == code, argv
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"moekit {argv[0]}: error: "), err
    for w in words:
        assert w in err, (w, err)
    return lines[0]


def _env(tmp_path: Path) -> dict:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, MOEKIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("WORLD_SIZE", None)
    return env


# ------------------------------------------------------------------ private mounts (read-only, full)
def _unshare_prefix() -> list[str]:
    if os.geteuid() == 0:
        return ["unshare", "--mount", "--propagation", "private"]
    return ["unshare", "--map-root-user", "--mount", "--propagation", "private"]


def in_private_mounts(tmp_path: Path, setup: str, commands: list[list[str]], after: str = "") -> list[tuple[int, str]]:
    """Run ``setup`` (mount commands), each moekit command, then ``after`` (shell) in one private mount
    namespace: [(exit code, stderr)] per command. Skips the test where no such namespace can be made."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare(1) and mount(8) for a private mount namespace")
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    res = subprocess.run(
        [*_unshare_prefix(), "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(probe))}"],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        pytest.skip(f"no private mount namespace here (unshare/mount: {res.stderr.strip()[:120]})")
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    lines = ["set -e", setup, "set +e"]
    for i, cmd in enumerate(commands):
        argv = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "moekit", *cmd])
        lines.append(f"{argv} > {logs}/{i}.out 2> {logs}/{i}.err; echo $? > {logs}/{i}.rc")
    lines.append(after)
    res = subprocess.run(
        [*_unshare_prefix(), "sh", "-c", "\n".join(lines)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    return [(int((logs / f"{i}.rc").read_text()), (logs / f"{i}.err").read_text()) for i in range(len(commands))]


def assert_one_line(rc_err: tuple[int, str], cmd: str, *words, code: int = 2) -> str:
    rc, err = rc_err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert lines[0].startswith(f"moekit {cmd}: error: "), err
    for w in words:
        assert w in lines[0], (w, err)
    return lines[0]


# ------------------------------------------------------------------ 4: layout checks before the folder
def _moe_cfg(num_experts=4, **moe_kw):
    return LMConfig(
        vocab_size=257,
        dim=32,
        n_layers=1,
        n_heads=4,
        max_seq_len=32,
        moe=MoEConfig(dim=32, hidden_dim=16, num_experts=num_experts, top_k=2, **moe_kw),
    )


def test_the_parallel_layout_is_checked_from_the_configs_alone():
    """The checks apply_expert_parallel and the trainer make once a process group exists, made from
    the configs and the world size (no communication), so they can run before the folder exists."""
    train = TrainConfig(expert_parallel=2, batch_size=4)
    with pytest.raises(ValueError, match=r"expert_parallel=2 must divide model\.moe\.num_experts=3"):
        check_parallel_layout(train, [_moe_cfg(3)], world_size=2)
    with pytest.raises(ValueError, match=r"expert_parallel=2 must divide the number of ranks \(3\)"):
        check_parallel_layout(train, [_moe_cfg(4)], world_size=3)
    with pytest.raises(ValueError, match=r"batch_size=4 must be divisible by the number of ranks \(8\)"):
        check_parallel_layout(train, [_moe_cfg(4)], world_size=8)
    with pytest.raises(ValueError, match="revive_after"):
        check_parallel_layout(train, [_moe_cfg(4, revive_after=10)], world_size=2)
    # compile under torchrun is allowed (each block compiled: issue 25 item 8)
    check_parallel_layout(TrainConfig(expert_parallel=2, batch_size=4, compile=True), [_moe_cfg(4)], world_size=2)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        check_parallel_layout(train, [_moe_cfg(4)], world_size=1)
    check_parallel_layout(train, [_moe_cfg(4), _moe_cfg(4).dense_twin()], world_size=4)  # a layout that fits
    check_parallel_layout(train, [_moe_cfg(3).dense_twin()], world_size=2)  # a dense model has no experts to split


def test_a_pipeline_layout_is_checked_from_the_configs_alone():
    """Issue 25, item 11: `--pipeline-parallel N` (with `--microbatches M`), refused by name before
    the run folder exists."""
    two = LMConfig(**{**_moe_cfg(4).to_dict(), "n_layers": 2, "moe": _moe_cfg(4).moe})

    def pp(**kw):
        return TrainConfig(**{"pipeline_parallel": 2, "microbatches": 2, "batch_size": 8, **kw})

    with pytest.raises(ValueError, match=r"microbatches=1 must be at least pipeline_parallel=2"):
        TrainConfig(pipeline_parallel=2)
    with pytest.raises(ValueError, match="pipeline_parallel=2 needs one process per rank"):
        check_parallel_layout(pp(), [two], world_size=1)
    with pytest.raises(ValueError, match=r"pipeline_parallel=2 must divide the number of ranks \(3\)"):
        check_parallel_layout(pp(), [two], world_size=3)
    with pytest.raises(ValueError, match=r"expert_parallel=4 must divide the 2 ranks of each pipeline stage"):
        check_parallel_layout(pp(expert_parallel=4), [two], world_size=4)
    with pytest.raises(ValueError, match="tensor_parallel > 1 together with pipeline_parallel > 1"):
        check_parallel_layout(pp(tensor_parallel=2), [two], world_size=4)
    with pytest.raises(ValueError, match=r"pipeline_parallel=2: pipeline_parallel must be between 1 and the model's 1"):
        check_parallel_layout(pp(), [_moe_cfg(4)], world_size=2)
    with pytest.raises(ValueError, match="cannot run hash routing"):
        hashed = LMConfig(**{**two.to_dict(), "moe": MoEConfig(dim=32, hidden_dim=16, num_experts=4, router="hash")})
        check_parallel_layout(pp(), [hashed], world_size=2)
    with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by the 2 pipelines .* times microbatches=2"):
        check_parallel_layout(pp(batch_size=6), [two], world_size=4)
    with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by microbatches=4"):
        check_parallel_layout(TrainConfig(batch_size=6, microbatches=4), [two], world_size=1)
    check_parallel_layout(pp(expert_parallel=2), [two, two.dense_twin()], world_size=4)  # a layout that fits


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_a_bad_expert_parallel_layout_under_torchrun_creates_no_run_folder(tmp_path):
    """`torchrun ... moekit train --experts 3 --expert-parallel 2`: the error came after runs/NAME was
    written, so the corrected retry said "already holds a run" (and --resume hit the same error)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moekit"]
    args = ["train", "--out", str(tmp_path / "runs"), "--name", "ep", *TINY, "--experts", "3", "--top-k", "2"]
    res = subprocess.run(
        [*cmd, *args, "--expert-parallel", "2"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ": error: " in ln]
    assert errors and all(
        "expert_parallel=2 must divide model.moe.num_experts=3" in ln and ln.startswith("moekit train (rank ")
        for ln in errors
    ), res.stderr
    assert not (tmp_path / "runs" / "ep").exists(), "no run folder for a layout that cannot train"


@pytest.mark.slow
# ------------------------------------------------------------------ 5: read-only and full disks
def test_read_only_out_resume_and_inspect_are_one_line_errors(tmp_path, finished):
    runs = tmp_path / "runs"
    runs.mkdir()
    run = copy_run(finished, runs, "r")
    elsewhere = tmp_path / "reports"
    q = shlex.quote(str(runs))
    results = in_private_mounts(
        tmp_path,
        f"mount --bind {q} {q}\nmount -o remount,bind,ro {q}",
        [
            ["train", "--out", str(runs), "--name", "new", *TINY],
            ["train", "--out", str(runs / "deeper" / "still"), *TINY],
            ["train", "--resume", str(run), "--steps", "8"],
            ["inspect", "--run", str(run)],
            ["inspect", "--run", str(run), "--out", str(elsewhere)],  # the way out the error names
        ],
    )
    assert_one_line(results[0], "train", "--out", str(runs), "Read-only file system")
    assert_one_line(results[1], "train", "--out", str(runs), "Read-only file system")
    assert_one_line(results[2], "train", f"--resume {run}", "Read-only file system")
    assert_one_line(results[3], "inspect", str(run / "inspect"), "--out DIR", "Read-only file system")
    assert results[4][0] == 0, results[4][1]
    assert (elsewhere / "report.html").exists()
    steps = [json.loads(ln)["step"] for ln in (run / "moe" / METRICS).read_text().splitlines()]
    assert steps == list(range(1, 7)), "the refused commands changed nothing"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555; the read-only mount test covers it")
def test_an_out_folder_without_write_permission_is_a_one_line_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        one_line_error(capsys, ["train", "--out", str(locked), "--name", "r", *TINY], "--out", "Permission denied")
    finally:
        locked.chmod(0o755)
    assert not (locked / "r").exists()


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_says_so(tmp_path, capsys):
    """A tmpfs with room for one checkpoint but not for the temporary copy of the next: the save at
    step 4 fails with ENOSPC from the real write. The error says the step-2 checkpoint is intact (it
    is: the run folder, copied off the tmpfs, holds it) and the run finishes from it on a disk with room."""
    probe = tmp_path / "probe_runs"
    assert main(["train", "--out", str(probe), "--name", "p", *TINY, "--no-baseline", "--stop-at", "2"]) == 0
    size = (probe / "p" / "moe" / "checkpoint.safetensors").stat().st_size
    capsys.readouterr()
    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    kib = (size + 160 * 1024) // 1024  # one checkpoint and the small files fit; a second copy does not
    results = in_private_mounts(
        tmp_path,
        f"mount -t tmpfs -o size={kib}k tmpfs {shlex.quote(str(disk))}",
        [["train", "--out", str(disk), "--name", "r", *TINY, "--no-baseline"]],
        after=f"cp -r {shlex.quote(str(disk / 'r'))} {shlex.quote(str(saved))}",  # the tmpfs ends with the namespace
    )
    line = assert_one_line(
        results[0],
        "train",
        "could not write the checkpoint of step 4",
        "No space left on device",
        "the last checkpoint (step 2) is intact",
        f"moekit train --resume {disk / 'r'}",
        code=1,
    )
    assert str(disk / "r" / "moe" / "checkpoint.safetensors") in line
    assert read_checkpoint(saved / "moe" / "checkpoint.safetensors")[1]["meta"]["step"] == 2
    assert not [p.name for p in (saved / "moe").iterdir() if p.name.endswith(".tmp")], "no temporary left behind"
    assert main(["train", "--resume", str(saved)]) == 0
    steps = [json.loads(ln)["step"] for ln in (saved / "moe" / METRICS).read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_a_model_too_big_for_memory_is_refused_before_anything_is_allocated(tmp_path, capsys):
    assert available_memory("cpu") is not None and available_memory("cpu")[0] > 0
    line = one_line_error(
        capsys,
        [
            "train",
            "--out",
            str(tmp_path),
            "--name",
            "big",
            *TINY,
            "--set",
            "model.moe.num_experts=1000000",
            "--set",
            # 1.3e14 parameters: one expert tensor alone exceeds a 64-bit process's address space (128 TiB),
            # so even before the check the allocation failed at once (no machine was ever at risk)
            "model.moe.hidden_dim=4194304",
        ],
        "model.moe.num_experts=1000000",
        "GiB",
        "is free here",
    )
    assert "make the model smaller" in line
    assert not (tmp_path / "big").exists(), "refused before the run folder is created"


def test_an_empty_tokenizer_file_is_named_as_invalid(tmp_path, capsys, finished):
    run = copy_run(finished, tmp_path)
    (run / "tokenizer.json").write_text("{}")
    for argv in (["generate", "--run", str(run)], ["inspect", "--run", str(run)]):
        one_line_error(capsys, argv, f"tokenizer file {run / 'tokenizer.json'} is invalid")
    (run / "tokenizer.json").write_bytes(os.urandom(64) + b"\xff")
    one_line_error(capsys, ["generate", "--run", str(run)], str(run / "tokenizer.json"), "not valid JSON")


# ------------------------------------------------------------------ 6: run-folder files name themselves
def test_a_garbage_config_json_is_named(tmp_path, capsys, finished):
    run = copy_run(finished, tmp_path)
    (run / "config.json").write_bytes(b"\x8f\xfc" + os.urandom(200))
    for argv in (["generate", "--run", str(run)], ["inspect", "--run", str(run)], ["train", "--resume", str(run)]):
        one_line_error(capsys, argv, f"{run / 'config.json'} is not valid JSON", "UTF-8")
    (run / "config.json").write_text('{"model": 3, "train": {}}')
    one_line_error(capsys, ["generate", "--run", str(run)], f"{run / 'config.json'} is not a valid run config")


def test_garbage_summary_and_comparison_files_are_named_and_rewritten(tmp_path, capsys, finished):
    run = copy_run(finished, tmp_path)
    (run / "comparison.json").write_bytes(b"\xfe\xff" + os.urandom(100))
    with pytest.warns(UserWarning, match=r"comparison\.json is not valid JSON.*leaves out the validation losses"):
        assert main(["inspect", "--run", str(run), "--windows", "4"]) == 0
    (run / "moe" / "summary.json").write_bytes(b"\xfe\xff" + os.urandom(100))
    with pytest.warns(UserWarning, match=r"moe/summary\.json is not valid JSON.*a resume writes it again"):
        assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "moe" / "summary.json").read_text())["steps"] == 6
    assert json.loads((run / "comparison.json").read_text())["summaries"]["moe"]["steps"] == 6


def test_a_data_file_whose_name_is_not_utf8_trains_and_inspects(tmp_path, capsys):
    data = tmp_path / os.fsdecode(b"text-\xff.txt")  # a surrogate-escaped str, as argv gives it
    data.write_text("def f(x):\n    return x + 1\n" * 300 + "Some prose about the code.\n" * 100)
    args = ["train", "--out", str(tmp_path), "--name", "u", *TINY, "--no-baseline", "--data", str(data)]
    assert main([*args, "--tokenizer", "bpe", "--set", "train.vocab_size=300"]) == 0
    assert main(["inspect", "--run", str(tmp_path / "u"), "--windows", "4"]) == 0
    assert (tmp_path / "u" / "inspect" / "report.html").exists()


# ------------------------------------------------------------------ 13: small ones
def test_every_validation_domain_gets_a_loss():
    """Four evenly spaced windows over a stream with a short run of domain 1 miss it: extra windows
    inside it give it a loss (the fixed windows, unchanged, give the overall one)."""
    domain_N = torch_cat([0] * 2000 + [1] * 40 + [0] * 2000)
    starts, extra = covering_windows(domain_N, 16, 4)
    fixed = starts[~extra]
    assert fixed.tolist() == covering_windows(torch_cat([0] * 4040), 16, 4)[0].tolist()
    assert extra.any()
    for s in starts[extra].tolist():
        assert domain_N[s + 1] == 1, "each extra window predicts domain-1 tokens"
    both = torch_cat([0, 1] * 500)
    assert not covering_windows(both, 16, 4)[1].any(), "no extra windows when every domain is covered"


def torch_cat(values):
    import torch

    return torch.tensor(values, dtype=torch.uint8)


def test_a_domain_the_fixed_windows_miss_is_measured_not_nan(finished, capsys):
    """TINY's 4 validation windows miss the little code of its corpus: val_loss_code was missing and
    the summary printed nan."""
    comparison = json.loads((finished / "comparison.json").read_text())
    for label, summary in comparison["summaries"].items():
        for domain in comparison["data"]["domains"]:
            value = summary.get(f"val_loss_{domain}")
            assert value is not None and value == value, (label, domain)  # present and not nan
    from moekit.cli import print_summary

    print_summary(finished, comparison)
    assert "nan" not in capsys.readouterr().out


def test_tokens_per_s_leaves_out_the_first_steps(finished):
    """The summary's tokens/s is the steady state: the steps after the first TIMING_WARMUP_STEPS (a
    --compile run compiles in them), recomputed here from each step's own figure."""
    tokens_per_step = 2 * 16
    for label in ("moe", "dense"):
        summary = json.loads((finished / label / "summary.json").read_text())
        rows = [json.loads(ln) for ln in (finished / label / METRICS).read_text().splitlines()]
        later = [tokens_per_step / r["tokens_per_s"] for r in rows[TIMING_WARMUP_STEPS:]]  # seconds per step
        assert summary["tokens_per_s_steps"] == len(later) == 6 - TIMING_WARMUP_STEPS
        assert summary["tokens_per_s"] == pytest.approx(tokens_per_step * len(later) / sum(later), rel=1e-9)


def test_generate_refuses_experts_per_token_for_a_dense_model(capsys, finished):
    one_line_error(
        capsys,
        ["generate", "--run", str(finished), "--model", "dense", "--top-k-experts", "2"],
        "--top-k-experts 2",
        "dense",
    )
    assert main(["generate", "--run", str(finished), "--model", "moe", "--top-k-experts", "1"]) == 0


def test_generate_notes_an_unfinished_run(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--name", "half", *TINY, "--no-baseline", "--stop-at", "3"]) == 0
    capsys.readouterr()
    assert main(["generate", "--run", str(tmp_path / "half"), "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "moekit generate: note: run half stopped at step 3 of 6" in err, err
    assert main(["train", "--resume", str(tmp_path / "half")]) == 0
    capsys.readouterr()
    assert main(["generate", "--run", str(tmp_path / "half"), "--max-new-tokens", "4"]) == 0
    assert "stopped at step" not in capsys.readouterr().err


def test_an_empty_name_and_a_config_folder_are_refused(tmp_path, capsys):
    one_line_error(capsys, ["train", "--out", str(tmp_path), "--name", "", *TINY], "--name", "empty")
    assert list(tmp_path.iterdir()) == [], "no timestamped run was started instead"
    folder = tmp_path / "cfg"
    folder.mkdir()
    one_line_error(capsys, ["train", "--config", str(folder)], f"--config: {folder} is a directory")
