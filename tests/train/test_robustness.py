"""Training survives what happens to real runs: damaged checkpoints, divergence, SIGTERM, kills
during a write. Real files, real subprocesses, real signals; tiny models, few steps."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import tiny_cfgs

from moekit.cli import main
from moekit.data import build_data
from moekit.train import CheckpointError, Trainer, TrainingDiverged, load_checkpoint, save_checkpoint
from moekit.train.checkpoint import CHECKSUMS, read_checkpoint
from moekit.train.trainer import CHECKPOINT, METRICS
from tiny_run import tiny_args

TINY = tiny_args(12, 6, 4, 32, 32, 2, 150000, 24, 32, 64, "--threads", "1")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run of TINY (MoE + dense) stopped at step 5 of 12: config, tokenizer, moe/ checkpoint and metrics."""
    root = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        assert main(["train", "--out", str(root), "--name", "run", *TINY, "--stop-at", "5"]) == 0
    return root / "run"


@pytest.fixture
def run(stopped_run, tmp_path):
    """A private copy of the stopped run."""
    return shutil.copytree(stopped_run, tmp_path / "run")


def rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def weights_finite(path):
    tensors, _ = read_checkpoint(path)
    return all(
        bool(torch.isfinite(v).all()) for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point()
    )


# ------------------------------------------------------------------ damaged checkpoints, divergence
def test_corrupt_tensor_data_fails_resume_naming_the_file(run, capsys):
    """4 KB overwritten in the middle of a checkpoint's tensor data: resume stops with one line naming the file."""
    ckpt = run / "moe" / CHECKPOINT
    data = bytearray(ckpt.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    mid = (header_end + len(data)) // 2
    assert header_end < mid - 2048 and mid + 2048 < len(data), "the 4 KB lie inside the tensor data"
    data[mid - 2048 : mid + 2048] = os.urandom(4096)
    ckpt.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(ckpt) in err and "corrupt" in err and "SHA-256" in err, err
    assert not (run / "moe" / "summary.json").exists()
    with safe_open(str(ckpt), framework="pt") as f:  # the header is still a plain, readable safetensors header
        assert CHECKSUMS in f.metadata()
    with pytest.raises(CheckpointError, match="does not match its SHA-256 checksum"):
        read_checkpoint(ckpt)


def test_checkpoint_without_checksums_loads_with_a_warning(tmp_path):
    """A checkpoint written before the checksums (no moekit.sha256 metadata) still loads, with a warning naming it."""
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "old.safetensors"
    save_file(
        {"model." + k: v for k, v in model.state_dict().items()},
        str(path),
        metadata={"moekit": json.dumps({"meta": {"step": 4}})},
    )
    m2 = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="no checksums") as rec:
        meta, _ = load_checkpoint(path, m2)
    assert str(path) in str(rec[0].message)
    assert meta == {"step": 4} and torch.equal(m2.weight, model.weight)
    # and other tools read what moekit writes
    save_checkpoint(tmp_path / "new.safetensors", model, meta={"step": 1})
    assert torch.equal(load_file(str(tmp_path / "new.safetensors"))["model.weight"], model.weight)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run, capsys):
    """An absurd learning rate after the step-5 checkpoint: the CLI stops with one line naming the step,
    nothing non-finite is written, and the step-5 checkpoint stays on disk unchanged."""
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["lr"] = 1e30
    (run / "config.json").write_text(json.dumps(cfg))
    ckpt = run / "moe" / CHECKPOINT
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not finite" in err and "step" in err and "(step 5)" in err, err
    assert ckpt.read_bytes() == before, "the last good checkpoint is kept as it was"
    assert read_checkpoint(ckpt)[1]["meta"]["step"] == 5 and weights_finite(ckpt)
    assert not (run / "moe" / "summary.json").exists() and not (run / "dense").exists()


def tiny_trainer(path, steps=12):
    model, train = tiny_cfgs(steps)
    data = build_data(None, "bytes", 257, 60_000)
    return Trainer(path, model, train, data, progress=False)


def test_nan_weight_stops_at_that_step_and_no_non_finite_checkpoint_is_written(tmp_path):
    """A NaN in a weight: the next step stops with TrainingDiverged naming it, unapplied; saving
    weights that are not finite is refused, so the file on disk stays the last good one."""
    tr = tiny_trainer(tmp_path / "moe")
    assert tr.fit(stop_at=3) == {"stopped_at": 3}
    ckpt = tmp_path / "moe" / CHECKPOINT
    good = ckpt.read_bytes()
    name, p = next((n, p) for n, p in tr.model.named_parameters() if p.dim() == 2)
    with torch.no_grad():
        p[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"step 4: the loss is nan.*\(step 3\)"):
        tr.fit()
    assert tr.step == 3 and ckpt.read_bytes() == good
    with pytest.raises(TrainingDiverged, match=f"not finite \\({name}\\)"):
        tr.save()
    with torch.no_grad():
        p[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="no checkpoint written"):
        tr.save()
    assert ckpt.read_bytes() == good and weights_finite(ckpt)
    assert not list((tmp_path / "moe").glob("*.tmp"))


@pytest.mark.slow
# ------------------------------------------------------------------ SIGTERM
def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path):
    """`docker stop` / a scheduler's SIGTERM: the step finishes, a checkpoint is written, exit 143;
    --resume then completes the run with the same per-step losses as an uninterrupted one."""
    args = ["train", "--out", str(tmp_path), *TINY]
    args[args.index("12")] = "40"
    assert main([*args, "--name", "ref"]) == 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moekit", *args, "--name", "cut"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "cut" / "moe" / METRICS
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and proc.poll() is None
        and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3)
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "SIGTERM" in out and "checkpoint saved" in out and "--resume" in out, out
    label = "dense" if (tmp_path / "cut" / "dense" / CHECKPOINT).exists() else "moe"
    _, info = read_checkpoint(tmp_path / "cut" / label / CHECKPOINT)
    step = info["meta"]["step"]
    assert 3 <= step < 40 and len(rows(tmp_path / "cut" / label / METRICS)) == step, "checkpoint and metrics agree"
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    for sub in ("moe", "dense"):
        cut, ref = rows(tmp_path / "cut" / sub / METRICS), rows(tmp_path / "ref" / sub / METRICS)
        assert [r["loss"] for r in cut] == [r["loss"] for r in ref], sub
        assert [r["step"] for r in cut] == list(range(1, 41))


def test_stop_signal_handlers_are_restored(tmp_path):
    """Training installs its SIGINT / SIGTERM handlers only while it runs."""

    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        sigint = signal.getsignal(signal.SIGINT)
        tr = tiny_trainer(tmp_path / "moe", steps=2)
        tr.fit()
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, old)


# ------------------------------------------------------------------ kills during a write
def test_torn_metrics_line_is_dropped_with_a_warning_on_resume(run):
    """A kill while a metrics row was being written leaves a torn last line: resume drops it with a
    warning naming the file, rewrites the file atomically (a new file renamed over the old one) and finishes."""
    metrics = run / "moe" / METRICS
    with open(metrics, "a") as f:
        f.write('{"step": 6, "loss": 5.4, "aux_lo')
    inode = metrics.stat().st_ino
    with open(metrics) as held:  # a reader of the old file (a plot, `tail -f`) keeps a whole file
        with pytest.warns(UserWarning, match="dropped 1 unreadable line") as rec:
            assert main(["train", "--resume", str(run), "--quiet"]) == 0
        assert held.read().endswith('"aux_lo'), "the old file was replaced, not rewritten in place"
    assert str(metrics) in str(rec[0].message)
    assert metrics.stat().st_ino != inode
    assert [r["step"] for r in rows(metrics)] == list(range(1, 13))
    assert not list((run / "moe").glob("*.tmp"))


def test_stale_temporary_checkpoint_is_removed_on_resume(run):
    """A kill during a checkpoint write leaves `checkpoint.safetensors.<random>.tmp`: resume removes
    it (and other files of the folder stay)."""
    ckpt = run / "moe" / CHECKPOINT
    stale = run / "moe" / (CHECKPOINT + ".k3x_9q2a.tmp")
    stale.write_bytes(ckpt.read_bytes()[:1000])
    keep = run / "moe" / "notes.tmp"
    keep.write_text("mine")
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert not stale.exists() and keep.read_text() == "mine"
    assert read_checkpoint(ckpt)[1]["meta"] == {"step": 12, "label": "moe", "finished": True}


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    """The one reader of metrics.jsonl (plots, inspect, resume checks) keeps the readable rows of a
    file whose last write a kill cut short, instead of failing on it."""
    from moekit.train.trainer import read_metrics

    (tmp_path / METRICS).write_text('{"step": 1, "loss": 5.0}\n\n{"step": 2, "loss": 4.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert read_metrics(tmp_path / "nothing") == []
