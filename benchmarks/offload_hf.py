"""A Hugging Face folder of OLMoE-1B-7B's published shape under memory caps: moekit's expert store
against the all-in-memory load, each setting in a fresh process inside a cgroup-v1 memory group
(page cache included, as a smaller machine counts it).

    PYTHONPATH=src python benchmarks/offload_hf.py prepare --dir /tmp/olmoe-1b-7b
    PYTHONPATH=src python benchmarks/offload_hf.py run --dir /tmp/olmoe-1b-7b \\
        --settings all@16,store:1GiB@4,store:1GiB@8,store:4GiB@8

``prepare`` writes random bf16 weights (fixed seed; never from a hub) in the hub's layout: per
expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``, 4 shards and an index, 16 layers of width
2048, 64 experts of 1024, top-8, vocabulary 50304: 6.9 B parameters, 12.9 GiB. ``run`` decodes
the same prompt greedily in each setting (``all``: ``load_hf`` with every expert in memory;
``store:SIZE``: ``load_hf(expert_memory=SIZE)``, ``store:SIZE/fp16``: its slots in fp16 and the
checkpoint's (out, in) layout (``expert_dtype``); ``accelerate``: transformers' ``from_pretrained``
with ``device_map="auto"``, 2 GiB of CPU memory and a disk offload folder; ``@CAP``: the memory
cap in GiB) and reports
tokens/s (prompt excluded), load time, peak RSS (anonymous / file-backed at the end), the store's
hit rate and bytes read per token, the byte-model bound (bytes missed per token / the shards'
cold read bandwidth, measured in the same run), and whether the greedy tokens equal the first
setting's.
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

from moekit.store import SafetensorsFiles, parse_bytes, store_stats
from offload import _capped, _status  # the same memory groups and RSS fields (benchmarks/ is on sys.path)

SHAPES = {
    # allenai/OLMoE-1B-7B-0924's config: 16 layers, width 2048, 64 experts of 1024, top-8
    "olmoe-1b-7b": dict(layers=16, dim=2048, ffn=1024, experts=64, top_k=8, heads=16, vocab=50304, shards=4),
    "tiny": dict(layers=4, dim=256, ffn=128, experts=16, top_k=4, heads=4, vocab=1000, shards=2),
}


def hf_config(s: dict) -> dict:
    return {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "hidden_size": s["dim"],
        "intermediate_size": s["ffn"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["heads"],
        "num_experts": s["experts"],
        "num_experts_per_tok": s["top_k"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "norm_topk_prob": False,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "clip_qkv": None,
        "router_aux_loss_coef": 0.01,
        "output_router_logits": False,
        "torch_dtype": "bfloat16",
        "pad_token_id": 1,
        "eos_token_id": 50279,
    }


def _layer_tensors(i: int, s: dict, g: torch.Generator) -> dict:
    D, F, E = s["dim"], s["ffn"], s["experts"]
    p = f"model.layers.{i}."

    def w(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)

    out = {p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16)}
    out[p + "post_attention_layernorm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    for n in "qkvo":
        out[p + f"self_attn.{n}_proj.weight"] = w(D, D)
    out[p + "self_attn.q_norm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    out[p + "self_attn.k_norm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    out[p + "mlp.gate.weight"] = w(E, D)
    for e in range(E):
        out[p + f"mlp.experts.{e}.gate_proj.weight"] = w(F, D)
        out[p + f"mlp.experts.{e}.up_proj.weight"] = w(F, D)
        out[p + f"mlp.experts.{e}.down_proj.weight"] = w(D, F)
    return out


def prepare(args) -> None:
    from safetensors.torch import save_file

    s, out = SHAPES[args.shape], Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(s), indent=2))
    g = torch.Generator().manual_seed(0)
    n, per = s["shards"], -(-s["layers"] // s["shards"])
    weight_map, total = {}, 0
    for k in range(n):
        shard: dict = {}
        if k == 0:
            shard["model.embed_tokens.weight"] = torch.empty(s["vocab"], s["dim"], dtype=torch.bfloat16).normal_(
                0.0, 0.02, generator=g
            )
        for i in range(k * per, min(s["layers"], (k + 1) * per)):
            shard.update(_layer_tensors(i, s, g))
        if k == n - 1:
            shard["model.norm.weight"] = torch.ones(s["dim"], dtype=torch.bfloat16)
            shard["lm_head.weight"] = torch.empty(s["vocab"], s["dim"], dtype=torch.bfloat16).normal_(
                0.0, 0.02, generator=g
            )
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in shard})
        total += sum(t.nbytes for t in shard.values())
        print(f"wrote {name} ({sum(t.nbytes for t in shard.values()) / 2**30:.2f} GiB)", flush=True)
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    print(f"{out}: {total / 2**30:.2f} GiB in {n} shards")


def decode(args) -> None:
    """One setting in this process; prints one JSON line."""
    from moekit.interop import load_hf

    torch.set_num_threads(args.threads)
    folder = Path(args.dir)
    files = SafetensorsFiles.of(folder)
    files.drop_cache()  # a cold start
    if args.setting == "accelerate":
        return decode_accelerate(args, folder)
    size, _, fmt = ("" if args.setting == "all" else args.setting.split(":", 1)[1]).partition("/")
    budget = parse_bytes(size) if size else None
    t0 = time.perf_counter()
    model = load_hf(folder, expert_memory=budget, expert_policy=args.policy, expert_dtype=fmt or None)
    load_s = time.perf_counter() - t0
    load_peak = _status().get("VmHWM", 0)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(prompt, 1, temperature=0.0)  # the prompt and the first reads
        before = store_stats(model)
        t0 = time.perf_counter()
        out = model.generate(prompt, args.new_tokens, temperature=0.0)
        secs = time.perf_counter() - t0
    after = store_stats(model)
    hits, misses = after.hits - before.hits, after.misses - before.misses
    row = dict(
        setting=args.setting,
        tok_s=args.new_tokens / secs,
        load_s=load_s,
        tokens=out[0, prompt.shape[1] :].tolist(),
        hit_rate=hits / max(1, hits + misses),
        bytes_per_token=(after.bytes_read - before.bytes_read) / args.new_tokens,
        read_s_per_token=(after.read_s - before.read_s) / args.new_tokens,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        load_peak=load_peak,
        anon=_status().get("RssAnon", 0),
        file=_status().get("RssFile", 0),
    )
    print(json.dumps(row), flush=True)


def decode_accelerate(args, folder: Path) -> None:
    """The PyTorch user's tool for the same job: transformers + accelerate with ``device_map="auto"``,
    2 GiB of CPU memory for weights and the rest offloaded to a disk folder (the issue's anchor)."""
    import tempfile

    import transformers

    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(dir="/tmp") as offload:
        t0 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": "2GiB"}, offload_folder=offload
        )
        load_s = time.perf_counter() - t0
        load_peak = _status().get("VmHWM", 0)
        n = args.new_tokens
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=1, do_sample=False)
            t0 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            secs = time.perf_counter() - t0
    row = dict(
        setting="accelerate",
        tok_s=n / secs,
        load_s=load_s,
        tokens=out[0, prompt.shape[1] :].tolist(),
        hit_rate=0.0,
        bytes_per_token=0.0,
        read_s_per_token=0.0,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        load_peak=load_peak,
        anon=_status().get("RssAnon", 0),
        file=_status().get("RssFile", 0),
    )
    print(json.dumps(row), flush=True)


def read_bandwidth(folder: Path, threads: int = 1, nbytes: int = 1 << 30) -> float:
    """Cold read bandwidth of the shards through the store's reader, in expert-sized reads issued
    by ``threads`` threads at once (the store reads a call's misses with READERS threads)."""
    from concurrent.futures import ThreadPoolExecutor

    files = SafetensorsFiles.of(folder)
    files.drop_cache()
    names = [n for n in files.entries if ".experts." in n][threads::7]
    e = files.entries[names[0]]
    names = names[: max(1, nbytes // (e.row_bytes * e.shape[0]))]
    bufs = [torch.empty(files.entries[n].shape, dtype=files.entries[n].dtype) for n in names]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: files.read_rows(names[i], bufs[i]), range(len(names))))
    return sum(b.nbytes for b in bufs) / (time.perf_counter() - t0)


def run(args) -> None:
    from moekit.store.experts import READERS

    folder = Path(args.dir)
    bw1 = read_bandwidth(folder, 1)
    bw = read_bandwidth(folder, READERS)
    rows = []
    for item in args.settings.split(","):
        setting, _, cap = item.partition("@")
        cmd = [sys.executable, __file__, "decode", "--dir", str(folder), "--setting", setting]
        cmd += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--policy", args.policy]
        if cap:
            cmd = _capped(cmd, int(float(cap) * 2**30))
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
        wall = time.perf_counter() - t0
        if res.returncode:
            last = res.stderr.strip().splitlines()[-1][:160] if res.stderr.strip() else ""
            why = f"killed (exit {res.returncode}) after {wall:.0f} s" if res.returncode in (-9, 137) else last
            rows.append(dict(setting=setting, cap=cap, error=why))
        else:
            rows.append({**json.loads(res.stdout.strip().splitlines()[-1]), "cap": cap})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ref = next((r["tokens"] for r in rows if "tokens" in r), None)
    gib = 2**30
    print(
        f"{folder}: cold read bandwidth {bw / 1e9:.2f} GB/s with {READERS} reads at once (the bound's), "
        f"{bw1 / 1e9:.2f} GB/s one at a time; {args.new_tokens} greedy tokens, "
        f"{args.threads} thread(s); caps: cgroup v1 memory.limit_in_bytes (page cache included)"
    )
    print(
        "| setting | cap GiB | tok/s | same tokens | hit rate | MiB read / token | byte-model bound tok/s | of bound "
        "| load s | peak RSS GiB (load) | anon / file GiB at end |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = {"all": "all in memory (load_hf)", "accelerate": "transformers + accelerate disk offload"}.get(
            r["setting"], f"expert store {r['setting'].split(':', 1)[-1]}"
        )
        if "error" in r:
            print(f"| {name} | {r['cap'] or '-'} | FAIL: {r['error']} |")
            continue
        per_tok = r["bytes_per_token"]
        bound = bw / per_tok if per_tok else float("inf")
        same = r["tokens"] == ref[: len(r["tokens"])]
        print(
            f"| {name} | {r['cap'] or '-'} | {r['tok_s']:.2f} | {'yes' if same else 'NO'} | "
            + (
                f"{r['hit_rate']:.1%} | {per_tok / 2**20:.0f} | {bound:.2f} | {r['tok_s'] / bound:.2f}"
                if per_tok
                else "- | 0 | - | -"
            )
            + f" | {r['load_s']:.1f} | {r['peak_rss'] / gib:.2f} ({r['load_peak'] / gib:.2f}) | "
            f"{r['anon'] / gib:.2f} / {r['file'] / gib:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dir", required=True)
    p.add_argument("--shape", default="olmoe-1b-7b", choices=SHAPES)
    p.set_defaults(fn=prepare)
    for name, fn in (("decode", decode), ("run", run)):
        q = sub.add_parser(name)
        q.add_argument("--dir", required=True)
        q.add_argument("--policy", default="lfru")
        q.add_argument("--new-tokens", type=int, default=16)
        q.add_argument("--threads", type=int, default=2)
        if name == "decode":
            q.add_argument("--setting", required=True, help="all, store:SIZE[/fp16|bf16|fp32], or accelerate")
        else:
            q.add_argument("--settings", default="all@16,store:1GiB@4,store:1GiB@8")
        q.set_defaults(fn=fn)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
