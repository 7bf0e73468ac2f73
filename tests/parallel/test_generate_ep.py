"""`moekit generate --nproc 2 --expert-parallel 2`: the experts spread over two processes started
the way `moekit train --nproc` starts them (torchrun's launcher, gloo), each computing the experts
it holds for every token: the same greedy text as one process, printed once; what it does not
combine with is one line before any process starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tiny_run import train_tiny

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    yield from train_tiny(tmp_path_factory, "--steps", "4", "--no-baseline")


def moekit(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.run([sys.executable, "-m", "moekit", *argv], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_expert_parallel_decoding_gives_one_process_text(run):
    base = ["generate", "--run", run, "--prompt", "def f(x):", "--max-new-tokens", "24", "--temperature", "0"]
    one = moekit(*base)
    assert one.returncode == 0, one.stderr
    two = moekit(*base, "--nproc", "2", "--expert-parallel", "2")
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout  # printed once, the same text
    assert "experts spread over 2 processes" in two.stderr and two.stderr.count("moekit generate:") == 1, two.stderr
    sampled = moekit(*base[:-1], "0.8", "--seed", "3", "--nproc", "2", "--expert-parallel", "2")
    assert sampled.returncode == 0 and sampled.stdout == moekit(*base[:-1], "0.8", "--seed", "3").stdout


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--nproc", "2"], "give --expert-parallel too"),
        (["--nproc", "3", "--expert-parallel", "2"], "--expert-parallel 2 must divide --nproc 3"),
        (["--nproc", "2", "--expert-parallel", "2", "--expert-memory", "1GB"], "leave out --expert-memory"),
        (["--nproc", "2", "--expert-parallel", "2", "--dtype", "int8"], "leave out --dtype"),
        (["--nproc", "2", "--expert-parallel", "0"], "--expert-parallel"),
    ],
)
def test_what_expert_parallel_decoding_refuses_is_one_line(run, extra, msg, capsys):
    """Refused before any process starts, so checked in this process (main, as the command runs it)."""
    from moekit.cli import main

    assert main(["generate", "--run", run, "--prompt", "a", *extra]) != 0
    res = capsys.readouterr()
    assert res.out == "" and msg in res.err and res.err.count("\n") == 1 and "Traceback" not in res.err, res.err
