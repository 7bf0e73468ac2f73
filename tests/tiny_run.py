"""A tiny trained run for tests that need one (2 steps, width 32, 2 layers, byte tokenizer): the
command-line arguments and a module-scoped fixture body that trains it once."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = [
    "--steps",
    "2",
    "--eval-every",
    "2",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--dim",
    "32",
    "--layers",
    "2",
    "--quiet",
    "--tokenizer",
    "bytes",
    "--set",
    "train.code_chars=30000",
    "--set",
    "train.eval_windows=4",
    "--set",
    "model.moe.hidden_dim=16",
    "--set",
    "model.max_seq_len=64",
]


def train_tiny(tmp_path_factory, *extra: str):
    """Yield the path of a freshly trained tiny run (its data cache in the same temporary folder)."""
    from moekit.cli import main

    out: Path = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEKIT_CACHE", str(out / "cache"))
    assert main(["train", "--out", str(out), "--name", "s", *TINY, *extra]) == 0
    yield str(out / "s")
    mp.undo()
