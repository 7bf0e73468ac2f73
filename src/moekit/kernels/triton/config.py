"""Block sizes and launch settings for moekit's Triton kernels.

Every block size is a ``tl.constexpr`` of its kernel; the dicts below are only the defaults the
launchers pass. ``BLOCK_M`` also fixes the row-tile table (:mod:`.schedule`), so one value is
shared by every row-tiled kernel of a forward/backward pair.

None of these numbers has been tuned: the kernels have only run under ``TRITON_INTERPRET=1``.
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
}

# ---------------------------------------------------------------------------------------------
# AUTOTUNE HOOK (CUDA only; deliberately not enabled). To tune on an H100, wrap the kernels in
# gemm.py with ``triton.autotune(configs=[triton.Config({...}, num_warps=..., num_stages=...)],
# key=["D", "F"] / ["K", "N"] / ["P", "Q"])`` when the kernels are compiled (``not gemm.INTERPRETED``). BLOCK_M cannot be
# autotuned per kernel as things stand, because the host builds the tile table with it: either
# keep it fixed here, or build one table per candidate BLOCK_M. Never autotune under the
# interpreter: each candidate would run every program in Python.
# ---------------------------------------------------------------------------------------------


def default_config(interpreted: bool) -> dict:
    """A fresh copy of the defaults for interpreted or compiled kernels."""
    return dict(INTERPRET_CONFIG if interpreted else CUDA_CONFIG)
