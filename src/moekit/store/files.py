"""Safetensors files read by byte range: one tensor, or one row block of a stacked tensor, copied
straight into memory the caller owns, with the page cache told to drop what was read.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
``data_offsets`` relative to the data section) and the row-major data. Row ``i`` of a tensor of
shape ``(N, ...)`` is therefore one contiguous byte range, which is what lets an expert of a
stacked ``(E, D, H)`` weight be read alone. Reads use ``os.preadv`` into the destination's own
memory (no intermediate copy when dtypes match), then ``posix_fadvise(DONTNEED)``, so the page
cache does not quietly keep a second copy of every expert read (it would count against a
memory cap and hide the cost of the slow tier).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DROP = getattr(os, "POSIX_FADV_DONTNEED", None)


class StoreFileError(ValueError):
    """A weights file is missing, is not safetensors, or lacks a tensor the store needs."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: file, absolute offset of its first byte, dtype, shape."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along the first dimension."""
        n = 1
        for s in self.shape[1:]:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Union[str, Path]) -> tuple[dict, dict]:
    """(tensors: name -> TensorEntry, metadata) of one safetensors file, reading its header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > 100 * 2**20:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise StoreFileError(f"weights file {path} does not exist") from None
    except (OSError, ValueError, struct.error) as err:
        raise StoreFileError(f"{path} is not a readable safetensors file ({err})") from err
    meta = header.pop("__metadata__", None) or {}
    start, entries = 8 + n, {}
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            continue  # a dtype the store never reads (FP8, ...): listed nowhere, refused if asked for
        entries[name] = TensorEntry(path, start + h["data_offsets"][0], DTYPES[h["dtype"]], tuple(h["shape"]))
    return entries, meta


class SafetensorsFiles:
    """Every tensor of one file or of a folder of shards, addressable by name, read by range.

    One open descriptor per file for the object's life; reads are positional (thread-safe)."""

    def __init__(self, paths: Iterable[Union[str, Path]]):
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[Path, dict] = {}
        for p in paths:
            entries, meta = read_header(p)
            self.entries.update(entries)
            self.metadata[Path(p)] = meta
        if not self.metadata:
            raise StoreFileError("no safetensors file given")
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    @classmethod
    def of(cls, path: Union[str, Path]) -> SafetensorsFiles:
        """A file, or a folder's ``*.safetensors`` shards (those its index names, when it has one)."""
        path = Path(path)
        if path.is_file():
            return cls([path])
        if not path.exists():
            raise StoreFileError(f"weights file {path} does not exist")
        if not path.is_dir():
            raise StoreFileError(f"{path} is neither a safetensors file nor a folder")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise StoreFileError(f"{path}: shard(s) named by its index are missing: {', '.join(missing[:4])}")
            return cls(path / n for n in names)
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise StoreFileError(f"{path} holds no *.safetensors file")
        return cls(shards)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise StoreFileError(f"tensor {name!r} is not in {self._where()}") from None

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """StoreFileError unless tensor ``name`` has exactly ``shape`` (a file for another model)."""
        got = self.entry(name).shape
        if got != tuple(shape):
            raise StoreFileError(
                f"tensor {name!r} in {self._where()} has shape {got}; the model expects {tuple(shape)} "
                "(a file written for another model configuration?)"
            )

    def _where(self) -> str:
        files = sorted(str(p) for p in self.metadata)
        return files[0] if len(files) == 1 else f"{len(files)} files in {Path(files[0]).parent}"

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:  # readers on several threads: the first descriptor stored wins
            new = os.open(path, os.O_RDONLY)
            fd = self._fds.setdefault(path, new)
            if fd != new:
                os.close(new)
        return fd

    def read_rows(self, name: str, dst: Tensor, start: int = 0, *, drop_cache: bool = True) -> Tensor:
        """Rows ``[start, start + len(dst))`` of tensor ``name`` (all of it when its shapes match)
        into ``dst`` (contiguous, CPU, of the file's dtype or another one: then read and cast)."""
        e = self.entry(name)
        whole = dst.dim() == len(e.shape) and len(e.shape) > 0  # a block of rows, else one row
        rows, row_shape = (dst.shape[0], tuple(dst.shape[1:])) if whole else (1, tuple(dst.shape))
        if row_shape != e.shape[1:]:
            raise StoreFileError(f"tensor {name!r} has rows of shape {e.shape[1:]}; asked for {tuple(dst.shape)}")
        if start < 0 or start + rows > (e.shape[0] if e.shape else 1):  # a scalar is one row
            raise StoreFileError(f"tensor {name!r} of shape {e.shape}: rows {start}..{start + rows} do not exist")
        if dst.dtype != e.dtype or not dst.is_contiguous() or dst.device.type != "cpu":
            raw = torch.empty(dst.shape, dtype=e.dtype)
            self._pread(e, raw, start, rows, drop_cache)
            return dst.copy_(raw)
        self._pread(e, dst, start, rows, drop_cache)
        return dst

    def _pread(self, e: TensorEntry, dst: Tensor, start: int, rows: int, drop_cache: bool) -> None:
        view = memoryview(dst.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # ndarray is a buffer
        want, offset, done = view.nbytes, e.offset + start * e.row_bytes, 0
        fd = self._fd(e.path)
        while done < want:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise StoreFileError(f"{e.path} ends before tensor data at byte {offset + done} (truncated file?)")
            done += n
        if drop_cache and _DROP is not None:
            os.posix_fadvise(fd, offset, want, _DROP)
        self.bytes_read += want

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The whole tensor ``name`` as a new CPU tensor (in ``dtype``, default the file's)."""
        e = self.entry(name)
        if not e.shape:
            raise StoreFileError(f"tensor {name!r} is a scalar; the store reads arrays")
        return self.read_rows(name, torch.empty(e.shape, dtype=dtype or e.dtype))

    def drop_cache(self) -> None:
        """Tell the kernel to drop every cached page of these files (a cold start for a benchmark)."""
        if _DROP is None:
            return
        for path in self.metadata:
            os.posix_fadvise(self._fd(path), 0, 0, _DROP)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing to report to
            pass
