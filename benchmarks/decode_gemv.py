"""Batch-1 GEMVs the CPU decode step is made of, in GB/s of weight bytes read: why float32 decoding
splits its reads between Python threads (moekit.kernels.threads) and why compiled decoding lays
the experts out rows-major (GroupedExperts.rows_major_).

    PYTHONPATH=src python benchmarks/decode_gemv.py

Rows (best of 7 passes over distinct weights, so they stream from memory):

- ``F.linear`` of float32 ``(3072, 1024)`` and ``(4096, 1024)`` weights: 1 intra-op thread, 2, and
  2 Python threads each running half the rows on one intra-op thread (``threads.linear`` inside
  ``decode_threads(2)``);
- a layer's 8 chosen experts (1024 -> 1024 -> 512, float32), the eager loop, the same ways;
- fp16 ``F.linear`` (1024, 1024), 1 and 2 intra-op threads, and 2 Python threads;
- compiled (inductor) one-row multiply-and-sum over an ``(out, in)`` float32 weight, 1 and 2 threads;
- compiled gather-multiply-sum of 8 chosen experts' up projections out of 64, over the stacked
  ``(E, D, H)`` layout and over ``(E, H, D)`` (rows-major), 1 and 2 threads.
"""

from __future__ import annotations

import time

import torch

from moekit.kernels import threads
from moekit.kernels.activations import activation_fn
from moekit.kernels.slots import slot_ffn


def _gbs(fn, nbytes: int, reps: int = 7) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _three_ways(fn, nbytes: int) -> tuple[float, float, float]:
    """(1 intra-op thread, 2, 2 Python threads with 1 each)."""
    out = []
    for n in (1, 2):
        torch.set_num_threads(n)
        out.append(_gbs(fn, nbytes))
    torch.set_num_threads(2)
    with threads.decode_threads(2):
        out.append(_gbs(fn, nbytes))
    return out[0], out[1], out[2]


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for shape in ((3072, 1024), (4096, 1024)):
        ws = [torch.randn(shape) for _ in range(16)]
        x = torch.randn(1, shape[1])
        rows.append(
            (f"fp32 F.linear {shape}", *_three_ways(lambda: [threads.linear(x, w) for w in ws], 16 * ws[0].nbytes))
        )
    E, D, H = 64, 1024, 512
    ups = [torch.randn(E, D, 2 * H) for _ in range(4)]
    downs = [torch.randn(E, H, D) for _ in range(4)]
    views = [(u.unbind(0), d.unbind(0)) for u, d in zip(ups, downs)]
    ids = [torch.randperm(E)[:8][None] for _ in range(4)]
    wk = torch.rand(1, 8)
    act = activation_fn("swiglu")
    x = torch.randn(1, D)

    def layers():
        for u, d, v, i in zip(ups, downs, views, ids):
            slot_ffn(x, i, wk, u, d, act, views=v)

    nbytes = 4 * 8 * 3 * D * H * 4
    rows.append(("a layer's 8 experts, fp32 eager loop", *_three_ways(layers, nbytes)))
    hs = [torch.randn(1024, 1024).half() for _ in range(96)]
    xh = torch.randn(1, 1024)
    rows.append(
        (
            "fp16 F.linear (1024, 1024)",
            *_three_ways(lambda: [threads.linear(xh.half(), w) for w in hs], 96 * hs[0].nbytes),
        )
    )
    print("| batch-1 GEMV | 1 thread GB/s | 2 intra-op threads | 2 Python threads, 1 intra-op each |")
    print("|---|---|---|---|")
    for name, a, b, c in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {c:.1f} |")

    fs = [torch.randn(1024, 1024) for _ in range(64)]
    mulsum = torch.compile(lambda x, w: (x.unsqueeze(-2) * w).sum(-1), dynamic=False)
    stacked = [torch.randn(E, D, 1024) for _ in range(4)]
    rowsmajor = [w.transpose(1, 2).contiguous() for w in stacked]
    gather_dh = torch.compile(lambda x, w, i: (x[:, None, :, None] * w[i]).sum(2), dynamic=False)
    gather_hd = torch.compile(lambda x, w, i: (x[:, None, None, :] * w[i]).sum(-1), dynamic=False)
    print("\n| compiled (inductor) | 1 thread GB/s | 2 threads GB/s |")
    print("|---|---|---|")
    for name, fn, nbytes in (
        (
            "one-row multiply-and-sum, fp32 (1024, 1024) (out, in)",
            lambda: [mulsum(x, w) for w in fs],
            64 * fs[0].nbytes,
        ),
        (
            "8 of 64 experts gathered and summed, (E, D, H)",
            lambda: [gather_dh(x, w, i) for w, i in zip(stacked, ids)],
            4 * 8 * D * 1024 * 4,
        ),
        (
            "the same, rows-major (E, H, D)",
            lambda: [gather_hd(x, w, i) for w, i in zip(rowsmajor, ids)],
            4 * 8 * D * 1024 * 4,
        ),
    ):
        got = []
        for n in (1, 2):
            torch.set_num_threads(n)
            fn()  # compile
            got.append(_gbs(fn, nbytes))
        print(f"| {name} | {got[0]:.1f} | {got[1]:.1f} |")


if __name__ == "__main__":
    main()
