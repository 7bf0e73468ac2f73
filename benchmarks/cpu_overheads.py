"""The small CPU timings behind choices in the layer (1 thread, medians of repeated calls):

1. few-slot decoding (kernels/slots.py): one matmul pair per chosen expert (``_host_loop``) vs every
   expert on every token in two batched matmuls (``_all_experts``), at several shapes and T, which
   set ``ALL_EXPERTS_BYTES_PER_TOKEN``;
2. dispatch gathers: advanced indexing vs ``index_select``, and the gather's backward: rows back
   in slot order + sum over K vs one ``index_add_`` (layer/dispatch.py, ``_GatherSlots``);
3. the combine's weighted sum, forward + backward: broadcast multiply + sum vs (T,1,K) x (T,K,D)
   bmm, both under autograd, vs ``dispatch.weighted_sum`` (bmm forward, its own backward);
4. SwiGLU fwd+bwd: autograd through chunk vs the registry's (kernels/activations.py).

    PYTHONPATH=src python benchmarks/cpu_overheads.py
"""

from __future__ import annotations

import statistics
import time

import torch

from moekit.kernels.activations import get_activation
from moekit.kernels.slots import _all_experts, _host_loop
from moekit.layer.dispatch import weighted_sum
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


def interleaved_ms(fns: list, reps: int = 25) -> list[float]:
    """Median ms of each function, timed in turn round after round (this machine's speed drifts)."""
    for fn in fns:
        fn()
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def gathers_and_combine() -> None:
    """The dispatch gather (forward; its backward's two forms) and the combine's weighted sum
    (forward + backward, each form moekit had or has), at T*K = 8192 rows."""
    print(
        "\n| dtype | K | D | gather x[idx] ms | index_select ms | gather bwd: slot order + sum ms | index_add_ ms"
        " | combine fwd+bwd: multiply + sum ms | bmm ms | moekit weighted_sum ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        for K, D in ((2, 128), (4, 128), (2, 512)):
            T = 8192 // K
            x, idx = torch.randn(T, D).to(dt), torch.randint(0, T, (T * K,))
            perm = torch.randperm(T * K)
            g_RD, g_TD = torch.randn(T * K, D).to(dt), torch.randn(T, D).to(dt)
            w = torch.rand(T, K).to(dt).requires_grad_()
            y = torch.randn(T, K, D).to(dt).requires_grad_()

            def fwd_bwd(f):
                w.grad = y.grad = None
                f().backward(g_TD)

            cells = interleaved_ms(
                [
                    lambda: x[idx],
                    lambda: x.index_select(0, idx),
                    lambda: g_RD.index_select(0, perm).view(T, K, D).sum(1),
                    lambda: g_RD.new_zeros(T, D).index_add_(0, idx, g_RD),
                    lambda: fwd_bwd(lambda: (w.unsqueeze(-1) * y).sum(1)),
                    lambda: fwd_bwd(lambda: torch.bmm(w.unsqueeze(1), y).squeeze(1)),
                    lambda: fwd_bwd(lambda: weighted_sum(w, y)),
                ]
            )
            row = " | ".join(f"{c:.2f}" for c in cells)
            print(f"| {str(dt).split('.')[-1]} | {K} | {D} | {row} |")


def swiglu() -> None:
    """SwiGLU fwd+bwd: autograd through chunk, silu and * vs moekit's (both halves of the gradient
    written into one tensor, no cat), at R*F = 1M."""
    print("\n| dtype | R | F | autograd ms | moekit swiglu ms |")
    print("|---|---|---|---|---|")
    fused = get_activation("swiglu").fn
    for dt in (torch.float32, torch.bfloat16):
        for R, F in ((8192, 128), (4096, 256)):
            h = torch.randn(R, 2 * F).to(dt).requires_grad_()
            g_a = torch.randn(R, F).to(dt)

            def fwd_bwd(fn):
                h.grad = None
                gate, up = h.chunk(2, dim=-1)
                (fn(h) if fn is not None else torch.nn.functional.silu(gate) * up).backward(g_a)

            plain, ours = interleaved_ms([lambda: fwd_bwd(None), lambda: fwd_bwd(fused)])
            print(f"| {str(dt).split('.')[-1]} | {R} | {F} | {plain:.2f} | {ours:.2f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    few_slots()
    gathers_and_combine()
    swiglu()
