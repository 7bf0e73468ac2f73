"""A tiny trained run for tests that need one (2 steps, width 32, 2 layers, byte tokenizer): the
command-line arguments and a module-scoped fixture body that trains it once."""

from __future__ import annotations

from pathlib import Path

import pytest


def tiny_args(
    steps: int = 2,
    eval_every: int = 2,
    batch: int = 2,
    seq: int = 16,
    dim: int = 32,
    layers: int = 2,
    code_chars: int = 30000,
    eval_windows: int = 4,
    hidden: int = 16,
    max_seq: int = 64,
    *extra: str,
) -> list[str]:
    """``moekit train`` arguments for a tiny run (byte tokenizer, quiet); ``extra`` appended."""
    return [
        *("--steps", str(steps), "--eval-every", str(eval_every), "--batch-size", str(batch)),
        *("--seq-len", str(seq), "--dim", str(dim), "--layers", str(layers), "--quiet", "--tokenizer", "bytes"),
        *("--set", f"train.code_chars={code_chars}", "--set", f"train.eval_windows={eval_windows}"),
        *("--set", f"model.moe.hidden_dim={hidden}", "--set", f"model.max_seq_len={max_seq}"),
        *extra,
    ]


TINY = tiny_args()


def train_tiny(tmp_path_factory, *extra: str):
    """Yield the path of a freshly trained tiny run (its data cache in the same temporary folder)."""
    from moekit.cli import main

    out: Path = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEKIT_CACHE", str(out / "cache"))
    assert main(["train", "--out", str(out), "--name", "s", *TINY, *extra]) == 0
    yield str(out / "s")
    mp.undo()
