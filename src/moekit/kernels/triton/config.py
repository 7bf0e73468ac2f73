"""Block sizes and launch settings for moekit's Triton kernels.

Every block size is a ``tl.constexpr`` of its kernel; a config dict holds what the launchers
pass. ``BLOCK_M`` also fixes the row-tile table (:mod:`.schedule`), so one value is shared by
every row-tiled kernel of a forward/backward pair, and a config is chosen per call, never per
kernel.

How a call gets its config (first match):
1. ``config=`` given by the caller (merged over the defaults),
2. a tuned entry for the call's shape (:mod:`.tune`, measured on the device and cached),
3. :func:`heuristic_config`: tiles sized to the rows per expert (decode: 16-row tiles, narrow
   column tiles so that many programs are in flight over the experts' weights).

None of these numbers has been measured on a GPU yet: the kernels have only run under
``TRITON_INTERPRET=1``. The candidates are the usual starting points for Hopper bf16 GEMMs.
"""

from __future__ import annotations

# Defaults for a real GPU launch: a common starting point for fp16/bf16 GEMMs, not measured.
CUDA_CONFIG: dict = {
    "BLOCK_M": 64,  # rows per tile (also the tile table's granularity)
    "BLOCK_N": 64,  # output columns per tile
    "BLOCK_K": 32,  # reduction step
    "WGRAD_BLOCK_P": 64,  # weight-gradient tile: rows of dW[e]
    "WGRAD_BLOCK_Q": 64,  # weight-gradient tile: columns of dW[e]
    "WGRAD_BLOCK_R": 32,  # weight-gradient reduction step over the expert's rows
    # The down projection's backward keeps ~5 (M, N) fp32 tiles live in its epilogue (gradient,
    # pre-activations, activation, h): its own narrower columns and more warps keep it from
    # spilling (benchmarks/compile_sm90.py: 64x64 tiles on 4 warps use 249 registers, 128x128 on 8
    # warps spill 1.2 KB of stack; 64x64 and 128x32 on 8 warps use 125).
    "DBWD_BLOCK_N": 64,
    "DBWD_num_warps": 8,
    "num_warps": 4,
    "num_stages": 3,
    # fp32 inputs: "ieee" matches torch's default (TF32 off); "tf32" trades accuracy for speed.
    "input_precision": "ieee",
}

# The smallest tiles tl.dot takes: under the interpreter every program runs in Python, and small
# tiles make tiny test shapes cover the multi-tile, masked and early-exit paths.
INTERPRET_CONFIG: dict = {
    **CUDA_CONFIG,
    "BLOCK_M": 16,
    "BLOCK_N": 16,
    "BLOCK_K": 16,
    "WGRAD_BLOCK_P": 16,
    "WGRAD_BLOCK_Q": 16,
    "WGRAD_BLOCK_R": 16,
    "DBWD_BLOCK_N": 16,
}


def _cfg(m, n, k, warps, stages, p=64, q=64, r=32) -> dict:
    """A candidate; the down projection's backward gets at most 16 fp32 values per thread per tile."""
    dbwd_warps = 8 if m >= 64 else 4
    dbwd_n = max(16, min(n, 16 * 32 * dbwd_warps // m))
    return {
        **CUDA_CONFIG,
        "BLOCK_M": m,
        "BLOCK_N": n,
        "BLOCK_K": k,
        "num_warps": warps,
        "num_stages": stages,
        "WGRAD_BLOCK_P": p,
        "WGRAD_BLOCK_Q": q,
        "WGRAD_BLOCK_R": r,
        "DBWD_BLOCK_N": dbwd_n,
        "DBWD_num_warps": dbwd_warps,
    }


# What the tuner tries on CUDA, by rows per busy expert (the tile table's M dimension). Wider
# than 128 columns is left out: the gated up projection keeps two (M, N) fp32 accumulators.
DECODE_CANDIDATES: list[dict] = [  # <= 32 rows per expert: weight-read bound, many programs wanted
    _cfg(16, 32, 128, 4, 3),
    _cfg(16, 64, 128, 4, 4),
    _cfg(16, 128, 64, 4, 3),
    _cfg(32, 64, 128, 4, 3),
]
TRAIN_CANDIDATES: list[dict] = [  # large row tiles: compute bound
    _cfg(64, 64, 32, 4, 3),
    _cfg(64, 128, 64, 4, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 32, 8, 4, 128, 128, 32),
    _cfg(64, 128, 64, 4, 4, 128, 64, 64),
]

DECODE_ROWS_PER_EXPERT = 32  # at or below this many rows per busy expert a call counts as decode-shaped


def rows_per_expert(num_rows: int, num_experts: int) -> float:
    """Average rows of an expert that has rows (an upper bound on how many experts are busy)."""
    busy = max(1, min(num_experts, num_rows))
    return num_rows / busy


def heuristic_config(num_rows: int, num_experts: int) -> dict:
    """An untuned config for a compiled launch, sized to the rows per busy expert: 16-row tiles,
    32-64 columns and a long reduction step for decode-sized calls (so the experts' weights are
    read by many programs at once), 64-128-row tiles for training-sized calls."""
    per = rows_per_expert(num_rows, num_experts)
    if per <= 16:
        return _cfg(16, 64, 128, 4, 3)
    if per <= DECODE_ROWS_PER_EXPERT:
        return _cfg(32, 64, 128, 4, 3)
    if per <= 256:
        return _cfg(64, 128, 64, 4, 3)
    return _cfg(128, 128, 64, 8, 3)


def candidates(num_rows: int, num_experts: int) -> list[dict]:
    """The configs the tuner times for a call of this size (fresh copies)."""
    pool = DECODE_CANDIDATES if rows_per_expert(num_rows, num_experts) <= DECODE_ROWS_PER_EXPERT else TRAIN_CANDIDATES
    return [dict(c) for c in pool]


def default_config(interpreted: bool) -> dict:
    """A fresh copy of the defaults for interpreted or compiled kernels."""
    return dict(INTERPRET_CONFIG if interpreted else CUDA_CONFIG)


KNOWN_KEYS = frozenset(CUDA_CONFIG)


def check_config(cfg: dict) -> None:
    """Reject unknown keys and block sizes ``tl.dot``/``tl.arange`` cannot take."""
    unknown = set(cfg) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"unknown Triton config keys {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "WGRAD_BLOCK_P", "WGRAD_BLOCK_Q", "WGRAD_BLOCK_R", "DBWD_BLOCK_N"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or v < 16 or v & (v - 1)):
            raise ValueError(f"Triton config {key} must be a power of two >= 16 (tl.dot's smallest tile); got {v!r}")
