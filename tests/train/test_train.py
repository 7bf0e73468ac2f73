"""The main job end to end on tiny configs: learning, exact resume, atomic checkpoints, Ctrl-C, CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny import tiny_cfgs

from moekit.cli import main
from moekit.train import CheckpointError, load_checkpoint, run_train, save_checkpoint
from moekit.train.checkpoint import read_checkpoint
from moekit.train.trainer import METRICS
from tiny_run import tiny_args

TINY = tiny_args(12, 6, 4, 32, 32, 2, 150000, 24, 32, 64)


def losses(path):
    return [json.loads(ln)["loss"] for ln in open(path / METRICS)]


def test_loss_goes_down(tmp_path):
    """A few dozen steps on the embedded corpus lower the training loss well below its start."""
    model, train = tiny_cfgs(steps=40, lr=1e-2)
    res = run_train(tmp_path / "r", model, train, baseline=False, progress=False, plots=False)
    ls = losses(tmp_path / "r" / "moe")
    assert sum(ls[-5:]) / 5 < sum(ls[:3]) / 3 - 1.0
    assert res["summaries"]["moe"]["val_loss"] < 5.5  # uniform over 257 bytes is 5.55


def test_resume_continues_exactly(tmp_path):
    """Stopping at step 7 and resuming gives the same loss curve as an uninterrupted run, step for step."""
    model, train = tiny_cfgs(steps=12, seed=3)
    model.moe.router = "noisy_topk"  # routing noise draws from the RNG that the checkpoint must restore
    run_train(tmp_path / "full", model, train, progress=False, plots=False)
    out = run_train(tmp_path / "cut", model, train, progress=False, plots=False, stop_at=7)
    assert out == {"stopped_at": 7, "label": "moe"}
    assert len(losses(tmp_path / "cut" / "moe")) == 7
    run_train(tmp_path / "cut", resume=True, progress=False, plots=False)
    for label in ("moe", "dense"):
        assert losses(tmp_path / "cut" / label) == losses(tmp_path / "full" / label), label


def test_checkpoint_round_trip_and_corrupt_file(tmp_path):
    """A checkpoint restores weights and optimizer state; a truncated one raises a one-line CheckpointError."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model, opt, rng={"torch": torch.get_rng_state()}, meta={"step": 5})
    assert not list(tmp_path.glob("*.tmp")), "no temporary file left behind"
    m2, o2 = torch.nn.Linear(3, 2), None
    o2 = torch.optim.AdamW(m2.parameters())
    meta, rng = load_checkpoint(tmp_path / "c.safetensors", m2, o2)
    assert meta["step"] == 5 and torch.equal(m2.weight, model.weight)
    torch.testing.assert_close(o2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    data = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_checkpoint(tmp_path / "bad.safetensors", m2)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors", m2)


def test_cli_end_to_end(tmp_path, capsys):
    """`moekit train` (MoE + dense), `generate` with and without cache, then errors as one line."""
    assert main(["train", "--out", str(tmp_path), "--name", "t", *TINY]) == 0
    out = capsys.readouterr().out
    assert "dense - MoE validation loss" in out and "active/token" in out
    run = tmp_path / "t"
    for f in (
        "config.json",
        "tokenizer.json",
        "comparison.json",
        "val_loss.png",
        "expert_load.png",
        "tokens_per_expert.png",
        "moe/checkpoint.safetensors",
        "dense/checkpoint.safetensors",
        "moe/metrics.jsonl",
    ):
        assert (run / f).exists(), f
    assert (run / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["moe"]["hidden_dim"] == 32 and cfg["train"]["steps"] == 12
    row = json.loads((run / "moe" / METRICS).read_text().splitlines()[-1])
    assert {"loss", "val_loss", "val_loss_prose", "val_loss_code", "balance", "tokens_per_expert"} <= set(row)

    gen = ["generate", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "20", "--temperature", "0"]
    assert main(gen) == 0
    a = capsys.readouterr().out
    assert main(gen + ["--no-cache"]) == 0
    assert capsys.readouterr().out == a, "greedy output is the same with and without the KV cache"
    assert a.startswith("def ")
    assert main(gen + ["--model", "dense"]) == 0
    capsys.readouterr()  # its text and its speed line (stderr)
    assert main(gen + ["--top-k-experts", "1", "--model", "dense"]) == 2, "a dense model has no experts to choose"
    assert "--top-k-experts 1" in capsys.readouterr().err

    (run / "moe" / "checkpoint.safetensors").write_bytes(b"garbage")
    assert main(gen) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt" in err
    assert main(["train", "--out", str(tmp_path), "--name", "t", *TINY]) == 2, "an existing run is not overwritten"
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(["train", "--out", str(tmp_path), "--set", "model.moe.top_k=99"]) == 2
    assert "top_k" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    """SIGINT during training writes a checkpoint, exits 130 with a hint; --resume then completes the run."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "moekit", "train", "--out", str(tmp_path), "--name", "c", *TINY]
    args[args.index("12")] = "100000"  # far more steps than we will wait for
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "c" / "moe" / METRICS
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "checkpoint saved" in out and "--resume" in out
    _, info = read_checkpoint(tmp_path / "c" / "moe" / "checkpoint.safetensors")
    step = info["meta"]["step"]
    assert step >= 3 and len(metrics.read_text().splitlines()) == step, "checkpoint and metrics agree"
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["train"]["steps"] = step + 2  # finish quickly
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--resume", str(tmp_path / "c")]) == 0
    assert len(metrics.read_text().splitlines()) == step + 2
