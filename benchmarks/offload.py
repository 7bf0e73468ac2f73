"""Experts on a memory budget (moekit.store): decode speed, memory and hit rates against the
all-in-memory model, and the cache policies against Belady's optimum on recorded traces.

    PYTHONPATH=src python benchmarks/offload.py prepare --dir /tmp/offload --shape olmoe8
    PYTHONPATH=src python benchmarks/offload.py run --dir /tmp/offload --fracs 1,0.5,0.25,0.125
    PYTHONPATH=src python benchmarks/offload.py policies --run runs/NAME

``prepare`` writes a synthetic checkpoint of the named shape (random weights, fixed seed; never from
a hub); with ``--quantize FMT`` the same weights quantized (``checkpoint-FMT.safetensors``, read
with ``--checkpoint``: the store then holds low-bit experts; the budget is still a fraction of the
float32 experts' bytes, so a quantized store holds more of them). ``run`` measures each setting in a
fresh process (so peak RSS is that setting's): the all-in-memory model as ``moekit generate`` loads
it today (``load_trained``), then the expert store at each fraction of the experts' bytes, each
after dropping the file from the page cache (a cold start). It reports tokens/s of greedy decoding
(prompt excluded), the store's hit rate and bytes read per token, peak RSS with the anonymous /
file-backed split at the end, and the byte-model bound: bytes missed per token / the file's cold
read bandwidth measured in the same run. ``policies`` records each MoE layer's expert accesses while
a trained run decodes and replays them for LRU, LFU and LFRU at budgets of 1/8 and 1/4 of the
experts, next to Belady, and next to "lookahead": a policy told every layer's router ranking on
the current residual stream, calibrated on the trace itself (what the best online guess of each
layer's next call is worth). Random weights route almost uniformly: the policy table needs a
trained run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from moekit.config import LMConfig, MoEConfig
from moekit.models.lm import MoETransformer
from moekit.store import (
    LFRU,
    LFU,
    LRU,
    SafetensorsFiles,
    belady,
    load_run_with_store,
    make_policy,
    pool_trace,
    prefetch_stats,
    record_traces,
    replay,
    store_stats,
)
from moekit.train.checkpoint import load_checkpoint, save_checkpoint

SHAPES = {
    # OLMoE-1B-7B's expert shape at half its width and layers: 0.94 B parameters, 3.0 GiB of fp32 experts
    "olmoe8": dict(dim=1024, n_layers=8, n_heads=16, hidden=512, experts=64, top_k=8),
    "small": dict(dim=256, n_layers=4, n_heads=4, hidden=256, experts=32, top_k=4),
}


def shape_cfg(name: str) -> LMConfig:
    s = SHAPES[name]
    moe = MoEConfig(dim=s["dim"], hidden_dim=s["hidden"], num_experts=s["experts"], top_k=s["top_k"])
    layout = dict(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], max_seq_len=512)
    return LMConfig(vocab_size=4096, moe=moe, **layout)


def prepare(args) -> None:
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = shape_cfg(args.shape)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    name = "checkpoint.safetensors"
    if args.quantize:  # the same weights, quantized (a quantized run's checkpoint: low-bit tensors + plan)
        from moekit.quantize import lowbit_plan, quantize_model

        quantize_model(model, args.quantize)
        name = f"checkpoint-{args.quantize.replace(':', '-')}.safetensors"
        save_checkpoint(out / name, model, meta={"lowbit": lowbit_plan(model)})
    else:
        save_checkpoint(out / name, model)
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    print(f"wrote {out / name} ({(out / name).stat().st_size / 2**30:.2f} GiB)")


def _status() -> dict:
    fields = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "RssAnon", "RssFile"):
            fields[k] = int(v.split()[0]) * 1024
    return fields


def decode(args) -> None:
    """One setting, in this process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    d = Path(args.dir)
    cfg = LMConfig.from_dict(json.loads((d / "config.json").read_text()))
    path = d / args.checkpoint
    SafetensorsFiles.of(path).drop_cache()
    t0 = time.perf_counter()
    if args.frac >= 1.0 and not args.store:
        model = MoETransformer(cfg)
        load_checkpoint(path, model)
        model.eval()
        budget = None
    else:
        m = cfg.moe
        expert_bytes = 3 * m.dim * m.hidden_dim * 4
        budget = int(args.frac * expert_bytes * m.num_experts * cfg.n_layers)
        model = load_run_with_store(path, cfg, budget, args.policy, prefetch=args.prefetch)
    load_s = time.perf_counter() - t0
    after_load = _status()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=g)
    with torch.no_grad():
        model.generate(prompt, 1, temperature=0.0)  # the prompt (and the first reads)
        before = store_stats(model)
        t0 = time.perf_counter()
        model.generate(prompt, args.new_tokens, temperature=0.0)
        secs = time.perf_counter() - t0
    after = store_stats(model)
    misses = after.misses - before.misses
    print(
        json.dumps(
            dict(
                frac=args.frac,
                store=budget is not None,
                policy=(args.policy + (" + prefetch" if args.prefetch else "")) if budget is not None else None,
                tok_s=args.new_tokens / secs,
                load_s=load_s,
                hit_rate=(after.hits - before.hits) / max(1, after.hits - before.hits + misses),
                bytes_per_token=(after.bytes_read - before.bytes_read) / args.new_tokens,
                read_s=after.read_s - before.read_s,
                recall=prefetch_stats(model).recall if args.prefetch and budget is not None else None,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                load_peak=after_load.get("VmHWM", 0),
                anon=_status().get("RssAnon", 0),
                file=_status().get("RssFile", 0),
            )
        ),
        flush=True,
    )


def read_bandwidth(path: Path, nbytes: int = 512 * 2**20) -> float:
    """Cold sequential read bandwidth of ``path`` (bytes/s) through the store's reader."""
    files = SafetensorsFiles.of(path)
    files.drop_cache()
    name = max(files.entries, key=lambda n: files.entries[n].shape[0] * files.entries[n].row_bytes)
    e = files.entries[name]
    rows = max(1, min(e.shape[0], nbytes // e.row_bytes))
    buf = torch.empty((rows, *e.shape[1:]), dtype=e.dtype)
    t0 = time.perf_counter()
    files.read_rows(name, buf, 0)
    return buf.nbytes / (time.perf_counter() - t0)


def _capped(cmd: list[str], cap_bytes: int) -> list[str]:
    """``cmd`` run inside a fresh cgroup-v1 memory group limited to ``cap_bytes`` (page cache
    included, as a smaller machine would count it); needs a writable memory controller."""
    group = Path("/sys/fs/cgroup/memory") / f"moekit-offload-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]


def run(args) -> None:
    d = Path(args.dir)
    bw = read_bandwidth(d / args.checkpoint)
    rows = []
    settings = [(1.0, False)] if args.checkpoint == "checkpoint.safetensors" else []
    settings += [(float(f), True) for f in args.fracs.split(",")]
    for frac, store in settings:
        cmd = [sys.executable, __file__, "decode", "--dir", str(d), "--frac", str(frac), "--policy", args.policy]
        cmd += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)] + (["--store"] if store else [])
        cmd += ["--prefetch"] if store and args.prefetch else []
        cmd += ["--checkpoint", args.checkpoint]
        if args.cap_gib:
            cmd = _capped(cmd, int(args.cap_gib * 2**30))
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
        if res.returncode:
            last = res.stderr.strip().splitlines()[-1][:200] if res.stderr.strip() else ""
            killed = res.returncode in (-9, 137)
            why = f"killed (exit {res.returncode}) under the {args.cap_gib} GiB cap" if killed else last
            rows.append(dict(frac=frac, store=store, error=why))
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    gib = 2**30
    cap = f", memory cap {args.cap_gib} GiB (cgroup v1, page cache included)" if args.cap_gib else ""
    print(f"cold read bandwidth {bw / 1e9:.2f} GB/s; {args.new_tokens} greedy tokens, {args.threads} thread(s){cap}")
    print(
        "| setting | tok/s | hit rate | prefetch recall | MiB read / token | byte-model bound tok/s | of bound "
        "| load s | peak RSS GiB (load) | anon / file GiB at end |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = f"store {r['frac']:g} of experts ({r.get('policy')})" if r["store"] else "all in memory (load_trained)"
        if "error" in r:
            print(f"| {name} | FAIL: {r['error']} |")
            continue
        per_tok = r["bytes_per_token"]
        bound = bw / per_tok if per_tok else float("inf")
        of = f"{r['tok_s'] / bound:.2f}" if per_tok else "-"
        print(
            f"| {name} | {r['tok_s']:.2f} | {r['hit_rate']:.1%} | "
            + (f"{r['recall']:.1%}" if r.get("recall") is not None else "-")
            + f" | {per_tok / 2**20:.1f} | "
            f"{bound:.2f} | {of} | {r['load_s']:.1f} | {r['peak_rss'] / gib:.2f} ({r['load_peak'] / gib:.2f}) | "
            f"{r['anon'] / gib:.2f} / {r['file'] / gib:.2f} |"
        )


def policies(args) -> None:
    """Hit rates of each policy and Belady's on the recorded traces of a trained run."""
    from moekit.generate import load_run_model

    torch.set_num_threads(args.threads)
    model, tok = load_run_model(args.run, expert_memory=10**12)  # every expert resident: the trace only
    record_traces(model)
    ranks = _record_lookahead(model)
    g = torch.Generator().manual_seed(0)
    prompts = ["def ", "The ", "import ", "class ", "If the", "    return ", "# ", "A "]
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok.encode(p)])
            model.generate(ids, args.new_tokens, temperature=0.8, top_p=0.95, generator=g)
    layers = [m.experts for m in model.moe_layers]
    E, L = layers[0].num_experts, len(layers)
    shared = pool_trace(model)
    print(f"{args.run}: {L} MoE layers x {E} experts, {len(prompts)} prompts x {args.new_tokens} tokens")
    odds, K = _lookahead_odds(shared, ranks, L), model.moe_layers[0].cfg.top_k
    print(
        "chosen at a layer's next call, d calls later, of its router's top-1 / top-k on this call's residual: "
        + ", ".join(
            f"d={d}: {odds[(d, 0)]:.0%} / {sum(odds[(d, r)] for r in range(K)) / K:.0%}" for d in range(1, L + 1)
        )
    )
    print("| pool | slots | LRU | LFU | LFRU | lookahead | Belady |")
    print("|---|---|---|---|---|---|---|")
    for frac in (8, 4):
        for kind in ("per layer", "shared"):
            slots = max(1, E // frac) if kind == "per layer" else max(1, L * E // frac)
            traces = [ex.stats.trace for ex in layers] if kind == "per layer" else [shared]
            rates = {}
            for name, make in (("LRU", LRU), ("LFU", LFU), ("LFRU", LFRU)):
                policy = (lambda: make_policy("lfru", L)) if (name == "LFRU" and kind == "shared") else make
                rates[name] = _rate([replay(t, slots, policy()) for t in traces])
            rates["Belady"] = _rate([belady(t, slots) for t in traces])
            look = f"{_rate([_replay_lookahead(shared, ranks, slots, L)]):.1%}" if kind == "shared" else "-"
            where = f"{slots} per layer" if kind == "per layer" else f"{slots} shared by {L} layers"
            print(
                f"| 1/{frac} of experts, {kind} | {where} | "
                + " | ".join(f"{rates[n]:.1%}" for n in ("LRU", "LFU", "LFRU"))
                + f" | {look} | {rates['Belady']:.1%} |"
            )


def _record_lookahead(model) -> list[list[list[int]]]:
    """Per MoE call (model order, as :func:`pool_trace`): every MoE layer's router applied to this
    call's residual stream (its last token, normalised by that layer's own norm), as each expert's
    rank: what an online policy could know of every layer's next call."""
    from moekit.layer.scope import LOCAL_SCOPE

    blocks = [b for b in model.blocks if b.ffn in model.moe_layers]
    ranks: list[list[list[int]]] = []

    def hook(_module, args):
        x_1D = args[0].detach().reshape(-1, args[0].shape[-1])[-1:]
        call = []
        for b in blocks:
            E = b.ffn.cfg.num_experts
            order = b.ffn.router(b.ffn_norm.forward(x_1D), E, None, scope=LOCAL_SCOPE).experts_TK[0].tolist()
            rank = [0] * E
            for r, e in enumerate(order):
                rank[e] = r
            call.append(rank)
        ranks.append(call)

    for b in blocks:
        b.ffn_norm.register_forward_pre_hook(hook)
    return ranks


def _lookahead_odds(trace, ranks, layers: int) -> dict[tuple[int, int], float]:
    """How often an expert the routers rank ``r`` on a call's residual stream is chosen at its
    layer's next call ``d`` calls later: {(d, r): fraction}, counted on the trace."""
    from collections import defaultdict

    seen: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    for i in range(len(trace)):
        for d in range(1, layers + 1):
            if i + d < len(trace) and trace[i + d]:
                m, chosen = trace[i + d][0][0], {e for _, e in trace[i + d]}
                for e, r in enumerate(ranks[i][m]):
                    seen[(d, r)][0] += e in chosen
                    seen[(d, r)][1] += 1
    return {k: hit / n for k, (hit, n) in seen.items()}


def _replay_lookahead(trace, ranks, slots: int, layers: int) -> tuple[int, int]:
    """(hits, misses) of a policy that evicts the resident expert least likely to be chosen at its
    layer's next call per layer call until then, the likelihood of each (rank, calls away) taken
    from this very trace (:func:`_lookahead_odds`: an optimistic calibration)."""
    from moekit.store.policies import _chunks

    p = _lookahead_odds(trace, ranks, layers)
    resident: set = set()
    hits = misses = 0
    for i, call in enumerate(trace):
        here = call[0][0] if call else 0

        def value(k, i=i, here=here):
            d = (k[0] - here) % layers or layers
            return p.get((d, ranks[i][k[0]][k[1]]), 0.0) / d

        for chunk in _chunks(sorted(set(call)), slots):  # as replay serves a call larger than the pool
            pinned = set(chunk)
            for k in chunk:
                if k in resident:
                    hits += 1
                    continue
                misses += 1
                if len(resident) >= slots:
                    resident.discard(min(resident - pinned, key=value))
                resident.add(k)
    return hits, misses


def _rate(counts: list[tuple[int, int]]) -> float:
    hits = sum(h for h, _ in counts)
    return hits / max(1, sum(h + m for h, m in counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dir", required=True)
    p.add_argument("--shape", default="olmoe8", choices=SHAPES)
    p.add_argument("--quantize", default=None, help="also quantize it (int8, int4, ...): checkpoint-FMT.safetensors")
    p.set_defaults(fn=prepare)
    for name, fn in (("decode", decode), ("run", run)):
        q = sub.add_parser(name)
        q.add_argument("--dir", required=True)
        q.add_argument("--policy", default="lfru")
        q.add_argument("--new-tokens", type=int, default=32)
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--prefetch", action="store_true", help="read each next layer's guessed experts ahead")
        q.add_argument("--checkpoint", default="checkpoint.safetensors", help="a file of --dir (a quantized one too)")
        if name == "decode":
            q.add_argument("--frac", type=float, required=True)
            q.add_argument("--store", action="store_true")
        else:
            q.add_argument("--fracs", default="1,0.5,0.25,0.125")
            q.add_argument("--cap-gib", type=float, default=0, help="run each setting under this memory cap")
        q.set_defaults(fn=fn)
    q = sub.add_parser("policies")
    q.add_argument("--run", required=True)
    q.add_argument("--new-tokens", type=int, default=200)
    q.add_argument("--threads", type=int, default=1)
    q.set_defaults(fn=policies)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
