"""Where a MoE training step spends the time its dense twin does not: the PyTorch profiler's
self CPU time per ATen op, one eager training step (forward, backward, AdamW) of the default
``moekit train`` model and of its dense twin (equal active parameters), side by side, sorted by
the difference. Op counts are exact; times carry the profiler's own per-op overhead, so they
overstate small ops: read the ratio of totals next to an unprofiled run (benchmarks/lm_speed.py).

    PYTHONPATH=src python benchmarks/train_profile.py                 # 16 x 128 tokens, 1 thread
    PYTHONPATH=src python benchmarks/train_profile.py --rows 40 --reps 5 --markdown out.md
"""

from __future__ import annotations

import argparse
import datetime

import torch
from torch.profiler import ProfilerActivity, profile

from moekit.models import MoETransformer
from moekit.train.run import default_model_config
from report import cpu_name, emit, write_markdown_to


def profile_steps(cfg, batch: int, seq: int, warmup: int, reps: int) -> dict[str, tuple[int, float]]:
    """op name -> (calls per step, self CPU ms per step, mean over ``reps`` profiled steps)."""
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    y = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step() -> None:
        out = model(x, y)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    ops: dict[str, tuple[int, float]] = {}
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        for e in prof.key_averages():
            _, ms = ops.get(e.key, (0, 0.0))
            ops[e.key] = (e.count, ms + e.self_cpu_time_total / 1e3 / reps)
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25, help="ops listed, largest difference first")
    ap.add_argument("--markdown", default=None, help="also append the table to this file")
    args = ap.parse_args()
    write_markdown_to(args.markdown)
    torch.set_num_threads(args.threads)
    cfg = default_model_config()
    moe = profile_steps(cfg, args.batch, args.seq, args.warmup, args.reps)
    dense = profile_steps(cfg.dense_twin(), args.batch, args.seq, args.warmup, args.reps)
    emit(f"## One training step, MoE vs dense twin, per ATen op ({datetime.date.today()})")
    emit()
    emit(
        f"{cpu_name()} · {args.threads} thread(s) · torch {torch.__version__} · default `moekit train` model, "
        f"{args.batch} x {args.seq} tokens · self CPU ms per step, mean of {args.reps} profiled steps"
    )
    emit()
    emit("| op | MoE calls | MoE ms | dense calls | dense ms | MoE - dense ms |")
    emit("|---|---|---|---|---|---|")
    keys = sorted(set(moe) | set(dense), key=lambda k: -(moe.get(k, (0, 0.0))[1] - dense.get(k, (0, 0.0))[1]))
    for k in keys[: args.rows]:
        (mc, mt), (dc, dt) = moe.get(k, (0, 0.0)), dense.get(k, (0, 0.0))
        emit(f"| `{k}` | {mc} | {mt:.1f} | {dc} | {dt:.1f} | {mt - dt:+.1f} |")
    total_moe, total_dense = sum(t for _, t in moe.values()), sum(t for _, t in dense.values())
    calls_moe = sum(c for k, (c, _) in moe.items() if k.startswith("aten::"))
    calls_dense = sum(c for k, (c, _) in dense.items() if k.startswith("aten::"))
    emit()
    emit(
        f"Total self CPU: MoE {total_moe:.0f} ms, dense {total_dense:.0f} ms "
        f"(dense / MoE {total_dense / total_moe:.2f}); "
        f"ATen calls per step: MoE {calls_moe}, dense {calls_dense}."
    )


if __name__ == "__main__":
    main()
