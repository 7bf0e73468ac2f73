"""Weight-only low-precision linear maps for decoding on the CPU: one ``(out, in)`` weight kept in
one of :data:`FORMATS`, never dequantized to a full matrix. A few rows (decoding) in fp32, fp16,
bf16 or int8 go to moekit's own kernels (:mod:`moekit.kernels.native`: 2-2.5x PyTorch's int8
kernel, benchmarks/RESULTS.md "Native decode kernels"); int4, and more rows, to PyTorch's, below.

Decoding reads every active weight once per token, so its speed is bytes read per token; these
formats read fewer. Measured on this project's CPU (AVX-512 with VNNI, no native bf16 or fp16
math; 48 distinct 2048x2048 weights, 1 thread; benchmarks/RESULTS.md, "Low-bit decode kernels"):

- ``fp32``: ``F.linear``, the reference (~20 GB/s: the memory bound).
- ``fp16``: ``F.linear`` on a float16 weight with the rows cast to float16: oneDNN converts in the
  kernel and accumulates in float32; half the bytes, 2.1x fp32 at 1 thread.
- ``bf16``: the same with bfloat16 (slower than fp16 here: no native bf16 path is taken).
- ``int8``: symmetric per output channel, ``aten._weight_int8pack_mm`` with bfloat16 rows (the
  float32-row path of the same kernel is 8x slower); 2.0x fp32 at 1 thread, 3.5x at 2.
- ``int4``: asymmetric per group of ``group_size`` input columns (gpt-fast's and torchao's
  scheme: ``w = (q - 8) * scale + zero``), ``aten._weight_int4pack_mm_for_cpu``, bf16 rows;
  3.7x fp32 at 1 thread, 7.5x at 2. Scales and zeros are bfloat16, as the kernel takes them.

Shape legend: R rows, I input features, O output features, G groups of input columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .threads import block_threads, split_rows

FORMATS = ("fp32", "fp16", "bf16", "int8", "int4")
BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128, 256)
ROW_BLOCK = 64  # int4's packed layout keeps output rows in blocks of 64: a split keeps whole blocks
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_format(fmt: str, group_size: int = 64, name: str = "format") -> tuple[str, int]:
    """``"int4:32"`` -> ``("int4", 32)``; a plain format keeps ``group_size`` (ValueError naming
    ``name`` for anything else)."""
    base, _, group = fmt.partition(":")
    ok = base in FORMATS and (not group or (base == "int4" and group.isdigit() and int(group) in GROUP_SIZES))
    if not ok:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, FORMATS))} (int4 may name its group size: "
            f"int4:32 ... int4:256); got {fmt!r}"
        )
    return base, int(group) if group else group_size


def check_format(fmt: str, name: str = "format") -> None:
    parse_format(fmt, name=name)


def check_fits(fmt: str, out_features: int, in_features: int, group_size: int = 64) -> None:
    """ValueError unless a weight of this shape can be held in ``fmt``: int4 needs a group size of
    :data:`GROUP_SIZES` dividing the input width and an output width divisible by 16 (the kernel's tiles)."""
    base, group = parse_format(fmt, group_size)
    if base != "int4":
        return
    if group not in GROUP_SIZES or in_features % group:
        raise ValueError(
            f"group_size must be one of {GROUP_SIZES} and divide the input width {in_features}; got {group}"
        )
    if out_features % 16:
        raise ValueError(f"int4 needs an output width divisible by 16 (the CPU kernel's tiles); got {out_features}")


def fits(fmt: str, out_features: int, in_features: int, group_size: int = 64) -> bool:
    """Whether a weight of this shape can be held in ``fmt`` (:func:`check_fits`)."""
    try:
        check_fits(fmt, out_features, in_features, group_size)
    except ValueError:
        return False
    return True


@dataclass
class LowBitWeight:
    """One ``(out, in)`` weight in ``fmt``: ``data`` (the float weight; int8 values; or int4
    values two per byte, low nibble first, ``(O, I/2)`` uint8), ``scales`` (int8: ``(O,)``;
    int4: ``(O, G)``), ``zeros`` (int4: ``(O, G)``)."""

    fmt: str
    data: Tensor
    scales: Optional[Tensor] = None
    zeros: Optional[Tensor] = None
    group_size: int = 0
    _packed: Optional[Tensor] = None  # int4: the kernel's own layout, made on first use
    _scales_zeros: Optional[Tensor] = None  # int4: (G, O, 2) bf16, the kernel's
    _parts: dict[tuple[int, int], LowBitWeight] = field(default_factory=dict, init=False, repr=False)  # row blocks

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def in_features(self) -> int:
        return self.data.shape[1] * (2 if self.fmt == "int4" else 1)

    @property
    def name(self) -> str:
        """The format with its group size where it has one (``int4:64``)."""
        return f"{self.fmt}:{self.group_size}" if self.fmt == "int4" else self.fmt

    @property
    def nbytes(self) -> int:
        """Bytes of the weight as stored (what decoding reads per use)."""
        return sum(t.nbytes for t in (self.data, self.scales, self.zeros) if t is not None)

    @classmethod
    def empty(cls, fmt: str, out_features: int, in_features: int, group_size: int = 64, device="cpu") -> LowBitWeight:
        """Uninitialised tensors of the right shapes (to be read from a checkpoint)."""
        fmt, group_size = parse_format(fmt, group_size)
        if fmt in _FLOAT:
            return cls(fmt, torch.empty(out_features, in_features, dtype=_FLOAT[fmt], device=device))
        if fmt == "int8":
            data = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
            return cls(fmt, data, torch.empty(out_features, dtype=torch.bfloat16, device=device))
        check_fits(fmt, out_features, in_features, group_size)
        groups = (out_features, in_features // group_size)
        data = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        scales, zeros = (torch.empty(groups, dtype=torch.bfloat16, device=device) for _ in range(2))
        return cls(fmt, data, scales, zeros, group_size)

    @classmethod
    def quantize(cls, w_OI: Tensor, fmt: str, group_size: int = 64) -> LowBitWeight:
        """``w_OI`` (any float dtype) in ``fmt``; int4 needs ``group_size`` in :data:`GROUP_SIZES`
        dividing the input width and an output width divisible by 16 (the kernel's tiles)."""
        fmt, group_size = parse_format(fmt, group_size)
        if w_OI.dim() != 2:
            raise ValueError(f"expected a 2-D (out, in) weight; got shape {tuple(w_OI.shape)}")
        w_OI = w_OI.detach()
        if fmt in _FLOAT:
            return cls(fmt, w_OI.to(_FLOAT[fmt]).contiguous())
        if fmt == "int8":
            scale_O = (w_OI.float().abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # as stored
            q_OI = (w_OI.float() / scale_O.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
            return cls(fmt, q_OI.contiguous(), scale_O)
        n_out, n_in = w_OI.shape
        check_fits(fmt, n_out, n_in, group_size)
        w_OGS = w_OI.float().reshape(n_out, n_in // group_size, group_size)
        lo, hi = w_OGS.amin(-1), w_OGS.amax(-1)
        scale_OG = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
        zero_OG = (lo + 8 * scale_OG.float()).to(torch.bfloat16)  # w = (q - 8) * scale + zero
        q = ((w_OGS - zero_OG.float()[..., None]) / scale_OG.float()[..., None] + 8).round().clamp(0, 15)
        q_OI = q.to(torch.uint8).reshape(n_out, n_in)
        packed = (q_OI[:, 0::2] | (q_OI[:, 1::2] << 4)).contiguous()
        return cls(fmt, packed, scale_OG.contiguous(), zero_OG.contiguous(), group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``(out, in)`` weight this one stands for (the reference the kernels are tested against)."""
        if self.fmt in _FLOAT:
            return self.data.to(dtype)
        if self.fmt == "int8":
            assert self.scales is not None
            return (self.data.float() * self.scales.float()[:, None]).to(dtype)
        assert self.scales is not None and self.zeros is not None
        q_OI = self._unpacked().float()
        q_OGS = q_OI.reshape(q_OI.shape[0], -1, self.group_size)
        w = (q_OGS - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.reshape(q_OI.shape).to(dtype)

    def kernel_tensors(self) -> dict[str, Tensor]:
        """int4: the kernel's own layout (``packed`` ``(O, I/2)`` uint8, ``scales_zeros`` ``(G, O, 2)``
        bf16), the same bytes as ``data``, ``scales`` and ``zeros``; other formats: :meth:`tensors`."""
        if self.fmt != "int4":
            return self.tensors()
        if self._packed is None or self._scales_zeros is None:
            assert self.scales is not None and self.zeros is not None
            self._packed = torch._convert_weight_to_int4pack_for_cpu(self._unpacked(), 1)
            self._scales_zeros = torch.stack([self.scales.t(), self.zeros.t()], -1).contiguous()
        return {"packed": self._packed, "scales_zeros": self._scales_zeros}

    @classmethod
    def of_kernel_tensors(cls, fmt: str, group_size: int, tensors: dict[str, Tensor]) -> LowBitWeight:
        """A weight over :meth:`kernel_tensors` (a slot of an expert store): it computes
        (:meth:`linear`); int4's :meth:`dequantize` and :meth:`tensors` need the stored layout."""
        if fmt != "int4":
            return cls(fmt, group_size=group_size, **tensors)
        packed, sz = tensors["packed"], tensors["scales_zeros"]
        return cls(fmt, packed, group_size=group_size, _packed=packed, _scales_zeros=sz)

    def _unpacked(self) -> Tensor:
        lo, hi = self.data & 15, self.data >> 4
        return torch.stack([lo, hi], -1).reshape(self.data.shape[0], -1).to(torch.int32)

    def linear(self, x_RI: Tensor) -> Tensor:
        """``x_RI @ w.T`` in ``x_RI``'s dtype: a few rows on the CPU by moekit's own kernels
        (:mod:`~moekit.kernels.native`: float32 rows, rows split over torch's threads), else by
        PyTorch's (by row blocks on the threads of a :func:`~moekit.kernels.threads.decode_threads` block)."""
        if native.handles(self.fmt, x_RI, self.data):
            scales = self.scales if self.fmt == "int8" else None
            if torch.compiler.is_compiling():
                return native.linear_op(x_RI, self.data, scales, 0).to(x_RI.dtype)
            return native.linear(x_RI, self.data, scales, threads=block_threads()).to(x_RI.dtype)
        if self.fmt == "int4" and self.out_features % ROW_BLOCK:
            return self._linear(x_RI)
        y = split_rows(lambda a, b: self._rows(a, b)._linear(x_RI), self.out_features, self.nbytes, ROW_BLOCK)
        return self._linear(x_RI) if y is None else y

    def _rows(self, start: int, stop: int) -> LowBitWeight:
        """Output rows ``start:stop`` (multiples of :data:`ROW_BLOCK`) as a weight over views of these
        tensors: int4's packed layout holds its rows in blocks of 64 (the CPU kernel's), so a slice of
        whole blocks is the same layout; made once per block and kept."""
        if (start, stop) not in self._parts:
            if self.fmt == "int4":
                k = self.kernel_tensors()
                sz = k["scales_zeros"][:, start:stop].contiguous()
                part = {"packed": k["packed"][start:stop], "scales_zeros": sz}
                self._parts[start, stop] = LowBitWeight.of_kernel_tensors("int4", self.group_size, part)
            else:
                scales = None if self.scales is None else self.scales[start:stop]
                self._parts[start, stop] = LowBitWeight(self.fmt, self.data[start:stop], scales)
        return self._parts[start, stop]

    def _linear(self, x_RI: Tensor) -> Tensor:
        if self.fmt == "fp32":
            return F.linear(x_RI, self.data) if x_RI.dtype == torch.float32 else F.linear(x_RI.float(), self.data)
        if self.fmt in _FLOAT:
            return F.linear(x_RI.to(self.data.dtype), self.data).to(x_RI.dtype)
        x_bf16 = x_RI.to(torch.bfloat16)
        if self.fmt == "int8":
            assert self.scales is not None
            y = torch._weight_int8pack_mm(x_bf16, self.data, self.scales)
        else:
            k = self.kernel_tensors()
            y = torch._weight_int4pack_mm_for_cpu(x_bf16, k["packed"], self.group_size, k["scales_zeros"])
        return y.to(x_RI.dtype)

    def tensors(self) -> dict[str, Tensor]:
        """What a checkpoint stores (the kernel's int4 layout is rebuilt on load)."""
        out = {"data": self.data}
        if self.scales is not None:
            out["scales"] = self.scales
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out


def format_bytes(fmt: str, out_features: int, in_features: int, group_size: int = 64) -> int:
    """Bytes a weight of this shape takes in ``fmt`` (data and scales; for budgets)."""
    fmt, group_size = parse_format(fmt, group_size)
    n = out_features * in_features
    if fmt in _FLOAT:
        return n * (4 if fmt == "fp32" else 2)
    if fmt == "int8":
        return n + 2 * out_features
    return n // 2 + 2 * 2 * out_features * (in_features // group_size)


def format_bits(fmt: str, group_size: int = 64) -> float:
    """Bits per weight of ``fmt``, scales included (int4:64 -> 4.5)."""
    base, group = parse_format(fmt, group_size)
    return BITS[base] + (32 / group if base == "int4" else 0.0)


__all__ = [
    "BITS",
    "FORMATS",
    "GROUP_SIZES",
    "LowBitWeight",
    "check_fits",
    "check_format",
    "format_bits",
    "format_bytes",
    "fits",
    "parse_format",
]
