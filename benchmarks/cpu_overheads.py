"""The small CPU timings behind choices in the layer (1 thread, medians of repeated calls):

1. few-slot decoding (kernels/slots.py): one matmul pair per chosen expert (``_host_loop``) vs every
   expert on every token in two batched matmuls (``_all_experts``), at several shapes and T, which
   set ``ALL_EXPERTS_BYTES_PER_TOKEN``;
2. dispatch gathers: advanced indexing vs ``index_select`` (layer/dispatch.py);
3. the combine: (T,1,K) x (T,K,D) bmm vs broadcast multiply + sum (``dispatch.weighted_sum``).

    PYTHONPATH=src python benchmarks/cpu_overheads.py
"""

from __future__ import annotations

import statistics
import time

import torch

from moekit.kernels.slots import _all_experts, _host_loop
from moekit.layer.experts import ACTIVATIONS


def us(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def few_slots() -> None:
    act = ACTIVATIONS["swiglu"]
    print("| D | F | E | K | T | expert weights MiB | one pair per chosen expert µs | all experts µs |")
    print("|---|---|---|---|---|---|---|---|")
    for D, F, E, K in [(128, 128, 16, 4), (128, 128, 64, 4), (256, 128, 32, 4), (512, 256, 16, 2)]:
        w1, w2 = torch.randn(E, D, 2 * F) * 0.05, torch.randn(E, F, D) * 0.05
        mib = (w1.numel() + w2.numel()) * 4 / 2**20
        for T in (1, 2, 4, 8, 16):
            x = torch.randn(T, D)
            e = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
            w = torch.rand(T, K)
            ref = _host_loop(x, e, w, w1, w2, act, torch.zeros(T, D))
            torch.testing.assert_close(_all_experts(x, e, w, w1, w2, act), ref, rtol=1e-4, atol=1e-4)
            with torch.no_grad():
                a = us(lambda: _host_loop(x, e, w, w1, w2, act, torch.zeros(T, D)))
                b = us(lambda: _all_experts(x, e, w, w1, w2, act))
            print(f"| {D} | {F} | {E} | {K} | {T} | {mib:.1f} | {a:.0f} | {b:.0f} |")


def gathers_and_combine() -> None:
    print("\n| dtype | gather x[idx] ms | index_select ms | combine bmm ms | multiply + sum ms |")
    print("|---|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        x, idx = torch.randn(2048, 128).to(dt), torch.randint(0, 2048, (8192,))
        w, y = torch.rand(2048, 2).to(dt), torch.randn(2048, 2, 128).to(dt)
        cells = [
            us(lambda: x[idx]),
            us(lambda: x.index_select(0, idx)),
            us(lambda: torch.bmm(w.unsqueeze(1), y).squeeze(1)),
            us(lambda: (w.unsqueeze(-1) * y).sum(1)),
        ]
        print(f"| {str(dt).split('.')[-1]} | " + " | ".join(f"{c / 1e3:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    few_slots()
    gathers_and_combine()
