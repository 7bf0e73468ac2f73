"""Training survives what happens to real runs: damaged checkpoints, kills during a write. Real
files; tiny models, few steps."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moekit.cli import main
from moekit.train import CheckpointError, load_checkpoint, save_checkpoint
from moekit.train.checkpoint import CHECKSUMS, read_checkpoint
from moekit.train.trainer import CHECKPOINT, METRICS

TINY = ["--steps", "12", "--eval-every", "6", "--batch-size", "4", "--seq-len", "32", "--dim", "32", "--layers", "2",
        "--quiet", "--tokenizer", "bytes", "--threads", "1", "--set", "train.code_chars=150000",
        "--set", "train.eval_windows=24", "--set", "model.moe.hidden_dim=32", "--set", "model.max_seq_len=64"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


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


# ------------------------------------------------------------------ damaged checkpoints
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
    save_file({"model." + k: v for k, v in model.state_dict().items()}, str(path), metadata={"moekit": json.dumps({"meta": {"step": 4}})})
    m2 = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="no checksums") as rec:
        meta, _ = load_checkpoint(path, m2)
    assert str(path) in str(rec[0].message)
    assert meta == {"step": 4} and torch.equal(m2.weight, model.weight)
    # and other tools read what moekit writes
    save_checkpoint(tmp_path / "new.safetensors", model, meta={"step": 1})
    assert torch.equal(load_file(str(tmp_path / "new.safetensors"))["model.weight"], model.weight)


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
