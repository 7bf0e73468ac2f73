"""``atomic_write_bytes`` is durable: after the rename it fsyncs the folder that holds the file,
observed with strace on a real write in a subprocess (no mocks)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from moekit._io import atomic_write_bytes

STRACE = shutil.which("strace")


def _traced_write(tmp_path, target) -> list[str]:
    """The rename and fsync calls (fds shown with their paths: strace -y) of one atomic write."""
    log = tmp_path / "strace.log"
    code = f"from moekit._io import atomic_write_bytes; atomic_write_bytes({str(target)!r}, b'payload')"
    cmd = [STRACE, "-f", "-y", "-o", str(log), "-e", "trace=rename,renameat,renameat2,fsync,fdatasync"]
    run = subprocess.run([*cmd, sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if run.returncode != 0 and "ptrace" in run.stderr:  # a sandbox that forbids tracing
        pytest.skip(f"strace cannot trace here: {run.stderr.strip()[:200]}")
    assert run.returncode == 0, run.stderr
    return [line for line in log.read_text().splitlines() if re.search(r"\b(rename\w*|f(data)?sync)\(", line)]


@pytest.mark.skipif(STRACE is None or not sys.platform.startswith("linux"), reason="needs strace (Linux)")
def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    target = folder / "config.json"
    calls = _traced_write(tmp_path, target)
    renames = [i for i, c in enumerate(calls) if re.search(r"rename\w*\(", c) and str(target) in c]
    assert len(renames) == 1, calls
    file_syncs = [
        i for i, c in enumerate(calls) if re.search(r"fsync\(\d+<" + re.escape(str(folder)) + r"/config\.json\.", c)
    ]
    dir_syncs = [
        i for i, c in enumerate(calls) if re.search(r"fsync\(\d+<" + re.escape(str(folder)) + r">\)\s*=\s*0", c)
    ]
    assert file_syncs and file_syncs[0] < renames[0], f"the data is synced before the rename: {calls}"
    assert dir_syncs and dir_syncs[0] > renames[0], f"no fsync of {folder} after the rename: {calls}"
    assert target.read_bytes() == b"payload"


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "b.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.bin"]
