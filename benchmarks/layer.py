"""Time one MoE layer against the same-FLOPs dense chain (see shared BENCHMARKS.md).

ratio = time(dense chain) / time(MoE layer), measured in the same process, dtype and run; the
dense chain is ``x_(T*K)D @ W1_D(2F) -> SwiGLU -> @ W2_FD`` (perfectly balanced, no routing).
Router (linear + softmax + top-k) is included in every MoE row.

Every moekit backend is first checked against the ``grouped`` backend on the same shape, weights
and input (output, input gradient, every weight gradient; max error relative to the reference's
max, 1e-4 in fp32, 2e-2 in bf16/fp16); a backend that disagrees or raises gets a FAIL row and is
never timed. On CUDA each row also reports peak memory of one fwd+bwd above the inputs+weights
baseline, and the activation memory kept for backward (allocated after forward - before).

``--decode 1,8,64`` times forward only (no_grad) at those token counts instead, next to the floor
``experts_hit * 3*D*F*bytes / bandwidth``: experts_hit from that batch's routing, bandwidth from a
large copy in the same run (bytes read + written / time, as the BENCHMARKS.md anchors count it).

    python benchmarks/layer.py                       # CPU, shape "cpu", fp32 and bf16
    python benchmarks/layer.py --device cuda --shapes mixtral,qwen3moe,olmoe,small --dtypes bf16
    python benchmarks/layer.py --device cuda --shapes qwen3moe,mixtral --dtypes bf16 --decode 1,8,64
    TRITON_INTERPRET=1 python benchmarks/layer.py --shapes tiny --dtypes fp32 --backends loop,grouped,triton
    (add --markdown PATH to append the tables, with date, device, versions and command, to PATH)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig
from report import cpu_name, emit, write_markdown_to  # benchmarks/report.py

SHAPES = {  # T, D, F, E, K
    "mixtral": (8192, 4096, 14336, 8, 2),
    "qwen3moe": (16384, 2048, 768, 128, 8),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "small": (4096, 1024, 512, 32, 4),
    "cpu": (2048, 512, 256, 16, 2),
    "tiny": (64, 32, 32, 8, 2),  # smoke test only (seconds on CPU, also under TRITON_INTERPRET=1)
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
MIB = 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
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


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a large copy, counting bytes read + written (device-to-device on CUDA, clone on CPU)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    if device.type == "cuda":
        dst = torch.empty_like(src)
        t = timeit(lambda: dst.copy_(src), device, reps=10)
    else:
        t = timeit(src.clone, device, reps=3, warmup=1)
    return 2 * nbytes / t


# ----------------------------------------------------------------------------- implementations
def new_moe(D, F_, E, K, backend, dtype, device) -> MoE:
    with torch.device(device):  # initialise on the device (the mixtral shape is 1.4 G parameters)
        moe = MoE(MoEConfig(dim=D, hidden_dim=F_, num_experts=E, top_k=K, backend=backend))
    return moe.to(dtype)


def dense_chain(T, D, F_, K, dtype, device):
    x = torch.randn(T * K, D, dtype=dtype, device=device, requires_grad=True)
    w1 = (torch.randn(D, 2 * F_, dtype=dtype, device=device) / D**0.5).requires_grad_()
    w2 = (torch.randn(F_, D, dtype=dtype, device=device) / F_**0.5).requires_grad_()

    def fwd(_x=None):
        g, u = (x @ w1).chunk(2, -1)
        return (F.silu(g) * u) @ w2

    return x, (w1, w2), fwd


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
    """transformers' MixtralSparseMoeBlock (own random weights); None when not importable."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception:  # noqa: BLE001 - optional peer
        return None, "transformers not installed"
    c = moe.cfg
    cfg = MixtralConfig(
        hidden_size=c.dim, intermediate_size=c.hidden_dim, num_local_experts=c.num_experts, num_experts_per_tok=c.top_k
    )
    try:
        with torch.device(moe.experts.w_up.device):
            block = MixtralSparseMoeBlock(cfg)
        block.experts.config._experts_implementation = impl
    except Exception as err:  # noqa: BLE001
        return None, f"{type(err).__name__}: {str(err)[:100]}"
    with torch.no_grad():  # transformers leaves the expert tensors uninitialised (torch.empty)
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    block = block.to(moe.experts.w_up.dtype)

    def fwd(x_TD):
        out = block(x_TD.unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out).reshape(x_TD.shape)

    fwd.params = list(block.parameters())
    return fwd, None


def scattermoe_block(moe: MoE):
    """ScatterMoE's public ``scattermoe.mlp.GLUMLP`` (SiLU-gated, own random weights) fed moekit's
    router: ``mlp(x, k_weights, k_idxs)``, as in its README. (None, why) when unavailable."""
    try:
        import scattermoe  # noqa: F401
        from scattermoe.mlp import GLUMLP
    except Exception as err:  # noqa: BLE001 - optional peer, never vendored
        return None, "not installed" if isinstance(err, ImportError) else f"import failed: {type(err).__name__}: {err}"
    c, w = moe.cfg, moe.experts.w_up
    try:
        with torch.device(w.device):
            mlp = GLUMLP(
                input_size=c.dim,
                hidden_size=c.hidden_dim,
                num_experts=c.num_experts,
                top_k=c.top_k,
                activation=torch.nn.SiLU(),
            )
        with torch.no_grad():
            for p in mlp.parameters():
                p.normal_(0.0, 0.02)
        mlp = mlp.to(w.dtype)
    except Exception as err:  # noqa: BLE001
        return None, f"construction failed: {type(err).__name__}: {str(err)[:100]}"

    def fwd(x_TD):
        r = moe.router(x_TD, c.top_k)
        return mlp(x_TD, r.weights_TK.to(x_TD.dtype), r.experts_TK)

    fwd.params = list(mlp.parameters()) + list(moe.router.parameters())
    return fwd, None


def check_against(moe: MoE, ref: MoE, x: torch.Tensor, g: torch.Tensor, tol: float):
    """Max relative error (vs the reference's max) over output, x.grad and every weight gradient;
    ``(ok, worst_error, which)``. ``moe`` gets ``ref``'s weights first."""
    moe.load_state_dict(ref.state_dict())
    got, want = {}, {}
    for m, store in ((ref, want), (moe, got)):
        xi = x.detach().clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        out = m(xi).out
        out.backward(g)
        store["out"], store["x.grad"] = out.detach().float(), xi.grad.float()
        for n, p in m.named_parameters():
            if p.grad is not None:
                store[n + ".grad"] = p.grad.float()
        m.zero_grad(set_to_none=True)
    worst, which = 0.0, ""
    for k, w in want.items():
        if k not in got:
            return False, float("inf"), f"{k} missing"
        err = ((got[k] - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
        if not err <= worst:  # also catches nan
            worst, which = err, k
    return worst <= tol, worst, which


# ----------------------------------------------------------------------------- fwd + bwd tables
def bench_shape(name, dtype_name, device, reps, backends, peers, emit_row):
    T, D, F_, E, K = SHAPES[name]
    dtype = DTYPES[dtype_name]
    tol = TOL[dtype]
    cuda = device.type == "cuda"
    torch.manual_seed(0)

    def measure(label, fn, params):
        """Time fwd (no_grad) and fwd+bwd, and on CUDA one fwd+bwd's memory, for ``fn(x)``."""
        with torch.no_grad():
            t_f = timeit(lambda: fn(x), device, reps)
        t_fb = timeit(lambda: fn(x).backward(g), device, reps)
        mem = ""
        if cuda:
            x.grad = None
            for p in params:
                p.grad = None
            gc.collect()
            torch.cuda.synchronize()
            base_bytes = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fn(x)
            torch.cuda.synchronize()
            act = torch.cuda.memory_allocated(device) - base_bytes
            out.backward(g)
            del out
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) - base_bytes
            mem = f" | {peak / MIB:.0f} | {act / MIB:.0f}"
        return t_f, t_fb, mem

    # the dense chain: its own input, so x below stays (T, D)
    x_d, w_d, dense = dense_chain(T, D, F_, K, dtype, device)
    g_d = torch.randn(T * K, D, dtype=dtype, device=device)
    x, g = x_d, g_d
    df, dfb, mem = measure("dense chain", dense, w_d)
    emit_row("dense chain", df, dfb, mem, df, dfb)
    del x_d, w_d, dense, g_d

    x = torch.randn(T, D, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(T, D, dtype=dtype, device=device)
    ref = new_moe(D, F_, E, K, "grouped", dtype, device)  # correctness reference and the peers' router

    rows = [(f"moekit {b}", b) for b in backends]
    if "naive" in peers:
        rows.append(("plain per-expert loop", "naive"))
    for impl in ("eager", "grouped_mm"):
        if f"hf-{impl}" in peers:
            rows.append((f"transformers {impl}", f"hf-{impl}"))
    if "scattermoe" in peers:
        rows.append(("ScatterMoE", "scattermoe"))

    for label, kind in rows:
        moe = None
        try:
            if kind in ("naive", "scattermoe") or kind.startswith("hf-"):
                if kind == "naive":
                    fn, why = naive_loop_block(ref), None
                elif kind == "scattermoe":
                    fn, why = scattermoe_block(ref)
                else:
                    fn, why = transformers_block(ref, kind[3:])
                if fn is None:
                    emit(f"| {label} | {why} | | | |" + (" | |" if cuda else ""))
                    continue
                params = getattr(fn, "params", list(ref.parameters()))
            else:
                moe = new_moe(D, F_, E, K, kind, dtype, device)
                ok, err, which = check_against(moe, ref, x, g, tol)
                if not ok:
                    emit(
                        f"| {label} | FAIL: max rel err {err:.2e} > {tol:.0e} ({which}) vs grouped | | | |"
                        + (" | |" if cuda else "")
                    )
                    continue

                def fn(xx, m=moe):
                    return m(xx).out

                params = list(moe.parameters())
            t_f, t_fb, mem = measure(label, fn, params)
        except Exception as err:  # noqa: BLE001 - a failing implementation never gets a timing row
            emit(f"| {label} | FAIL: {type(err).__name__}: {str(err)[:150]} | | | |" + (" | |" if cuda else ""))
            continue
        finally:
            del moe
            x.grad = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        emit_row(label, t_f, t_fb, mem, df, dfb)


# ----------------------------------------------------------------------------- decode
def graph_replay(fn, x):
    """``fn(x)`` captured once in a CUDA graph (after warm-up calls on a side stream, which also
    tune the kernels); returns the graph's replay. Raises if ``fn`` is not
    capturable (a host sync or a data-dependent shape)."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        graph.static_out = fn(static_x)  # kept alive with the graph
    return graph.replay


def decode_shape(name, dtype_name, device, reps, backends, peers, token_counts, bandwidth, graphs=True):
    """Forward-only µs per call at few tokens, next to the weight-read floor for that batch."""
    _, D, F_, E, K = SHAPES[name]
    dtype = DTYPES[dtype_name]
    tol = TOL[dtype]
    torch.manual_seed(0)
    ref = new_moe(D, F_, E, K, "grouped", dtype, device)
    xs = {T: torch.randn(T, D, dtype=dtype, device=device) for T in token_counts}
    fns, labels = {}, []
    # correctness first, on the largest decode batch (fwd + grads), for every moekit backend
    xc = xs[max(token_counts)]
    gc_ = torch.randn_like(xc)
    for b in backends:
        label = f"moekit {b}"
        try:
            moe = new_moe(D, F_, E, K, b, dtype, device)
            ok, err, which = check_against(moe, ref, xc, gc_, tol)
            fns[label] = (
                (lambda xx, m=moe: m(xx).out) if ok else f"FAIL: max rel err {err:.2e} > {tol:.0e} ({which}) vs grouped"
            )
        except Exception as e:  # noqa: BLE001
            fns[label] = f"FAIL: {type(e).__name__}: {str(e)[:150]}"
        labels.append(label)
    peer_fns = []
    if "naive" in peers:
        peer_fns.append(("plain per-expert loop", (naive_loop_block(ref), None)))
    for impl in ("eager", "grouped_mm"):
        if f"hf-{impl}" in peers:
            peer_fns.append((f"transformers {impl}", transformers_block(ref, impl)))
    if "scattermoe" in peers:
        peer_fns.append(("ScatterMoE", scattermoe_block(ref)))
    for label, (fn, why) in peer_fns:
        fns[label] = fn if fn is not None else why
        labels.append(label)

    if device.type == "cuda" and graphs:  # moekit rows again as one replayed CUDA graph (no launch overhead)
        for b in backends:
            fn = fns[f"moekit {b}"]
            if callable(fn):

                def graphed(xx, f=fn):
                    return f(xx)

                graphed.graph = True
                fn = graphed
            fns[f"moekit {b} (CUDA graph)"] = fn
            labels.append(f"moekit {b} (CUDA graph)")

    emit("| T | experts hit | floor µs | " + " | ".join(labels) + " |")
    emit("|---|---|---|" + "---|" * len(labels))
    bytes_per_expert = 3 * D * F_ * torch.tensor([], dtype=dtype).element_size()
    for T, x in xs.items():
        with torch.no_grad():
            hit = int(torch.unique(ref(x).experts_TK).lt(E).sum())
        floor = hit * bytes_per_expert / bandwidth
        cells = []
        for label in labels:
            fn = fns[label]
            if isinstance(fn, str):
                cells.append(fn if T == min(token_counts) else "")
                continue
            try:
                call = graph_replay(fn, x) if getattr(fn, "graph", None) else (lambda f=fn, xx=x: f(xx))
                with torch.no_grad():
                    cells.append(f"{timeit(call, device, reps) * 1e6:.0f}")
            except Exception as e:  # noqa: BLE001
                cells.append(f"FAIL: {type(e).__name__}: {str(e)[:80]}")
        emit(f"| {T} | {hit} | {floor * 1e6:.0f} | " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="cpu", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument(
        "--backends",
        default=None,
        help="moekit backends; default loop,grouped,auto on CPU and loop,grouped,triton on CUDA",
    )
    ap.add_argument(
        "--peers",
        default="naive,hf-eager,hf-grouped_mm,scattermoe",
        help="comma list: naive, hf-eager, hf-grouped_mm, scattermoe (skipped with a note if not installed)",
    )
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--decode", default=None, help="comma list of token counts: forward-only decode table instead")
    ap.add_argument("--no-graphs", action="store_true", help="decode: skip the CUDA-graph rows of moekit's backends")
    ap.add_argument("--markdown", default=None, help="append the tables (with date, device, versions, command) here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    backends = (args.backends or ("loop,grouped,triton" if cuda else "loop,grouped,auto")).split(",")
    peers = [p for p in args.peers.split(",") if p]
    write_markdown_to(args.markdown)
    dev_name = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    versions = []
    for mod in ("triton", "transformers", "scattermoe"):
        try:
            versions.append(f"{mod} {getattr(__import__(mod), '__version__', '?')}")
        except Exception:  # noqa: BLE001
            versions.append(f"{mod} not installed")
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    emit()
    emit(f"### {datetime.date.today()} | {dev_name} | torch {torch.__version__} | {' | '.join(versions)}")
    emit()
    emit(f"command: `python benchmarks/layer.py {cmd}`")

    if args.decode:
        token_counts = [int(t) for t in args.decode.split(",")]
        bw = copy_bandwidth(device, 2**30 if cuda else 2**28)
        emit()
        emit(f"copy bandwidth (bytes read + written / time): {bw / 1e9:.0f} GB/s")
        for shape in args.shapes.split(","):
            for dt in args.dtypes.split(","):
                _, D, F_, E, K = SHAPES[shape]
                emit()
                emit(f"#### decode, shape {shape} (D={D} F={F_} E={E} K={K}), {dt}, forward µs per call (median)")
                emit()
                decode_shape(shape, dt, device, args.reps, backends, peers, token_counts, bw, graphs=not args.no_graphs)
        return

    for shape in args.shapes.split(","):
        for dt in args.dtypes.split(","):
            T, D, F_, E, K = SHAPES[shape]
            emit()
            emit(f"#### shape {shape} (T={T} D={D} F={F_} E={E} K={K}), {dt}")
            emit()
            mem_h = " peak MiB fwd+bwd | activations MiB |" if cuda else ""
            emit("| implementation | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio |" + mem_h)
            emit("|---|---|---|---|---|" + ("---|---|" if cuda else ""))

            def emit_row(label, tf, tfb, mem, df, dfb):
                emit(f"| {label} | {tf * 1e3:.2f} | {df / tf:.2f} | {tfb * 1e3:.2f} | {dfb / tfb:.2f}{mem} |")

            bench_shape(shape, dt, device, args.reps, backends, peers, emit_row)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
