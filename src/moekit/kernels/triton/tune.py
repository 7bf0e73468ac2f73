"""Measured choice of a launch config per call shape, cached in memory and on disk.

The expert FFN's kernels share one config per call (``BLOCK_M`` fixes the tile table that the
backward reuses), so the tuner times whole calls: the forward, plus the backward when the call
needs gradients, once per candidate of :func:`.config.candidates`, and keeps the fastest. The
key is the call's shape with the row count rounded up to a power of two (so a training run
tunes once, and decode tunes once per bucket of 1, 2, 4, ... rows), the dtype, the device name
and the Triton version. Choices persist as JSON (written atomically) in
``$MOEKIT_TRITON_CACHE`` or ``~/.cache/moekit/triton-tuning.json``, so a process does not tune
again what an earlier one measured.

On by default for compiled kernels on CUDA (``MOEKIT_TRITON_AUTOTUNE=0`` turns it off, then
:func:`.config.heuristic_config` decides); off under the interpreter, where timings mean
nothing, unless switched on with :func:`set_autotune` (tests do, to run the machinery). Never
tunes while a CUDA graph is being captured: a captured call uses a cached choice or the
heuristic.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

_ENABLED: Optional[bool] = None  # None: decided by the environment and the device


def set_autotune(enabled: Optional[bool]) -> None:
    """Force tuning on or off for this process; ``None`` restores the default."""
    global _ENABLED
    _ENABLED = enabled


def autotune_enabled(device: torch.device, interpreted: bool) -> bool:
    """Whether calls on ``device`` tune: :func:`set_autotune`'s choice, else on for compiled
    kernels on CUDA unless ``MOEKIT_TRITON_AUTOTUNE=0``."""
    if _ENABLED is not None:
        return _ENABLED
    if interpreted or device.type != "cuda":
        return False
    return os.environ.get("MOEKIT_TRITON_AUTOTUNE", "1") != "0"


def cache_path() -> Optional[Path]:
    """Where tuned choices persist; ``MOEKIT_TRITON_CACHE=""`` keeps them in memory only."""
    env = os.environ.get("MOEKIT_TRITON_CACHE")
    if env is not None:
        return Path(env) if env else None
    return Path.home() / ".cache" / "moekit" / "triton-tuning.json"


def shape_key(
    device: torch.device,
    dtype: torch.dtype,
    *,
    num_rows: int,
    num_experts: int,
    dim: int,
    hidden: int,
    act_code: int,
    gated: bool,
    flags: str,
    train: bool,
) -> str:
    """The cache key of a call: shapes with rows bucketed to the next power of two."""
    import triton

    bucket = 1 << max(0, num_rows - 1).bit_length()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (
        f"{dev}|triton-{triton.__version__}|{str(dtype).replace('torch.', '')}|E{num_experts}|D{dim}|F{hidden}"
        f"|act{act_code}{'g' if gated else ''}|R{bucket}|{flags}|{'train' if train else 'infer'}"
    )


def _time_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median of ``reps`` timed calls after one warm-up call (which also compiles)."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Tuner:
    """Chosen configs by :func:`shape_key`, with the timings that chose them."""

    def __init__(self, path: Optional[Path] = None, reps: int = 5):
        self.path, self.reps = path, reps
        self.entries: dict[str, dict] = {}
        self.tuned_here = 0  # how many keys this process measured (for tests and reports)
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        self.entries.update(self._read())

    def _read(self) -> dict[str, dict]:
        """The entries in the cache file now ({} when absent or unreadable: re-measured, never fatal)."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {k: v for k, v in data.get("entries", {}).items() if isinstance(v, dict)}
        except (OSError, ValueError, AttributeError):
            return {}

    def lookup(self, key: str) -> Optional[dict]:
        self._load()
        entry = self.entries.get(key)
        return dict(entry["config"]) if entry else None

    def tune(self, key: str, run: Callable[[dict], None], cands: list[dict], device: torch.device) -> dict:
        """Time ``run(cfg)`` for each candidate, keep and persist the fastest, return it."""
        self._load()
        timings, first_error = [], None
        for cfg in cands:
            try:
                timings.append((_time_ms(functools.partial(run, cfg), device, self.reps), cfg))
            except Exception as err:  # noqa: BLE001 - e.g. a tile too large for the device's shared memory
                first_error = first_error or err
        if not timings:
            raise RuntimeError(f"moekit Triton autotune: every candidate config failed for {key}") from first_error
        best_ms, best = min(timings, key=lambda t: t[0])
        self.entries[key] = {"config": best, "ms": best_ms, "tried": [[round(ms, 4), c] for ms, c in timings]}
        self.tuned_here += 1
        self._save()
        return dict(best)

    def _save(self) -> None:
        """Merge this process's entries into the file as it is now (another process may have
        added some since we read it) and replace it atomically."""
        if self.path is None:
            return
        self.entries = {**self._read(), **self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".triton-tuning-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "entries": self.entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home: the choice stays in memory
            pass


_TUNER: Optional[Tuner] = None


def tuner() -> Tuner:
    """The process-wide tuner (created on first use with :func:`cache_path`)."""
    global _TUNER
    if _TUNER is None:
        _TUNER = Tuner(cache_path())
    return _TUNER


def reset_tuner(path: Optional[Path] = None, reps: int = 5) -> Tuner:
    """A fresh process-wide tuner (e.g. with another cache file); returns it."""
    global _TUNER
    _TUNER = Tuner(path, reps)
    return _TUNER


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream (no timing then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
