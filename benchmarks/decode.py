"""Batch-1 greedy decode speed by weight format, against the weight-read bound and llama.cpp, and
the quality each format keeps on a trained run.

    PYTHONPATH=src python benchmarks/decode.py speed --hf /tmp/decode-olmoe8-hf \\
        --formats fp32,fp16,bf16,int8,int4 --threads 1,2 [--gguf-dir /tmp/decode-olmoe8-gguf]
    PYTHONPATH=src python benchmarks/decode.py quality --run runs/NAME

``speed``: each (format, threads) setting in a fresh process: the folder loaded by ``load_hf``
(float32), every linear map but the routers and the embedding put in the format
(:func:`moekit.quantize.quantize_model`, ``experts=fmt, rest=fmt``); timed as llamacpp_ref.py
times llama.cpp: 7 prompt ids evaluated untimed, then ``--new-tokens`` one-token greedy steps of
which the first ``--warmup`` are untimed, median of ``--rounds``. The bound is the bytes of weights
one token reads (attention, head, routers, the top-k experts' projections, each in its format)
over the memory read bandwidth measured in the same process (``sum`` over 1 GiB, same threads).
With ``--gguf-dir``, llama.cpp's F32 / F16 / Q8_0 files of the same folder are run the same way
by ``benchmarks/llamacpp_ref.py`` in its own venv (see that file for how they were made), fed the
same token ids.

``quality``: the run's validation windows through its fp32 model and each quantized copy
(uniform int8, uniform int4 at groups of 64 and 32, and routing-chosen mixed formats at int4:64's
bytes and at 6 bits, by usage-weighted weight error or by output error measured on 16 windows of
the training split): perplexity, KL, top-1 agreement, per-layer routing agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from lowbit_kernels import read_bandwidth  # benchmarks/ is on sys.path
from moekit.kernels.lowbit import format_bytes
from moekit.kernels.threads import decode_threads, splits

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
LLAMA_TYPES = {"fp32": "F32", "fp16": "F16", "int8": "Q8_0"}


def bandwidth(threads: int) -> float:
    """Bytes/s of reading memory: ``sum`` over 1 GiB of float32 with ``threads`` threads, best of 5
    (torch's float32 GEMV itself reaches ~0.65 of this on this CPU: see RESULTS.md)."""
    torch.set_num_threads(threads)
    return read_bandwidth()


def huge_page_bytes() -> int:
    """Bytes of this process's memory on transparent huge pages (``AnonHugePages``; the decode
    weights are moved there by ``prepare_decoding_`` where the system allows)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return 0
    return next((int(ln.split()[1]) * 1024 for ln in text.splitlines() if ln.startswith("AnonHugePages:")), 0)


def bytes_per_token(cfg, fmt: str) -> int:
    """Weight bytes one decoded token reads in ``fmt`` (the routers and one embedding row: fp32; every
    layer taken as a MoE layer)."""
    m, D = cfg.moe, cfg.dim
    hk = (cfg.n_kv_heads or cfg.n_heads) * (D // cfg.n_heads)
    attn = format_bytes(fmt, D + 2 * hk, D) + format_bytes(fmt, D, D)
    expert = format_bytes(fmt, 2 * m.hidden_dim, D) + format_bytes(fmt, D, m.hidden_dim)
    shared_dim = m.num_shared_experts * (m.shared_hidden_dim or m.hidden_dim)  # DeepSeekMoE's shared experts
    shared = format_bytes(fmt, 2 * shared_dim, D) + format_bytes(fmt, D, shared_dim) if shared_dim else 0
    per_layer = attn + m.top_k * expert + shared + m.num_experts * D * 4
    return cfg.n_layers * per_layer + format_bytes(fmt, cfg.vocab_size, D) + D * 4


@torch.no_grad()
def decode_steps(model, steps: int, warmup: int, compile: bool = False) -> tuple[float, list[int]]:
    """As llamacpp_ref.py times llama.cpp: all prompt ids but the last evaluated untimed, then
    ``steps`` one-token greedy steps (the last prompt id first), the first ``warmup`` untimed;
    (seconds of the rest, the ``steps`` ids picked). ``compile``: the steps as ``generate(...,
    compile=True)`` runs them (the compiled ``decode_step`` on a static cache; 16-bit formats
    quantized around the native kernels, or without them the float model cast)."""
    from moekit.models.lm import KVCache, skip_guard_checks

    p = next(model.parameters())
    model.prepare_decoding_(compile)  # as generate does
    total = len(PROMPT) + steps
    size = 1 << (total - 1).bit_length() if compile else total  # as generate sizes its static cache
    cache = KVCache.empty(model.cfg, 1, p.device, p.dtype, size)
    if compile:
        step = model._compiled_decode_step()
        model.decode_step(torch.tensor([PROMPT[:-1]]), cache, torch.arange(len(PROMPT) - 1))
    else:
        model(torch.tensor([PROMPT[:-1]]), cache=cache)
    nxt, out, t0 = torch.tensor([[PROMPT[-1]]]), [], 0.0
    split = splits(model) and not compile
    with ExitStack() as steps_after_the_first:
        for i in range(steps):
            if i == warmup:
                t0 = time.perf_counter()
            if compile:
                if i == 1:  # as generate: the guards checked on the first step's shapes, every later one's
                    steps_after_the_first.enter_context(skip_guard_checks())
                logits = step(nxt, cache, torch.tensor([len(PROMPT) - 1 + i]))
            else:
                with decode_threads() if split else nullcontext():  # as the model's generate runs one-token steps
                    logits = model(nxt, cache=cache).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
    return time.perf_counter() - t0, out


def one(args) -> None:
    """One moekit setting in this process; one JSON line."""
    from moekit.generate import CAST_DTYPES, cast_when_compiled
    from moekit.interop import load_hf
    from moekit.quantize import quantize_model

    torch.set_num_threads(args.threads)
    model = load_hf(args.hf)
    if args.compile and cast_when_compiled(args.fmt):  # as generate(compile=True): the float model cast
        model.to(CAST_DTYPES[args.fmt])
    elif args.fmt != "fp32":
        quantize_model(model, args.fmt, rest=args.fmt)
    bw = bandwidth(args.threads)
    times, tokens = [], []
    for _ in range(args.rounds):
        secs, tokens = decode_steps(model, args.new_tokens, args.warmup, args.compile)
        times.append(secs)
    tok_s = (args.new_tokens - args.warmup) / statistics.median(times)
    bound = bw / bytes_per_token(model.cfg, args.fmt)
    row = dict(
        engine="moekit compiled" if args.compile else "moekit",
        fmt=args.fmt,
        threads=args.threads,
        tok_s=tok_s,
        bound=bound,
        bandwidth=bw,
    )
    row.update(tokens=tokens, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row.update(huge_pages=huge_page_bytes())
    print(json.dumps(row), flush=True)


def speed(args) -> None:
    hf_cfg = json.loads((Path(args.hf) / "config.json").read_text())
    n_ctx = min(512, hf_cfg.get("max_position_embeddings") or 512)  # llama.cpp's context: at most the model's
    settings = []  # (command, what to add to its row), in the order they run
    for threads in [int(t) for t in args.threads.split(",")]:
        for fmt in args.formats.split(","):
            cmd = [sys.executable, __file__, "one", "--hf", args.hf, "--fmt", fmt, "--threads", str(threads)]
            cmd += ["--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
            settings.append((cmd, {}))
            if args.compile and fmt in ("fp32", "fp16", "bf16", "int8"):  # int4 decodes eagerly
                settings.append((cmd + ["--compile"], {}))
            if args.gguf_dir and fmt in LLAMA_TYPES:
                gguf = next(Path(args.gguf_dir).glob(f"*-{LLAMA_TYPES[fmt]}.gguf"), None)
                if gguf is not None:
                    cmd = [args.llama_python, str(Path(__file__).with_name("llamacpp_ref.py")), "--gguf", str(gguf)]
                    cmd += ["--threads", str(threads), "--new-tokens", str(args.new_tokens)]
                    cmd += ["--prompt-ids", ",".join(map(str, PROMPT)), "--warmup", str(args.warmup)]
                    cmd += ["--rounds", str(args.rounds), "--n-ctx", str(n_ctx)]
                    settings.append((cmd, dict(fmt=fmt, threads=threads)))
    # every setting once per pass, --repeat passes: a host whose speed drifts slows all settings alike
    passes = [[{**_run(cmd), **extra} for cmd, extra in settings] for _ in range(args.repeat)]
    rows = [_median_row([p[i] for p in passes]) for i in range(len(settings))]
    ref = next((r["tokens"] for r in rows if r.get("engine") == "moekit" and r.get("fmt") == "fp32"), None)
    print(f"{args.hf}: batch 1, prompt {len(PROMPT)} tokens, {args.new_tokens} greedy tokens timed", end="")
    print(f", median of {args.repeat} passes (their range)" if args.repeat > 1 else "")
    print(
        "| engine, format | threads | tok/s | weight-read bound tok/s | of bound | same tokens as moekit fp32 "
        "| peak RSS GiB | on huge pages GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r.get('engine', '?')} {r.get('fmt', '')} | {r.get('threads', '')} | FAIL: {r['error']} |")
            continue
        same = sum(a == b for a, b in zip(r["tokens"], ref or [])) if ref else 0
        bound = r.get("bound")
        spread = f" ({min(r['passes']):.1f}-{max(r['passes']):.1f})" if len(r["passes"]) > 1 else ""
        print(
            f"| {r['engine']} {r.get('type', r['fmt'])} | {r['threads']} | {r['tok_s']:.1f}{spread} | "
            + (f"{bound:.1f} | {r['tok_s'] / bound:.2f}" if bound else "- | -")
            + f" | {same}/{len(r['tokens'])} | {r['peak_rss'] / 2**30:.2f} | "
            + (f"{r['huge_pages'] / 2**30:.2f} |" if "huge_pages" in r else "- |")
        )


def _median_row(runs: list[dict]) -> dict:
    """One setting's row over its passes: the median tok/s (the first failure, if any, instead)."""
    failed = next((r for r in runs if "error" in r), None)
    if failed is not None:
        return failed
    row = dict(runs[0])
    row["tok_s"] = statistics.median(r["tok_s"] for r in runs)
    row["passes"] = [r["tok_s"] for r in runs]
    return row


def _run(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        return dict(error=(res.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(res.stdout.strip().splitlines()[-1])


def quality(args) -> None:
    from moekit.generate import load_run_model
    from moekit.quantize import compare, quantize_model, validation_windows

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    idx, tgt = validation_windows(run, args.windows)
    ref, _ = load_run_model(str(run))
    int4_bytes = None
    print(f"{run}: {idx.shape[0]} validation windows of {idx.shape[1]} tokens")
    print(
        "| experts | expert MiB | perplexity (fp32 -> quantized) | change | KL | top-1 agreement "
        "| same experts (worst layer) |"
    )
    print("|---|---|---|---|---|---|---|")
    settings = [
        ("int8", {}),
        ("int4:64", {}),
        ("int4:32", {}),
        ("auto at int4:64's bytes", "int4"),
        ("auto at int4:64's bytes, calibrated", "int4-cal"),
        ("auto, 6 bits", 6.0),
        ("auto, 6 bits, calibrated", "6-cal"),
    ]
    calibration, _ = validation_windows(run, 16, split="train")
    for name, how in settings:
        model, _ = load_run_model(str(run))
        if how in ("int4", "int4-cal"):
            cal = calibration if how == "int4-cal" else None
            rep = quantize_model(model, "auto", budget_bytes=int4_bytes, calibration=cal)
        elif how == "6-cal":
            rep = quantize_model(model, "auto", bits=6.0, calibration=calibration)
        elif isinstance(how, float):
            rep = quantize_model(model, "auto", bits=how)
        else:
            rep = quantize_model(model, name)
        if name == "int4:64":
            int4_bytes = rep.expert_bytes_after
        q = compare(ref, model, idx, tgt)
        mix = ", ".join(f"{n} {f}" for f, n in rep.counts.items())
        print(
            f"| {name} ({mix}) | {rep.expert_bytes_after / 2**20:.2f} | {q.ppl_ref:.3f} -> {q.ppl:.3f} | "
            f"{q.ppl_change:+.2%} | {q.kl:.2e} | {q.top1:.2%} | {min(q.routing):.2%} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--hf", required=True)
    p.add_argument("--formats", default="fp32,fp16,bf16,int8,int4")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--gguf-dir", default=None)
    p.add_argument("--llama-python", default="/tmp/llama-venv/bin/python")
    p.add_argument("--compile", action="store_true", help="also time moekit's compiled decode step")
    p.add_argument("--repeat", type=int, default=1, help="run every setting this many times, in passes; median")
    p.set_defaults(fn=speed)
    p = sub.add_parser("one")
    p.add_argument("--hf", required=True)
    p.add_argument("--fmt", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.set_defaults(fn=one)
    p = sub.add_parser("quality")
    p.add_argument("--run", required=True)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(fn=quality)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
