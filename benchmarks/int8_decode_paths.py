"""Batch-1 int8 decode of an OLMoE-shaped folder with PyTorch's two int8 CPU kernels, interleaved
in one process: the packed weight-only kernel moekit uses (``torch._weight_int8pack_mm``, bf16
activations) and fbgemm's dynamic int8 linear (``torch.ops.quantized.linear_dynamic``: activations
quantized per call, int8 x int8 products; its quantized-tensor API is deprecated in torch 2.13).
The same int8 weights (per-output-channel scales), every linear map but the routers and the
embedding in int8, greedy tokens compared.

    PYTHONPATH=src:benchmarks python benchmarks/int8_decode_paths.py --hf /tmp/decode-olmoe8-hf --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from decode import decode_steps  # benchmarks/ is on sys.path
from moekit.interop import load_hf
from moekit.kernels import lowbit
from moekit.quantize import quantize_model


def fbgemm_linear(packed: dict, kernel):
    """``LowBitWeight._linear`` with int8 weights computed by fbgemm (prepacked on first use)."""

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt != "int8":
            return kernel(self, x)
        if id(self.data) not in packed:
            scales = self.scales.float()
            w = self.data.float() * scales[:, None]
            zeros = torch.zeros(w.shape[0], dtype=torch.long)
            packed[id(self.data)] = torch.ops.quantized.linear_prepack(
                torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8), None
            )
        y = torch.ops.quantized.linear_dynamic(x.float().reshape(-1, x.shape[-1]), packed[id(self.data)])
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    return linear


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    torch.set_num_threads(args.threads)
    model = load_hf(args.hf)
    quantize_model(model, "int8", rest="int8")
    kernel = lowbit.LowBitWeight._linear
    paths = {"packed (_weight_int8pack_mm)": kernel, "fbgemm (linear_dynamic)": fbgemm_linear({}, kernel)}
    tok_s: dict[str, list[float]] = {name: [] for name in paths}
    tokens: dict[str, list[int]] = {}
    try:
        for _ in range(args.rounds + 1):  # the first round of each: untimed (fbgemm prepacks in it)
            for name, linear in paths.items():
                lowbit.LowBitWeight._linear = linear  # type: ignore[method-assign]
                secs, tokens[name] = decode_steps(model, args.new_tokens, args.warmup, False)
                tok_s[name].append((args.new_tokens - args.warmup) / secs)
    finally:
        lowbit.LowBitWeight._linear = kernel  # type: ignore[method-assign]
    first, second = tokens.values()
    same = sum(a == b for a, b in zip(first, second))
    print(f"{args.hf}, int8, {args.threads} thread(s), batch 1, {args.new_tokens - args.warmup} timed tokens")
    print("| int8 kernel | tok/s, rounds | median | same greedy tokens |")
    print("|---|---|---|---|")
    for name, values in tok_s.items():
        timed = values[1:]
        rounds = ", ".join(f"{v:.1f}" for v in timed)
        print(f"| {name} | {rounds} | {statistics.median(timed):.1f} | {same}/{len(first)} |")


if __name__ == "__main__":
    main()
