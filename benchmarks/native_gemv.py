"""moekit's native GEMV (``moekit.kernels.native.linear``, one row, batch-1 decoding's shape) per
format and per build of the kernels, against PyTorch's ``F.linear`` on the same weights (int8:
dequantized to float32, what dequantize + matmul reads): GB/s of weight bytes read. The weights are
distinct 8192x1024 matrices read in turn, as many as make ``--stream-mib`` (default 512 MiB, far
past any last-level cache: a 32 MiB set of int8 weights half fits a Zen 4's L3 and measured the
cache), so every call streams from memory as decoding's do. Builds are compared interleaved in one
process, round by round, in a different order each round, since a machine's bandwidth drifts
between runs and the first of two back-to-back builds can measure differently from the second.

    PYTHONPATH=src python benchmarks/native_gemv.py --threads 1,2 --builds default,-DMK_PREFETCH=0

``--builds``: comma-separated; ``default`` is the library the process uses, anything else is extra
compiler flags for another build (e.g. ``-DMK_PREFETCH=0`` turns the software prefetch off,
``-DMK_PREFETCH=1024`` reads 1 KiB ahead, ``-DMK_NO_AVX512`` builds the AVX2 kernels).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moekit.kernels import native
from moekit.kernels.lowbit import LowBitWeight

OUT, IN = 8192, 1024


def gb_per_s(call, nbytes: int, reps: int) -> float:
    call()
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--builds", default="default,-DMK_PREFETCH=0")
    ap.add_argument("--formats", default=",".join(native.FORMATS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stream-mib", type=int, default=512, help="weight bytes each call of a row streams through")
    args = ap.parse_args()
    builds = {
        b: native.library() if b == "default" else native.load(native.FLAGS + tuple(b.split()))
        for b in args.builds.split(",")
    }
    print(f"builds: {', '.join(f'{b} ({native.instruction_set(lib)})' for b, lib in builds.items())}")
    torch.manual_seed(0)
    x = torch.randn(1, IN)
    results: dict[tuple, list[float]] = {}
    for fmt in args.formats.split(","):
        one = LowBitWeight.quantize(torch.randn(OUT, IN), fmt)
        n_weights = max(2, args.stream_mib * 2**20 // (one.data.numel() * one.data.element_size()))
        qs = [one] + [LowBitWeight.quantize(torch.randn(OUT, IN), fmt) for _ in range(n_weights - 1)]
        nbytes = sum(q.data.numel() * q.data.element_size() for q in qs)
        dense = [q.dequantize(torch.float32 if fmt in ("fp32", "int8") else q.data.dtype) for q in qs]
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for r in range(args.rounds):
                names = list(builds)
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    lib = builds[name]
                    call = lambda lib=lib: [native.linear(x, q.data, q.scales, threads=threads, lib=lib) for q in qs]  # noqa: E731
                    results.setdefault((fmt, threads, f"native {name}"), []).append(gb_per_s(call, nbytes, 20))
                xt = x.to(dense[0].dtype)
                dense_bytes = sum(w.numel() * w.element_size() for w in dense)
                call = lambda: [F.linear(xt, w) for w in dense]  # noqa: E731
                results.setdefault((fmt, threads, "torch F.linear"), []).append(gb_per_s(call, dense_bytes, 20))
    print("| format | threads | kernel | GB/s (best of rounds) | each round |")
    print("|---|---|---|---|---|")
    for (fmt, threads, kernel), v in results.items():
        print(f"| {fmt} | {threads} | {kernel} | {max(v):.1f} | {' / '.join(f'{g:.1f}' for g in v)} |")


if __name__ == "__main__":
    main()
