"""Compile moekit's Triton kernels for an H100 (sm_90) without a GPU and report what the
compiler decided: registers, spill stack, shared memory, whether the dot became Hopper
``wgmma``, and compile time. A static check, not a timing: it finds configs that spill or do not
fit before any GPU time is spent, and proves the kernels compile for the target at all.

    PYTHONPATH=src python benchmarks/compile_sm90.py [--dtype bf16] [--markdown FILE]

Launch arguments are typed as a real launch would specialise them: pointers and sizes divisible
by 16, unit strides folded to the constant 1 (row-major tensors; the input gradient's
``w_up[e]^T`` has its unit stride on the reduction axis instead).
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
import time
import warnings

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moekit.kernels.triton import gemm
from moekit.kernels.triton.config import DECODE_CANDIDATES, TRAIN_CANDIDATES

TARGET = GPUTarget("cuda", 90, 32)
TL = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}

# kernel -> (unit strides, int32 pointers, fp32 pointers, variants: name -> constexpr switches)
KERNELS = {
    "up": (
        gemm._up_kernel,
        {"stride_xk", "stride_wn", "stride_pn", "stride_hn"},
        {"idx_ptr"},
        set(),
        {
            "swiglu+gather+store_pre": dict(ACT=0, GATED=True, GATHER=True, STORE_PRE=True),
            "swiglu+gather (inference)": dict(ACT=0, GATED=True, GATHER=True, STORE_PRE=False),
        },
    ),
    "down": (
        gemm._mm_kernel,
        {"stride_ak", "stride_bn", "stride_on"},
        {"a_idx_ptr", "out_idx_ptr"},
        set(),
        {"scale+scatter": dict(A_GATHER=False, SCALE=True, SCATTER=True)},
    ),
    "dx": (
        gemm._mm_kernel,
        {"stride_ak", "stride_bk", "stride_on"},
        {"a_idx_ptr", "out_idx_ptr"},
        set(),
        {"w_up^T, scatter": dict(A_GATHER=False, SCALE=False, SCATTER=True)},
    ),
    "down_bwd": (
        gemm._down_bwd_kernel,
        {"stride_gk", "stride_wd", "stride_pn", "stride_dn", "stride_hn", "stride_sn"},
        {"g_idx_ptr"},
        {"ds_ptr"},
        {"swiglu+gather+scale+h+ds": dict(ACT=0, GATED=True, G_GATHER=True, SCALE=True, STORE_H=True, STORE_DS=True)},
    ),
    "wgrad_up": (
        gemm._wgrad_kernel,
        {"stride_ap", "stride_bq", "stride_oq"},
        {"a_idx_ptr", "b_idx_ptr"},
        set(),
        {"x gathered": dict(A_GATHER=True, B_GATHER=False, SCALE=False)},
    ),
    "wgrad_down": (
        gemm._wgrad_kernel,
        {"stride_ap", "stride_bq", "stride_oq"},
        {"a_idx_ptr", "b_idx_ptr"},
        set(),
        {"g gathered, scaled": dict(A_GATHER=False, B_GATHER=True, SCALE=True)},
    ),
}
INT32_PTRS = {"tile_expert_ptr", "tile_start_ptr", "tile_end_ptr", "starts_ptr", "ends_ptr"}


def _compile(fn, unit, i32_ptrs, f32_ptrs, switches, cfg, dtype):
    params = list(inspect.signature(fn.fn).parameters)
    blocks = {
        "BLOCK_M": cfg["BLOCK_M"],
        "BLOCK_N": cfg["BLOCK_N"],
        "BLOCK_K": cfg["BLOCK_K"],
        "BLOCK_P": cfg["WGRAD_BLOCK_P"],
        "BLOCK_Q": cfg["WGRAD_BLOCK_Q"],
        "BLOCK_R": cfg["WGRAD_BLOCK_R"],
    }
    const = {**switches, "ACC_DTYPE": tl.float32, "PRECISION": cfg["input_precision"]}
    const.update({k: v for k, v in blocks.items() if k in params})
    const.update({p: 1 for p in unit})
    sig, attrs = {}, {}
    for i, p in enumerate(params):
        if p in const:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = "*i32" if p in i32_ptrs | INT32_PTRS else "*fp32" if p in f32_ptrs else TL[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.perf_counter()
    k = triton.compile(
        ASTSource(fn, sig, constexprs=const, attrs=attrs),
        target=TARGET,
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
    )
    secs = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    fields = dict(tok.split(":", 1) for tok in usage.split() if ":" in tok and tok.split(":", 1)[1].isdigit())
    return {
        "regs": int(fields.get("REG", -1)),
        "stack": int(fields.get("STACK", -1)),
        "smem": k.metadata.shared,
        "wgmma": "wgmma" in k.asm["ptx"],
        "secs": secs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=sorted(TL))
    ap.add_argument("--markdown", help="append the table to this file")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = [
        "| kernel | variant | config (M,N,K / P,Q,R; warps, stages) | regs | spill stack B | smem KiB | wgmma | "
        "compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.kernels.split(","):
        fn, unit, i32p, f32p, variants = KERNELS[name]
        for vname, sw in variants.items():
            for cfg in DECODE_CANDIDATES + TRAIN_CANDIDATES:
                if name == "down_bwd":  # launched with its own column tile and warps
                    cfg = {**cfg, "BLOCK_N": cfg["DBWD_BLOCK_N"], "num_warps": cfg["DBWD_num_warps"]}
                shape = (
                    f"{cfg['WGRAD_BLOCK_P']},{cfg['WGRAD_BLOCK_Q']},{cfg['WGRAD_BLOCK_R']}"
                    if name.startswith("wgrad")
                    else f"{cfg['BLOCK_M']},{cfg['BLOCK_N']},{cfg['BLOCK_K']}"
                )
                label = f"{shape}; {cfg['num_warps']}, {cfg['num_stages']}"
                try:
                    r = _compile(fn, unit, i32p, f32p, sw, cfg, args.dtype)
                    row = (
                        f"| {name} | {vname} | {label} | {r['regs']} | {r['stack']} | {r['smem'] / 1024:.0f} | "
                        f"{'yes' if r['wgmma'] else 'no'} | {r['secs']:.1f} |"
                    )
                except Exception as err:  # noqa: BLE001 - report and go on
                    row = f"| {name} | {vname} | {label} | FAIL: {type(err).__name__}: {str(err)[:80]} | | | | |"
                print(row, flush=True)
                rows.append(row)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(
                f"\n### sm_90 compile check ({args.dtype}, triton {triton.__version__})\n\n" + "\n".join(rows) + "\n"
            )


if __name__ == "__main__":
    sys.exit(main())
