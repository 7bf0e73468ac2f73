"""Activation checkpointing (issue 25, item 9): peak memory and time of one training step of the
default `moekit train` model, without it, with every block re-run in the backward ("full") and
with the blocks' matmul outputs kept ("selective"), each in a fresh process (peak RSS growth over
the step, the model, its gradients and the interpreter left out: the activations kept for the
backward and the step's temporaries).

    PYTHONPATH=src python benchmarks/ac_memory.py [--batch 16] [--seq 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(mode: str, batch: int, seq: int, threads: int) -> dict:
    import torch

    from moekit.models.lm import MoETransformer
    from moekit.train.run import default_model_config

    torch.set_num_threads(threads)
    cfg = default_model_config()
    cfg.max_seq_len = max(cfg.max_seq_len, seq)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    model.activation_checkpointing = mode
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    for p in model.parameters():  # the gradients' memory is not the activations'
        p.grad = torch.zeros_like(p)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = model(idx[:, :-1], idx[:, 1:])
    (out.loss + out.aux_loss).backward()
    dt = time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    return {"mode": mode, "peak_growth": grown, "step_s": dt, "loss": float(out.loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.seq, args.threads)))
        return
    rows = []
    for mode in ("none", "full", "selective"):
        cmd = [sys.executable, __file__, "--one", mode, "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--threads", str(args.threads)]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))
    base = rows[0]
    shape = f"batch {args.batch} x {args.seq} tokens, {args.threads} threads"
    print(f"default model, {shape}, the first step (gradients allocated before)")
    print("| activation checkpointing | peak memory growth over the step MiB | of none | step s | of none | loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['peak_growth'] / 2**20:.0f} | {r['peak_growth'] / base['peak_growth']:.2f} | "
            f"{r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} | {r['loss']:.6f} |"
        )


if __name__ == "__main__":
    main()
