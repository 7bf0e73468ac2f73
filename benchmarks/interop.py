"""moekit.interop.accelerate against transformers' own experts implementations (CPU by default).

A random Mixtral-style model (hidden 512, 16 experts, top-2, 2 layers): one forward of a 4 x 256
batch, and one MoE block alone on (4, 256, 512); median of --reps timed runs, round-robin over
the variants after warm-up. Three variants of the same weights: transformers "eager" experts,
transformers "grouped_mm" experts, and the model after ``moekit.interop.accelerate`` (moekit
dispatch/combine and grouped experts on views of the same tensors).

    PYTHONPATH=src python benchmarks/interop.py [--reps 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch


def build(args):
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=1000,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model


def set_impl(model, impl: str) -> None:
    model.config._experts_implementation = impl
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and hasattr(experts, "config"):
            experts.config._experts_implementation = impl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from moekit.interop import accelerate

    model = build(args)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    h = torch.randn(args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(1))
    layers = model.model.layers
    original = [layer.mlp for layer in layers]
    accelerate(model)
    accelerated = [layer.mlp for layer in layers]

    def use(variant: str) -> None:
        blocks = accelerated if variant == "moekit" else original
        for layer, blk in zip(layers, blocks):
            layer.mlp = blk
        if variant != "moekit":
            set_impl(model, variant)

    def fwd():
        with torch.inference_mode():
            return model(x).logits

    def block():
        with torch.inference_mode():
            return layers[0].mlp(h)

    variants = ["eager", "grouped_mm", "moekit"]
    outs = {}
    for v in variants:  # warm-up and agreement
        use(v)
        outs[v] = fwd()
        fwd(), block(), block()
    diff = max((outs[v] - outs["eager"]).abs().max().item() for v in variants)
    times = {v: ([], []) for v in variants}
    for _ in range(args.reps):  # round-robin, so that load from other processes hits every variant alike
        for v in variants:
            use(v)
            for fn, acc in ((fwd, times[v][0]), (block, times[v][1])):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
    med = {v: (statistics.median(a), statistics.median(b)) for v, (a, b) in times.items()}
    names = {
        "eager": "transformers eager",
        "grouped_mm": "transformers grouped_mm",
        "moekit": "moekit.interop.accelerate",
    }
    print(
        f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | threads {torch.get_num_threads()}"
    )
    print(
        f"# Mixtral-style: hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, top-{args.top_k}, "
        f"{args.layers} layers, batch {args.batch}x{args.seq}, fp32, median of {args.reps} (round-robin after warm-up)"
    )
    print(f"# max |logits - eager logits| over variants: {diff:.2e}")
    print(
        "| experts implementation | model forward (ms) | vs eager | vs grouped_mm | one MoE block (ms) | vs eager | "
        "vs grouped_mm |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    (ef, eb), (gf, gb) = med["eager"], med["grouped_mm"]
    for v in variants:
        f, b = med[v]
        print(
            f"| {names[v]} | {f * 1e3:.1f} | {ef / f:.2f}x | {gf / f:.2f}x | {b * 1e3:.1f} | {eb / b:.2f}x | "
            f"{gb / b:.2f}x |"
        )


if __name__ == "__main__":
    main()
