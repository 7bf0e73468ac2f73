"""One (out, in) weight's GEMV per format on PyTorch's CPU kernels, through 48 distinct 2048x2048
weights (so they stream from memory, as decoding's do): microseconds per call and GB/s of weight
bytes read, next to the machine's read bandwidth (a ``sum`` over 1 GiB).

    PYTHONPATH=src python benchmarks/lowbit_kernels.py --threads 1,2

Rows: ``moekit.kernels.lowbit.LowBitWeight.linear`` per format (fp32 and the 16-bit formats are
``F.linear`` on the (out, in) layout), plus the (in, out) layout ``x @ w`` moekit's float experts
use, and two int8 alternatives that are not used: fbgemm's dynamic-quantized linear (int8
activations, VNNI; its API builds on quantized tensors, deprecated in torch 2.13) and
dequantize-then-``F.linear``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from moekit.kernels.lowbit import LowBitWeight

N = K = 2048
WEIGHTS = 48


def best_us(calls, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - t0) / len(calls))
    return best * 1e6


def read_bandwidth() -> float:
    """Bytes/s of reading memory with torch's current threads: ``sum`` over 1 GiB of float32, best of 5."""
    x = torch.randn(256 * 2**20)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best


def rows(threads: int) -> list[tuple[str, float, int]]:
    torch.set_num_threads(threads)
    ws = [torch.randn(N, K) * 0.02 for _ in range(WEIGHTS)]
    x = torch.randn(1, K)
    out = []
    for fmt in ("fp32", "fp16", "bf16", "int8", "int4"):
        qs = [LowBitWeight.quantize(w, fmt) for w in ws]
        out.append((f"{fmt} (LowBitWeight.linear)", best_us([lambda q=q: q.linear(x) for q in qs]), qs[0].nbytes))
        del qs
    wt = [w.t().contiguous() for w in ws]
    out.append(("fp32 x @ w, (in, out) layout", best_us([lambda w=w: x @ w for w in wt]), N * K * 4))
    del wt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = []
        for w in ws:
            scale = w.abs().amax(1) / 127
            qw = torch.quantize_per_channel(w, scale, torch.zeros(N, dtype=torch.long), 0, torch.qint8)
            packed.append(torch.ops.quantized.linear_prepack(qw, None))
    dyn = best_us([lambda p=p: torch.ops.quantized.linear_dynamic(x, p, True) for p in packed])
    out.append(("int8 fbgemm dynamic (not used)", dyn, N * K))
    q8 = [LowBitWeight.quantize(w, "int8") for w in ws[:8]]
    out.append(
        ("int8 dequantize + F.linear (not used)", best_us([lambda q=q: F.linear(x, q.dequantize()) for q in q8]), N * K)
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        bw = read_bandwidth()
        print(f"threads {threads}: read bandwidth {bw / 1e9:.1f} GB/s ({N}x{K} weights, batch 1)")
        print("| kernel | us / call | GB/s of weight bytes |")
        print("|---|---|---|")
        for name, us, nbytes in rows(threads):
            print(f"| {name} | {us:.0f} | {nbytes / us / 1e3:.1f} |")


if __name__ == "__main__":
    main()
