"""Expert-parallel dispatch overhead of one MoE layer on CPU (gloo), against one process.

What it measures, for one ``moekit.MoE`` layer with T tokens *per rank* (weak scaling: every rank
does the same expert work as the one-process baseline, so an ideal EP step takes as long as EP=1):

1. Bytes each rank sends to *other* ranks per local token, per training step (forward, backward,
   gradient sync), from the split sizes of the actual calls:
   - row all-to-alls: rows sent to other ranks x D x element size, dispatch and combine, forward
     and backward (the backward sends the row gradients the same way back);
   - the count exchange (one ``all_to_all_single`` of E int64s: E/P of them to each peer);
   - the routing-statistics all-reduces (one float + one int64 per layer per forward), counted
     as a ring all-reduce, 2(P-1)/P x payload. FSDP's parameter all-gathers and gradient
     reduce-scatters run inside torch, not through the metered calls; for this layer they carry
     only the router's E x D weights (the experts are sharded by EP and not replicated).
   - with a capacity factor, the routing all-gathers (``gather_rows``): (P-1) x payload.
   Also the fraction of dispatched rows whose expert lives on the sending rank ("local"): a
   random router is near-balanced, so it is about 1/EP.
2. Time of a training step (forward + backward, FSDP reducing gradients in it): the total, the time spent
   inside the collectives the library calls (``all_to_all_single``, ``all_reduce``,
   ``all_gather``, timed by a stand-in for ``torch.distributed`` installed in
   ``moekit.parallel.dispatch`` and ``moekit.parallel.stats`` by this script only; library code is unchanged), and the
   rest ("compute", which includes the EP-only permutations). Time inside a collective includes
   waiting for the slower peer. ``dist.barrier()`` before each step; median over ``--reps``
   steps after ``--warmup``; per step the mean over ranks. For scale, the per-call floor of a
   small collective: the median of 50 back-to-back 8-byte all-reduces after the steps.
3. The same with a capacity factor (default 1.25), which adds the routing all-gathers.

Real processes: ``torch.multiprocessing.start_processes(start_method="spawn")``, a gloo group
from a ``file://`` store (TCP over loopback), one torch thread per rank. EP=1 runs in one spawned
process without a process group (the baseline); EP=P runs P processes with
``apply_expert_parallel(model, expert_parallel=P)`` (statistics="global", world = EP, no DP).
Random inputs (different per rank), random (untrained) router, same weights on every rank.

On a 2-core machine EP=2 already fills the cores (plus gloo's helper threads); ``--ep 4``
oversubscribes them, so its times say little. Byte counts are exact either way.

    PYTHONPATH=src python benchmarks/ep_dispatch.py                  # EP=1 vs EP=2, ~15 s on 2 cores
    PYTHONPATH=src python benchmarks/ep_dispatch.py --ep 2 4 --reps 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from report import cpu_name  # benchmarks/report.py

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROW_KEYS = ("fwd.rows", "bwd.rows")  # the token-row all-to-alls; every other key is a "small" collective
BYTE_COLUMNS = [  # (key, table header)
    ("fwd.rows", "a2a fwd"),
    ("bwd.rows", "a2a bwd"),
    ("fwd.counts", "counts"),
    ("fwd.all_reduce", "stats all-reduce"),
    ("fwd.all_gather", "routing gather"),
]


# ---------------------------------------------------------------------------- measuring collectives
class CommMeter:
    """Stands in for ``torch.distributed`` inside ``moekit.parallel.dispatch`` and ``moekit.parallel.stats``: the three
    collectives the layer uses are timed and their bytes sent to other ranks counted, under the
    key ``"<phase>.<kind>"``; everything else is the real module. Records only while ``phase``
    is set (``"fwd"`` or ``"bwd"``)."""

    def __init__(self, real):
        self._real = real
        self.phase = None
        self._next_rows_is_dispatch = False
        self.reset()

    def __getattr__(self, name):  # everything not wrapped: the real torch.distributed
        return getattr(self._real, name)

    def reset(self) -> None:
        self.secs = defaultdict(float)
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)
        self.rows_local = 0  # dispatched rows whose expert is on this rank (forward dispatch only)
        self.rows_dispatched = 0

    def _record(self, kind, nbytes, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if self.phase is not None:
                key = f"{self.phase}.{kind}"
                self.secs[key] += time.perf_counter() - t0
                self.bytes[key] += int(nbytes)
                self.calls[key] += 1

    def all_to_all_single(
        self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        P, me = self._real.get_world_size(group), self._real.get_rank(group)
        splits_P = list(input_split_sizes) if input_split_sizes else [input.shape[0] // P] * P
        row_bytes = math.prod(input.shape[1:]) * input.element_size()
        remote_rows = sum(splits_P) - splits_P[me]
        if input.dim() == 1:  # the count exchange: E int64s, E/P to every rank
            kind = "counts"
            self._next_rows_is_dispatch = True
        else:
            kind = "rows"
            if self.phase == "fwd" and self._next_rows_is_dispatch:  # dispatch follows the count exchange
                self.rows_local += splits_P[me]
                self.rows_dispatched += sum(splits_P)
            self._next_rows_is_dispatch = False
        return self._record(
            kind,
            remote_rows * row_bytes,
            self._real.all_to_all_single,
            output,
            input,
            output_split_sizes,
            input_split_sizes,
            group=group,
            async_op=async_op,
        )

    def all_reduce(self, tensor, *args, **kwargs):
        P = self._real.get_world_size(kwargs.get("group"))
        nbytes = 2 * (P - 1) / P * tensor.numel() * tensor.element_size()  # ring all-reduce, per rank
        return self._record("all_reduce", nbytes, self._real.all_reduce, tensor, *args, **kwargs)

    def all_gather(self, tensor_list, tensor, *args, **kwargs):
        P = len(tensor_list)
        return self._record(
            "all_gather",
            (P - 1) * tensor.numel() * tensor.element_size(),
            self._real.all_gather,
            tensor_list,
            tensor,
            *args,
            **kwargs,
        )


# ---------------------------------------------------------------------------- one process / rank
def worker(rank: int, world: int, store: str, opts: dict, out_path: str) -> None:
    """Time ``opts["reps"]`` training steps of one MoE layer for each capacity factor; rank 0
    writes every rank's records to ``out_path`` (JSON)."""
    torch.set_num_threads(1)
    import moekit.parallel.dispatch as dispatch_module
    import moekit.parallel.stats as stats_module
    from moekit import MoE, MoEConfig
    from moekit.parallel import apply_expert_parallel

    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
    meter = CommMeter(dist)
    dispatch_module.dist = stats_module.dist = meter  # this process only: the layer's collectives go through the meter
    T, D, F_, E, K = opts["tokens"], opts["dim"], opts["hidden"], opts["experts"], opts["top_k"]
    dtype = DTYPES[opts["dtype"]]
    gen = torch.Generator().manual_seed(opts["seed"] + 1000 * (rank + 1))  # different tokens on every rank
    x_TD = torch.randn(T, D, generator=gen).to(dtype).requires_grad_()
    tgt_TD = torch.randn(T, D, generator=gen).to(dtype)

    records = []
    for cf in opts["capacity_factors"]:
        torch.manual_seed(opts["seed"])  # the same model on every rank
        moe = MoE(
            MoEConfig(
                dim=D,
                hidden_dim=F_,
                num_experts=E,
                top_k=K,
                expert="swiglu",
                backend=opts["backend"],
                capacity_factor=cf,
            )
        ).to(dtype)
        if world > 1:
            apply_expert_parallel(moe, expert_parallel=world)
        steps = []
        for i in range(opts["warmup"] + opts["reps"]):
            moe.zero_grad(set_to_none=True)
            x_TD.grad = None
            meter.reset()
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            meter.phase = "fwd"
            res = moe(x_TD)
            loss = (res.out * tgt_TD).sum() / T + res.aux_loss
            t1 = time.perf_counter()
            meter.phase = "bwd"
            loss.backward()
            t2 = time.perf_counter()
            meter.phase = None
            if i >= opts["warmup"]:
                steps.append({"step": t2 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "comm": dict(meter.secs)})
        kept = res.stats["tokens_per_expert"].sum().item()  # global (all ranks) kept slots
        records.append(
            {
                "capacity_factor": cf,
                "steps": steps,
                "bytes": dict(meter.bytes),  # routing is the same every step
                "calls": dict(meter.calls),
                "rows_local": meter.rows_local,
                "rows_dispatched": meter.rows_dispatched,
                "kept_slots": kept,
                "dropped_fraction": float(res.stats["dropped_fraction"]),
            }
        )

    if world > 1:
        records.append({"latency_s": latency_floor()})
        per_rank = [None] * world
        dist.all_gather_object(per_rank, records)
        dist.barrier()
        dist.destroy_process_group()
    else:
        per_rank = [records]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(per_rank, f)


def latency_floor(calls: int = 50) -> float:
    """Median seconds of one 8-byte all-reduce, back to back after a barrier: the per-call cost of a
    collective on this machine when no rank is late."""
    t_1 = torch.zeros(1, dtype=torch.float64)
    dist.barrier()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        dist.all_reduce(t_1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_ep(ep: int, opts: dict) -> list:
    """Spawn ``ep`` processes (one for the baseline) and return their per-rank records."""
    with tempfile.TemporaryDirectory(prefix="ep_dispatch-") as tmpdir:
        store, out_path = os.path.join(tmpdir, "store"), os.path.join(tmpdir, "out.json")
        tmp.start_processes(worker, args=(ep, store, opts, out_path), nprocs=ep, join=True, start_method="spawn")
        with open(out_path) as f:
            return json.load(f)


# ---------------------------------------------------------------------------- summary and report
def per_step(recs: list[dict], fn) -> list[float]:
    """``fn(step record)`` for every timed step, averaged over the ranks' records."""
    return [statistics.fmean(fn(r["steps"][s]) for r in recs) for s in range(len(recs[0]["steps"]))]


def summarise(ep: int, per_rank: list, opts: dict) -> list[dict]:
    """One row per capacity factor: bytes per token (sum over ranks / all ranks' tokens) and
    medians over steps of the per-step mean over ranks."""
    T, tokens = opts["tokens"], opts["tokens"] * ep
    med = statistics.median
    rows = []
    for j, cf in enumerate(opts["capacity_factors"]):
        recs = [r[j] for r in per_rank]
        bytes_per_token = {k: sum(r["bytes"].get(k, 0) for r in recs) / tokens for k, _ in BYTE_COLUMNS}
        dispatched = sum(r["rows_dispatched"] for r in recs)
        step = per_step(recs, lambda s: s["step"])
        rows_comm = per_step(recs, lambda s: sum(v for k, v in s["comm"].items() if k in ROW_KEYS))
        other_comm = per_step(recs, lambda s: sum(v for k, v in s["comm"].items() if k not in ROW_KEYS))
        comm_by_key = {k: med(per_step(recs, lambda s, k=k: s["comm"].get(k, 0.0))) * 1e3 for k, _ in BYTE_COLUMNS}
        comm = [a + b for a, b in zip(rows_comm, other_comm)]
        compute = [s - c for s, c in zip(step, comm)]
        rows.append(
            {
                "ep": ep,
                "capacity_factor": cf,
                "tokens_per_rank": T,
                "kept_rows_per_token": recs[0]["kept_slots"] / tokens,
                "dropped_fraction": recs[0]["dropped_fraction"],
                "local_fraction": sum(r["rows_local"] for r in recs) / dispatched if dispatched else 1.0,
                "bytes_per_token": bytes_per_token,
                "total_bytes_per_token": sum(bytes_per_token.values()),
                "step_ms": med(step) * 1e3,
                "rows_comm_ms": med(rows_comm) * 1e3,
                "other_comm_ms": med(other_comm) * 1e3,
                "comm_ms": med(comm) * 1e3,
                "compute_ms": med(compute) * 1e3,
                "comm_share": med([c / s for c, s in zip(comm, step)]),
                "fwd_ms": med(per_step(recs, lambda s: s["fwd"])) * 1e3,
                "calls_by_key": recs[0]["calls"],
                "latency_floor_us": statistics.median(r[-1]["latency_s"] for r in per_rank) * 1e6 if ep > 1 else 0.0,
                "comm_ms_by_key": comm_by_key,
            }
        )
    return rows


def cf_label(cf) -> str:
    return "dropless" if cf is None else f"cf {cf:g}"


def markdown(rows: list[dict]) -> str:
    base = {r["capacity_factor"]: r["step_ms"] for r in rows if r["ep"] == 1}
    head = (
        ["EP", "capacity", "rows/token kept", "local rows"] + [f"{h} B/tok" for _, h in BYTE_COLUMNS] + ["total B/tok"]
    )
    out = [
        "Bytes each rank sends to other ranks per local token per training step (exact):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        b = r["bytes_per_token"]
        cells = (
            [
                str(r["ep"]),
                cf_label(r["capacity_factor"]),
                f"{r['kept_rows_per_token']:.3f}",
                f"{r['local_fraction']:.1%}",
            ]
            + [f"{b[k]:.2f}" for k, _ in BYTE_COLUMNS]
            + [f"{r['total_bytes_per_token']:.2f}"]
        )
        out.append("| " + " | ".join(cells) + " |")
    head = [
        "EP",
        "capacity",
        "step ms",
        "fwd ms",
        "bwd ms",
        "row a2a ms",
        "other comm ms",
        "compute ms",
        "comm share",
        "step / EP=1",
    ]
    out += [
        "",
        "Time of one training step (fwd + bwd), median over steps, mean over ranks (indicative):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        ratio = r["step_ms"] / base[r["capacity_factor"]] if r["capacity_factor"] in base else float("nan")
        cells = [
            str(r["ep"]),
            cf_label(r["capacity_factor"]),
            f"{r['step_ms']:.1f}",
            f"{r['fwd_ms']:.1f}",
            f"{r['step_ms'] - r['fwd_ms']:.1f}",
            f"{r['rows_comm_ms']:.1f}",
            f"{r['other_comm_ms']:.1f}",
            f"{r['compute_ms']:.1f}",
            f"{r['comm_share']:.0%}",
            f"{ratio:.2f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    head = ["EP", "capacity"] + [h for _, h in BYTE_COLUMNS]
    out += [
        "",
        "Time inside each kind of collective, ms per step (median; includes waiting for the slower rank):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        if r["ep"] > 1:
            cells = [str(r["ep"]), cf_label(r["capacity_factor"])] + [
                f"{r['comm_ms_by_key'][k]:.2f}" for k, _ in BYTE_COLUMNS
            ]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def reading(rows: list[dict], opts: dict) -> str:
    """One paragraph of facts generated from the numbers (the interpretation is the reader's)."""
    D, K, T, elt = opts["dim"], opts["top_k"], opts["tokens"], DTYPES[opts["dtype"]].itemsize
    base = {r["capacity_factor"]: r for r in rows if r["ep"] == 1}
    parts = []
    for r in rows:
        if r["ep"] == 1:
            continue
        P, b, calls = r["ep"], r["bytes_per_token"], r["calls_by_key"]
        est = 2 * K * (P - 1) / P * D * elt  # balanced routing: dispatch + combine, one pass
        row_bytes = b["fwd.rows"] + b["bwd.rows"]
        small = r["total_bytes_per_token"] - row_bytes
        n_rows = sum(calls.get(k, 0) for k in ROW_KEYS)
        n_small = sum(v for k, v in calls.items() if k not in ROW_KEYS)
        rate = row_bytes * T / (r["rows_comm_ms"] / 1e3) / 1e9 if r["rows_comm_ms"] else float("nan")
        ref = base.get(r["capacity_factor"])
        parts.append(
            f"EP={P}, {cf_label(r['capacity_factor'])}: {r['local_fraction']:.1%} of dispatched rows stayed local "
            f"(1/EP = {1 / P:.1%})"
            + (f", {r['dropped_fraction']:.2%} of slots dropped" if r["capacity_factor"] is not None else "")
            + f"; the row all-to-alls send {b['fwd.rows']:.0f} B/token forward and {b['bwd.rows']:.0f} B/token "
            "backward "
            f"(balanced estimate 2·K·(P−1)/P·D·{elt} = {est:.0f} B per pass), everything else "
            f"{small:.1f} B/token ({small / r['total_bytes_per_token']:.1%}). Collectives take {r['comm_share']:.0%} "
            f"of the {r['step_ms']:.0f} ms step: {r['rows_comm_ms']:.1f} ms in the {n_rows} row all-to-alls "
            f"(≈{rate:.2f} GB/s sent per rank) and {r['other_comm_ms']:.1f} ms in {n_small} small collectives, whose "
            f"floor is ≈{r['latency_floor_us']:.0f} µs each (8-byte all-reduce back to back); the rest is waiting for "
            f"the slower rank"
            + (
                f". The step is {r['step_ms'] / ref['step_ms']:.2f}× the one-process step, its non-communication part "
                f"{r['compute_ms'] / ref['step_ms']:.2f}× it"
                if ref
                else ""
            )
            + "."
        )
    return " ".join(parts) + (
        " Bytes are exact; times come from processes sharing a small CPU over loopback and are indicative only."
    )


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--ep",
        type=int,
        nargs="+",
        default=[2],
        help="expert-parallel sizes to run besides the EP=1 "
        "baseline (default: 2; more ranks than CPU cores oversubscribes them)",
    )
    ap.add_argument("--tokens", "-T", type=int, default=2048, help="tokens per rank (default 2048)")
    ap.add_argument("--dim", "-D", type=int, default=512, help="model width D (default 512)")
    ap.add_argument("--hidden", "-F", type=int, default=256, help="expert hidden width F (default 256)")
    ap.add_argument("--experts", "-E", type=int, default=16, help="routed experts E (default 16)")
    ap.add_argument("--top-k", "-K", type=int, default=2, help="experts per token K (default 2)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--backend", default="grouped", help="moekit expert backend (default grouped)")
    ap.add_argument(
        "--capacity-factors", default="none,1.25", help="comma list, 'none' = dropless (default: none,1.25)"
    )
    ap.add_argument("--reps", type=int, default=9, help="timed steps; the median is reported (default 9)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the summary rows as JSON")
    args = ap.parse_args(argv)
    args.capacity_factors = [
        None if c.strip().lower() == "none" else float(c) for c in args.capacity_factors.split(",")
    ]
    for p in args.ep:
        if p < 2:
            ap.error(f"--ep sizes must be >= 2 (EP=1 always runs as the baseline); got {p}")
        if args.experts % p:
            ap.error(f"--ep {p} must divide the number of experts {args.experts}")
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not dist.is_available() or not dist.is_gloo_available():
        sys.exit("torch.distributed with gloo is needed")
    opts = {
        k: getattr(args, k)
        for k in (
            "tokens",
            "dim",
            "hidden",
            "experts",
            "top_k",
            "dtype",
            "backend",
            "capacity_factors",
            "reps",
            "warmup",
            "seed",
        )
    }
    cores = os.cpu_count() or 1
    for p in args.ep:
        if p > cores:
            print(
                f"warning: EP={p} runs {p} processes on {cores} CPU cores: oversubscribed, its times are not "
                f"meaningful (bytes are)",
                file=sys.stderr,
            )
    rows = []
    for ep in [1] + sorted(set(args.ep)):
        t0 = time.perf_counter()
        rows += summarise(ep, run_ep(ep, opts), opts)
        print(f"EP={ep}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(
        f"## Expert-parallel dispatch, CPU (gloo): T={args.tokens}/rank D={args.dim} F={args.hidden} E={args.experts} "
        f"K={args.top_k} {args.dtype} swiglu backend={args.backend}\n"
    )
    print(
        f"{datetime.date.today()} · {platform.machine()} ({cpu_name()}), {cores} cores, 1 thread "
        f"per rank · torch {torch.__version__} · gloo over loopback · {args.reps} timed steps after {args.warmup} "
        f"warm-up\n"
    )
    print(markdown(rows))
    print()
    print("Reading: " + reading(rows, opts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
