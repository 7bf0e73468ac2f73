#!/usr/bin/env bash
# The one command a GPU session runs (H100, one <=10-minute call), from the repository root:
#
#     bash benchmarks/gpu_session.sh            # tables appended to $OUT/results.md, log in $OUT/log.txt
#
# Budget (anchors in shared BENCHMARKS.md, H100 bf16): the slowest rows are the per-expert
# loops on qwen3moe (~0.27 s per fwd+bwd) and anything on mixtral (dense chain 31 ms fwd+bwd);
# each row costs (2 warm-up + reps) x (fwd + fwd+bwd) + one correctness fwd+bwd + one memory
# fwd+bwd, so ~1-3 s per row with 5 reps, ~10 s per row on qwen3moe's loops. Expected total
# 3-5 min including CUDA start-up and Triton's first compilations; every step has its own
# timeout so that one hang still leaves the other steps' tables in results.md.
#
# Untested here (written on a CPU-only machine): everything CUDA-specific.
# ScatterMoE is not in the GPU image; its rows then read "not installed".
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
MD="$OUT/results.md"
LOG="$OUT/log.txt"
unset TRITON_INTERPRET                      # compiled kernels, never the interpreter
export MOEKIT_TRITON_CACHE="$OUT/triton-tuning.json"   # the tuner's choices and timings come back with $OUT
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
L="$PY benchmarks/layer.py --device cuda --markdown $MD"

step() {  # step SECONDS DESCRIPTION ARGS...: run one layer.py call under a timeout, log everything
    local secs=$1 what=$2; shift 2
    echo "=== $what ($(date +%T), limit ${secs}s)" | tee -a "$LOG"
    timeout "$secs" $L "$@" 2>&1 | tee -a "$LOG"
    echo "=== rc ${PIPESTATUS[0]} after step: $what" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

# 1. Correctness gate for the (never yet compiled) Triton kernels: fp32 and bf16 on `small`,
#    checked against `grouped` (output, x grad, all weight grads) before any timing; a
#    disagreement prints a FAIL row. Also compiles the kernels once (Triton's disk cache).
step 150 "triton correctness + first timing (+ tuning compiles), small, fp32+bf16" \
    --shapes small --dtypes fp32,bf16 --backends loop,grouped,triton --peers "" --reps 10

# 2. Training-shaped layer, bf16 fwd+bwd, all backends and peers: ratio to the same-FLOPs
#    dense chain, peak and activation memory. Few reps on the big shapes (each fwd+bwd is
#    10-300 ms), more on `small` (0.5 ms).
step 250 "fwd+bwd bf16, mixtral/qwen3moe/olmoe" --shapes mixtral,qwen3moe,olmoe --dtypes bf16 --reps 5
step 60  "fwd+bwd bf16, small" --shapes small --dtypes bf16 --reps 20

# 3. Decode: forward only at 1, 8, 64 tokens (eager, and moekit's rows again as a replayed CUDA
#    graph) vs the weight-read floor (experts hit x 3DF bytes /
#    copy bandwidth measured in the same run), against the anchors 25/170/390 us (qwen3moe) and
#    235 us (mixtral, T=1).
step 90 "decode bf16, qwen3moe + mixtral" --shapes qwen3moe,mixtral --dtypes bf16 --decode 1,8,64 --reps 20

echo "=== done $(date +%T); tables in $MD" | tee -a "$LOG"
