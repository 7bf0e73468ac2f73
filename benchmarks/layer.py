"""Time one MoE layer against the same-FLOPs dense chain (see shared BENCHMARKS.md).

ratio = time(dense chain) / time(MoE layer), measured in the same process, dtype and run; the
dense chain is ``x_(T*K)D @ W1_D(2F) -> SwiGLU -> @ W2_FD`` (perfectly balanced, no routing).
Router (linear + softmax + top-k) is included in every MoE row.

    python benchmarks/layer.py                       # CPU, shape "cpu", fp32 and bf16
    python benchmarks/layer.py --device cuda --shapes mixtral,qwen3moe,olmoe,small --dtypes bf16
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig

SHAPES = {  # T, D, F, E, K
    "mixtral": (8192, 4096, 14336, 8, 2),
    "qwen3moe": (16384, 2048, 768, 128, 8),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "small": (4096, 1024, 512, 32, 4),
    "cpu": (2048, 512, 256, 16, 2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timeit(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dense_chain(T, D, F_, K, dtype, device):
    x = torch.randn(T * K, D, dtype=dtype, device=device, requires_grad=True)
    w1 = (torch.randn(D, 2 * F_, dtype=dtype, device=device) / D**0.5).requires_grad_()
    w2 = (torch.randn(F_, D, dtype=dtype, device=device) / F_**0.5).requires_grad_()

    def fwd():
        g, u = (x @ w1).chunk(2, -1)
        return (F.silu(g) * u) @ w2

    return x, fwd


def naive_loop_block(moe: MoE):
    """The plain per-expert loop people write first (mask, gather, index_add), as a peer row."""
    w_up, w_down = moe.experts.w_up, moe.experts.w_down

    def fwd(x_TD):
        r = moe.router(x_TD, moe.cfg.top_k)
        out = torch.zeros_like(x_TD)
        for e in range(moe.num_experts):
            tok, slot = torch.where(r.experts_TK == e)
            if tok.numel() == 0:
                continue
            g, u = (x_TD[tok] @ w_up[e]).chunk(2, -1)
            y = (F.silu(g) * u) @ w_down[e]
            out.index_add_(0, tok, y * r.weights_TK[tok, slot, None].to(y.dtype))
        return out

    return fwd


def transformers_block(moe: MoE, impl: str):
    """transformers' MixtralSparseMoeBlock with moekit's weights (None when not importable)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception:  # noqa: BLE001 - optional peer
        return None
    c = moe.cfg
    cfg = MixtralConfig(hidden_size=c.dim, intermediate_size=c.hidden_dim, num_local_experts=c.num_experts,
                        num_experts_per_tok=c.top_k)
    try:
        block = MixtralSparseMoeBlock(cfg)
        block.experts.config._experts_implementation = impl
    except Exception:  # noqa: BLE001
        return None
    with torch.no_grad():  # transformers leaves the expert tensors uninitialised (torch.empty)
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    block = block.to(moe.experts.w_up.device, moe.experts.w_up.dtype)

    def fwd(x_TD):
        out = block(x_TD.unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out).reshape(x_TD.shape)

    return fwd


def bench_shape(name, dtype_name, device, reps, backends, peers):
    T, D, F_, E, K = SHAPES[name]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    rows = []
    x_dense, dense = dense_chain(T, D, F_, K, dtype, device)
    g_dense = torch.randn(T * K, D, dtype=dtype, device=device)
    t_dense_f = timeit(lambda: dense(), device, reps)
    t_dense_fb = timeit(lambda: dense().backward(g_dense), device, reps)
    rows.append(("dense chain", t_dense_f, t_dense_fb))

    x = torch.randn(T, D, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(T, D, dtype=dtype, device=device)
    candidates = []
    for b in backends:
        moe = MoE(MoEConfig(dim=D, hidden_dim=F_, num_experts=E, top_k=K, backend=b)).to(device, dtype)
        candidates.append((f"moekit {b}", (lambda m: lambda x: m(x).out)(moe)))
    base = MoE(MoEConfig(dim=D, hidden_dim=F_, num_experts=E, top_k=K)).to(device, dtype)
    if "naive" in peers:
        candidates.append(("plain per-expert loop", naive_loop_block(base)))
    for impl in ("eager", "grouped_mm"):
        if f"hf-{impl}" in peers:
            fn = transformers_block(base, impl)
            if fn is not None:
                candidates.append((f"transformers {impl}", fn))
    for label, fn in candidates:
        try:
            with torch.no_grad():
                t_f = timeit(lambda: fn(x), device, reps)
            t_fb = timeit(lambda: fn(x).backward(g), device, reps)
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"  {label}: failed: {type(err).__name__}: {str(err)[:120]}", file=sys.stderr)
            continue
        rows.append((label, t_f, t_fb))
    return rows, (t_dense_f, t_dense_fb)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--backends", default="loop,grouped,auto")
    ap.add_argument("--peers", default="naive,hf-eager,hf-grouped_mm", help="comma list: naive, hf-eager, hf-grouped_mm")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    try:
        import transformers
        tv = transformers.__version__
    except Exception:  # noqa: BLE001
        tv = "not installed"
    print(f"# {datetime.date.today()} | {dev_name} | torch {torch.__version__} | transformers {tv}")
    print(f"# command: python benchmarks/layer.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    for shape in args.shapes.split(","):
        for dt in args.dtypes.split(","):
            rows, (df, dfb) = bench_shape(shape, dt, device, args.reps, args.backends.split(","), args.peers.split(","))
            T, D, F_, E, K = SHAPES[shape]
            print(f"\n## shape {shape} (T={T} D={D} F={F_} E={E} K={K}), {dt}")
            print("| implementation | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio |")
            print("|---|---|---|---|---|")
            for label, tf, tfb in rows:
                print(f"| {label} | {tf * 1e3:.2f} | {df / tf:.2f} | {tfb * 1e3:.2f} | {dfb / tfb:.2f} |")
            if device.type == "cuda":
                print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
