"""moekit's own CPU GEMV kernels for decoding (``native.c``): a few rows of float32 activations
against one ``(out, in)`` weight in fp32, fp16, bf16 or int8, built from source on first use with
the machine's C compiler and loaded with :mod:`ctypes`.

Why a kernel of moekit's own (benchmarks/RESULTS.md, "Native decode kernels"): at batch 1
PyTorch's int8 CPU kernel (``_weight_int8pack_mm``) reads ~8 GB/s and its 16-bit GEMVs 10-18
GB/s on this project's CPU, where one core reads ~22 GB/s; fbgemm's dynamic int8 linear and
``torch._int_mm`` were measured and are no answer (deprecated, or no faster). These kernels stream
each weight row once (int8 through AVX-512 VNNI, as llama.cpp's Q8_0 does) and split rows between
PyTorch's own OpenMP threads.

Built with ``-O3 -march=native -fopenmp`` into ``$MOEKIT_CACHE_DIR`` (default
``~/.cache/moekit``), keyed by the source, the compiler and the CPU; ``$CC`` names the compiler.
When no compiler works, or ``MOEKIT_NATIVE=0``, :func:`available` is False and callers keep
PyTorch's kernels (the same results to rounding).

Shape legend: R rows, I input features, O output features.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .activations import get_activation

SOURCE = Path(__file__).with_name("native.c")
FORMATS = ("fp32", "fp16", "bf16", "int8")  # a format's index is its code in native.c (MK_F32 ... MK_I8)
_FLOAT_FORMATS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MAX_ROWS = 8  # more rows than this go to PyTorch's kernels (a GEMM, not a GEMV)
MAX_INT8_IN = 32768  # the int8 kernel sums in int32
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_checked = False
_tried: dict[tuple[str, ...], Optional[ctypes.CDLL]] = {}


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return os.uname().machine + flags


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def cache_dir() -> Path:
    """Where built kernels are kept: ``$MOEKIT_CACHE_DIR``, else ``~/.cache/moekit`` (a temporary
    folder when that cannot be written)."""
    if "MOEKIT_CACHE_DIR" in os.environ:
        return Path(os.environ["MOEKIT_CACHE_DIR"])
    home = Path.home() / ".cache" / "moekit"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"moekit-{os.getuid()}"


def build(flags: tuple[str, ...] = FLAGS) -> Path:
    """The shared library built from :data:`SOURCE` with ``flags`` (once per source, compiler, flags
    and CPU; written to a temporary name then renamed, so concurrent builders never load half a file).
    RuntimeError with the compiler's message when it fails."""
    version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, check=False).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(), _cpu_key().encode()]))
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"native-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([_compiler(), *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building {SOURCE.name} with {_compiler()} failed:\n{done.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(flags: tuple[str, ...] = FLAGS) -> Optional[ctypes.CDLL]:
    """The kernels built with ``flags``, or None (with one warning) when they cannot be built."""
    with _lock:
        if flags not in _tried:
            try:
                lib = ctypes.CDLL(str(build(flags)))
            except (OSError, RuntimeError) as e:
                warnings.warn(f"moekit's native CPU kernels are off ({e}); PyTorch's kernels are used", stacklevel=2)
                lib = None
            if lib is not None:
                _declare(lib)
            _tried[flags] = lib
        return _tried[flags]


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mk_linear.argtypes = [i32, p, i64, i64, p, p, i64, p, i32]
    lib.mk_linear_many.argtypes = [i64, p, p, p, p, p, i64, i64, p, i32]
    lib.mk_experts.argtypes = [p, p, p, p, i64, i64, p, i64, i64, i32, i32, p, i32]
    lib.mk_linear.restype = lib.mk_linear_many.restype = lib.mk_experts.restype = None
    lib.mk_vectorized.restype = lib.mk_max_threads.restype = i32


def library() -> Optional[ctypes.CDLL]:
    """The kernels for this process (None when off: ``MOEKIT_NATIVE=0``, no working compiler, or a
    CPU with neither AVX-512 VNNI nor AVX2, where only the portable C builds, which is slower than
    PyTorch's kernels; read once)."""
    global _lib, _checked
    if not _checked:
        lib = None if os.environ.get("MOEKIT_NATIVE", "1") == "0" else load()
        _lib = lib if lib is not None and lib.mk_vectorized() > 0 else None
        _checked = True
    return _lib


def instruction_set(lib: Optional[ctypes.CDLL] = None) -> str:
    """What the kernels ``lib`` (default: this process's build) compute with: ``"avx512-vnni"``,
    ``"avx2"`` or ``"portable"``; ``"off"`` when this process has none."""
    lib = lib or library()
    return "off" if lib is None else ("portable", "avx2", "avx512-vnni")[lib.mk_vectorized()]


def _required(lib: Optional[ctypes.CDLL] = None) -> ctypes.CDLL:
    """``lib``, else this process's kernels; RuntimeError when they are off."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError("moekit's native kernels are not available (MOEKIT_NATIVE=0 or no C compiler)")
    return lib


def available() -> bool:
    """Whether the native kernels run in this process."""
    return library() is not None


def handles(fmt: str, x_RI: Tensor, w_OI: Tensor) -> bool:
    """Whether :func:`linear` (compiled: :func:`linear_op`) computes this product: on the CPU, at
    most :data:`MAX_ROWS` rows, ``fmt`` in :data:`FORMATS`, and the kernels built."""
    return (
        fmt in FORMATS
        and x_RI.device.type == "cpu"
        and w_OI.device.type == "cpu"
        and x_RI.dim() == 2
        and 0 < x_RI.shape[0] <= MAX_ROWS
        and not (fmt == "int8" and w_OI.shape[1] > MAX_INT8_IN)
        and available()
    )


def linear(
    x_RI: Tensor,
    w_OI: Tensor,
    scales_O: Optional[Tensor] = None,
    out_RO: Optional[Tensor] = None,
    alpha: float = 1.0,
    threads: Optional[int] = None,
    lib: Optional[ctypes.CDLL] = None,
) -> Tensor:
    """``alpha * x_RI @ w_OI.T`` in float32 (added to ``out_RO`` in place when given). ``w_OI``:
    float32, float16 or bfloat16, or int8 with ``scales_O`` (bfloat16, one per output row: the
    weight is ``w_OI * scales_O[:, None]``). ``threads``: default torch's intra-op threads."""
    lib = _required(lib)
    if x_RI.dim() != 2 or w_OI.dim() != 2 or x_RI.shape[1] != w_OI.shape[1]:
        shapes = f"{tuple(x_RI.shape)} and {tuple(w_OI.shape)}"
        raise ValueError(f"x_RI (R, I) and w_OI (O, I) must agree in I; got {shapes}")
    rows, (n_out, n_in) = x_RI.shape[0], w_OI.shape
    if out_RO is not None and (
        out_RO.shape != (rows, n_out) or out_RO.dtype != torch.float32 or not out_RO.is_contiguous()
    ):
        got = f"{out_RO.dtype} {tuple(out_RO.shape)}"
        raise ValueError(f"out_RO must be a contiguous float32 ({rows}, {n_out}); got {got}")
    fmt = "int8" if w_OI.dtype == torch.int8 else float_format(w_OI.dtype)
    if fmt is None:
        raise ValueError(f"w_OI must be float32, float16, bfloat16 or int8; got {w_OI.dtype}")
    scale = 0
    if fmt == "int8":
        if scales_O is None or scales_O.dtype != torch.bfloat16 or scales_O.shape != (n_out,):
            raise ValueError("an int8 weight needs scales_O: bfloat16, one per output row")
        if n_in > MAX_INT8_IN:
            raise ValueError(f"the int8 kernel takes at most {MAX_INT8_IN} input features; got {n_in}")
        scales_O = scales_O.contiguous()
        scale = scales_O.data_ptr()
    x_RI, w_OI = x_RI.detach().float().contiguous(), w_OI.detach().contiguous()
    y_RO = torch.empty(rows, n_out)
    n = torch.get_num_threads() if threads is None else threads
    lib.mk_linear(format_code(fmt), x_RI.data_ptr(), rows, n_in, w_OI.data_ptr(), scale, n_out, y_RO.data_ptr(), n)
    if out_RO is None:
        return y_RO.mul_(alpha) if alpha != 1.0 else y_RO
    return out_RO.add_(y_RO, alpha=alpha)


def float_format(dtype: torch.dtype) -> Optional[str]:
    """The format name of a float weight dtype (``torch.float16`` -> ``"fp16"``), None for others."""
    return _FLOAT_FORMATS.get(dtype)


def format_code(fmt: str) -> int:
    """The kernels' code of a weight format (-1: not theirs, e.g. int4)."""
    return FORMATS.index(fmt) if fmt in FORMATS else -1


class ExpertTable:
    """Each expert's (up data, up scales, down data, down scales) addresses and format code, for
    :func:`experts`: made from the tensors themselves, which it keeps (so the addresses stay valid)."""

    def __init__(self, parts: Sequence[tuple[str, Tensor, Optional[Tensor], Tensor, Optional[Tensor]]]):
        self.tensors = [p[1:] for p in parts]
        rows = []
        codes = []
        for fmt, up, up_s, down, down_s in parts:
            ok = all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in (up, up_s, down, down_s))
            ok = ok and not (fmt == "int8" and max(up.shape[1], down.shape[1]) > MAX_INT8_IN)
            codes.append(format_code(fmt) if ok else -1)
            rows.append([0 if t is None else t.data_ptr() for t in (up, up_s, down, down_s)])
        self.table_E4 = torch.tensor(rows, dtype=torch.int64)
        self.codes_E = torch.tensor(codes, dtype=torch.int32)
        self.native = codes  # per expert: whether the kernels compute it (>= 0)
        self.all_native = all(c >= 0 for c in codes)  # one value (a compiled step guards on it)


def experts(
    table: ExpertTable,
    ids_K: Tensor,
    alphas_K: Tensor,
    x_D: Tensor,
    hidden_dim: int,
    kind: str,
    out_D: Tensor,
    threads: Optional[int] = None,
) -> Tensor:
    """``out_D += sum_k alphas_K[k] * expert_{ids_K[k]}(x_D)`` in one call (float32, one token):
    each expert's up projection, activation ``kind`` and down projection, the rows of all of them
    split over torch's threads; ids outside ``[0, E)`` are empty slots. Every expert named must be
    native (``table.native[e] >= 0``)."""
    args = (table.table_E4, table.codes_E, ids_K, alphas_K, x_D, out_D, hidden_dim, kind, threads or 0)
    if torch.compiler.is_compiling():
        torch.ops.moekit.native_experts(*args)
    else:
        _experts_kernel(*args)
    return out_D


def _experts_kernel(
    table_E4: Tensor,
    codes_E: Tensor,
    ids_K: Tensor,
    alphas_K: Tensor,
    x_D: Tensor,
    out_D: Tensor,
    hidden_dim: int,
    kind: str,
    threads: int,
) -> None:
    lib = _required()
    if out_D.dtype != torch.float32 or not out_D.is_contiguous() or x_D.shape != out_D.shape or x_D.dim() != 1:
        raise ValueError("out_D must be a contiguous float32 vector of x_D's shape")
    x = x_D.detach().float().contiguous()
    ids = ids_K.to(torch.int64).contiguous()
    a = alphas_K.to(torch.float32).contiguous()
    if ids.numel() > 256 or ids.shape != a.shape:
        raise ValueError(f"ids_K and alphas_K: one per slot, at most 256; got {tuple(ids.shape)}, {tuple(a.shape)}")
    n = threads or torch.get_num_threads()
    E = table_E4.shape[0]
    lib.mk_experts(
        table_E4.data_ptr(),
        codes_E.data_ptr(),
        ids.data_ptr(),
        a.data_ptr(),
        ids.numel(),
        E,
        x.data_ptr(),
        x.shape[0],
        hidden_dim,
        get_activation(kind).kernel_code,
        int(get_activation(kind).gated),
        out_D.data_ptr(),
        n,
    )


def linear_many(
    x_RI: Tensor, weights: Sequence[tuple[str, Tensor, Optional[Tensor]]], threads: Optional[int] = None
) -> list[Tensor]:
    """``[x_RI @ w.T for each (fmt, w, scales)]`` in one call (e.g. an attention's q, k and v: one
    thread fork, x quantized once): float32, each weight in a format of :data:`FORMATS`."""
    lib = _required()
    rows, n_in = x_RI.shape
    if any(w.dim() != 2 or w.shape[1] != n_in or format_code(f) < 0 for f, w, _ in weights):
        raise ValueError(f"every weight must be (O, {n_in}) in one of {FORMATS}")
    if n_in > MAX_INT8_IN and any(f == "int8" for f, _, _ in weights):
        raise ValueError(f"the int8 kernel takes at most {MAX_INT8_IN} input features; got {n_in}")
    x = x_RI.detach().float().contiguous()
    ws = [w.detach().contiguous() for _, w, _ in weights]
    ss = [s.contiguous() if f == "int8" and s is not None else None for (f, _, s) in weights]
    if any(f == "int8" and s is None for (f, _, _), s in zip(weights, ss)):
        raise ValueError("an int8 weight needs its scales")
    ys = [torch.empty(rows, w.shape[0]) for w in ws]
    codes = (ctypes.c_int32 * len(ws))(*(format_code(f) for f, _, _ in weights))
    w_a, s_a, y_a = _addresses(ws), _addresses(ss), _addresses(ys)
    outs = (ctypes.c_int64 * len(ws))(*(w.shape[0] for w in ws))
    n = threads or torch.get_num_threads()
    tables = (ctypes.addressof(codes), ctypes.addressof(w_a), ctypes.addressof(s_a), ctypes.addressof(outs))
    lib.mk_linear_many(len(ws), *tables, x.data_ptr(), rows, n_in, ctypes.addressof(y_a), n)
    return ys


def _addresses(ts: Sequence[Optional[Tensor]]) -> ctypes.Array:
    """The tensors' data addresses (0 for None) as a C array of int64 (cheaper than a tensor per call)."""
    return (ctypes.c_int64 * len(ts))(*(0 if t is None else t.data_ptr() for t in ts))


# The compiled decode step calls the kernels as PyTorch operators. They are defined on a plain
# torch.library.Library with a CPU kernel and a fake (meta) one, not with torch.library.custom_op:
# its Python autograd and in-place-or-view layers cost ~50 against ~5 us per call here, at ~25 calls
# per decoded token (forward only: no gradient goes through these operators).
_OPS = torch.library.Library("moekit", "FRAGMENT")
_OPS.define("native_linear(Tensor x_RI, Tensor w_OI, Tensor? scales_O, int threads) -> Tensor")
_OPS.define("native_linear_many(Tensor x_RI, Tensor[] ws, Tensor?[] scales, int[] codes) -> Tensor[]")
_OPS.define(
    "native_experts(Tensor table_E4, Tensor codes_E, Tensor ids_K, Tensor alphas_K, Tensor x_D, Tensor(a!) out_D, "
    "int hidden_dim, str kind, int threads) -> ()"
)


def _linear_kernel(x_RI: Tensor, w_OI: Tensor, scales_O: Optional[Tensor], threads: int) -> Tensor:
    return linear(x_RI, w_OI, scales_O, threads=threads or None)


def _linear_many_kernel(
    x_RI: Tensor, ws: list[Tensor], scales: list[Optional[Tensor]], codes: list[int]
) -> list[Tensor]:
    return linear_many(x_RI, list(zip((FORMATS[c] for c in codes), ws, scales)))


_OPS.impl("native_linear", _linear_kernel, "CPU")
_OPS.impl("native_linear_many", _linear_many_kernel, "CPU")
_OPS.impl("native_experts", _experts_kernel, "CPU")


@torch.library.register_fake("moekit::native_linear", lib=_OPS)
def _(x_RI, w_OI, scales_O, threads):
    return x_RI.new_empty(x_RI.shape[0], w_OI.shape[0], dtype=torch.float32)


@torch.library.register_fake("moekit::native_linear_many", lib=_OPS)
def _(x_RI, ws, scales, codes):
    return [x_RI.new_empty(x_RI.shape[0], w.shape[0], dtype=torch.float32) for w in ws]


@torch.library.register_fake("moekit::native_experts", lib=_OPS)
def _(table_E4, codes_E, ids_K, alphas_K, x_D, out_D, hidden_dim, kind, threads) -> None:
    return None


def linear_op(x_RI: Tensor, w_OI: Tensor, scales_O: Optional[Tensor], threads: int) -> Tensor:
    """:func:`linear` as the operator ``moekit::native_linear`` (so ``torch.compile`` calls it inside a
    graph); ``threads`` 0: torch's intra-op threads."""
    return torch.ops.moekit.native_linear(x_RI, w_OI, scales_O, threads)


def linear_many_op(x_RI: Tensor, ws: list[Tensor], scales: list[Optional[Tensor]], codes: list[int]) -> list[Tensor]:
    """:func:`linear_many` as the operator ``moekit::native_linear_many`` (compiled decode steps);
    ``codes``: each weight's :func:`format_code`."""
    return torch.ops.moekit.native_linear_many(x_RI, ws, scales, codes)


__all__ = [
    "ExpertTable",
    "experts",
    "float_format",
    "format_code",
    "FORMATS",
    "MAX_ROWS",
    "available",
    "build",
    "cache_dir",
    "handles",
    "library",
    "linear",
    "linear_many",
    "load",
]
