"""Ctrl-C and SIGTERM on several processes (real processes, real signals, gloo on CPU).

`moekit train --nproc N` runs torchrun's elastic agent inside moekit and ends as one process does:
the workers finish the step, save, and the command exits 130 after Ctrl-C (SIGINT to the whole
foreground process group, as a terminal sends it) and 143 after SIGTERM (to the launcher alone, as
`docker stop` sends it), with rank 0's one line and no traceback; `--resume` continues the run.
Plain torchrun saves the same way but exits 1 with a SignalException traceback (torch 2.13): the
README says so, and the last test checks that what it says is still what torchrun does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from test_train_ep import TINY as EP_TINY

import moekit as moekit_pkg

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

TINY = EP_TINY  # the same small run as the EP training tests
TRAIN = ["train", "--out", "runs", "--no-baseline", "--expert-parallel", "2", "--steps", "100000", *TINY]
SRC = Path(moekit_pkg.__file__).resolve().parents[1]  # the moekit under test
# what must never reach the terminal: a traceback, torchrun's exception, its agent's log lines, FSDP2's
# warning about views among a wrapped module's outputs (issue 22, item 12)
NOISE = ("Traceback", "SignalException", "ChildFailedError", "death signal", "closing signal", "view tensor")


def _env(tmp_path: Path) -> dict:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, MOEKIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=path)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MOEKIT_LAUNCH_DIR", "LOGLEVEL"):
        env.pop(k, None)
    return env


def _start(tmp_path: Path, cmd: list[str]) -> subprocess.Popen:
    # a session of its own: its process group stands for a terminal's foreground job
    return subprocess.Popen(
        [sys.executable, *cmd],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moekit", *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "moe" / "metrics.jsonl").read_text().splitlines()]


def _wait_for_steps(proc: subprocess.Popen, run: Path, steps: int = 3) -> None:
    metrics = run / "moe" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.1)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"no training steps (exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")


def _stop(proc: subprocess.Popen, sig: int, *, group: bool) -> tuple[str, str]:
    if group:
        os.killpg(proc.pid, sig)  # a terminal's Ctrl-C: the foreground process group
    else:
        proc.send_signal(sig)  # `docker stop`, `kill PID`: the launcher alone
    try:
        return proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _saved_step(run: Path) -> int:
    manifest = json.loads((run / "moe" / "checkpoint.dcp" / "moekit.json").read_text())
    assert sorted(manifest["files"]) == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote their part
    return manifest["meta"]["step"]


def _clean(err: str) -> None:
    found = [n for n in NOISE if n in err]
    assert not found, f"{found} on stderr:\n{err[-4000:]}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, group, code, resume_nproc",
    [(signal.SIGINT, True, 130, "2"), (signal.SIGTERM, False, 143, "1")],
    ids=["ctrl-c-to-the-process-group", "sigterm-to-the-launcher"],
)
def test_nproc_run_stops_like_one_process(tmp_path, sig, group, code, resume_nproc):
    run = tmp_path / "runs" / "r"
    proc = _start(tmp_path, ["-m", "moekit", *TRAIN, "--name", "r", "--nproc", "2"])
    _wait_for_steps(proc, run)
    out, err = _stop(proc, sig, group=group)
    assert proc.returncode == code, (out[-2000:], err[-4000:])
    _clean(err)
    name = signal.Signals(sig).name
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and f"interrupted ({name}) at step" in lines[0], out  # rank 0 alone, one line
    assert "checkpoint saved in runs/r/moe. Continue with: moekit train --resume runs/r --nproc 2" in lines[0]
    step = _saved_step(run)
    assert step >= 3 and [r["step"] for r in _rows(run)] == list(range(1, step + 1)), "checkpoint and metrics agree"
    # --resume continues: on two processes again, or on one (expert parallelism 1 then)
    more = ["--expert-parallel", "1"] if resume_nproc == "1" else []
    res = _run(tmp_path, "train", "--resume", "runs/r", "--nproc", resume_nproc, "--steps", str(step + 2), *more)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    _clean(res.stderr)
    assert [r["step"] for r in _rows(run)] == list(range(1, step + 3))
    assert "run folder: runs/r" in res.stdout


@pytest.mark.slow
def test_a_third_ctrl_c_kills_workers_that_do_not_stop(tmp_path):
    """A worker that cannot stop (here: stopped with SIGSTOP, so its peer waits in a collective too):
    the first Ctrl-C asks, the second (SIGTERM to the workers) insists, the third kills them; the
    command exits 130 with one line and leaves no process behind."""
    run = tmp_path / "runs" / "h"
    proc = _start(tmp_path, ["-m", "moekit", *TRAIN, "--name", "h", "--nproc", "2"])
    _wait_for_steps(proc, run)
    workers = sorted(
        int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    )
    assert len(workers) == 2, workers
    try:
        os.kill(workers[1], signal.SIGSTOP)
        for _ in range(2):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(1.5)  # more than a second apart: a second signal, not the first one twice
        out, err = _stop(proc, signal.SIGINT, group=True)
        assert proc.returncode == 130, (out[-2000:], err[-4000:])
        _clean(err)
        lines = [line for line in err.splitlines() if line.startswith("moekit")]
        assert lines == [
            "moekit train: stopped (SIGINT); ranks 0, 1 were killed before finishing; "
            "each model keeps its last complete checkpoint"
        ], err
        assert not [p for p in workers if Path(f"/proc/{p}").exists()], "a worker was left running"
    finally:
        for p in workers:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_plain_torchrun_saves_then_exits_1_with_a_traceback_as_documented(tmp_path):
    """What the README says about plain torchrun (torch 2.13): it forwards Ctrl-C to its workers,
    which save and exit 130; then torchrun raises SignalException (a traceback) and exits 1."""
    run = tmp_path / "runs" / "t"
    proc = _start(
        tmp_path,
        ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moekit", *TRAIN, "--name", "t"],
    )
    _wait_for_steps(proc, run)
    out, err = _stop(proc, signal.SIGINT, group=True)
    assert "interrupted (SIGINT) at step" in out and "checkpoint saved" in out, (out, err[-3000:])
    assert _saved_step(run) >= 3
    assert proc.returncode == 1 and "SignalException" in err, (proc.returncode, err[-3000:])
