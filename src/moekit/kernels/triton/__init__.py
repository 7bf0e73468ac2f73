"""Triton kernels for the expert FFN: grouped GEMMs over rows sorted by expert.

The design follows ScatterMoE (Tan et al. 2024, "Scattered Mixture-of-Experts Implementation")
and SonicMoE (2025): the gather of token rows into expert order is fused into the up
projection's A loads, and the routing weight and the scatter back to slot order into the down
projection's epilogue, so neither the gathered input nor the per-expert output is materialised,
and the routing weight's gradient comes from ``rowsum(dh_unscaled * h)`` without caching y.
The code is moekit's own; no kernel was copied from those projects.

* :mod:`.gemm`: the kernels (up projection with the activation epilogue, a generic grouped
  GEMM with row scale and scatter, the down projection's backward with the activation
  backward and routing-weight gradient in its epilogue, per-expert weight gradients).
* :mod:`.schedule`: the row-tile table, built on the device from ``counts_E`` (no host sync).
* :mod:`.routing`: ``routing_plan``, ``plan_dispatch``'s stable sort of the slots by expert as
  a fused counting-sort kernel (one launch for decode-sized batches, no host sync).
* :mod:`.activations`: SwiGLU, GEGLU, GELU, ReLU forward and backward for the epilogues, by the
  activation names of :mod:`moekit.kernels.activations`.
* :mod:`.autograd`: ``triton_ffn`` (the backend contract, like ``loop_ffn``) and
  ``triton_moe_ffn`` (with the optional gather, scale and scatter).
* :mod:`.config`: launch configs (heuristic by rows per expert, tuning candidates, validation);
  :mod:`.tune`: the measured choice per shape bucket, cached on disk.
* :mod:`.check`: a self-check against the loop reference, for a device and dtype (run by the
  tests; ``backend="auto"`` does not pick these kernels: ``backend="triton"`` opts in).

Status: verified for correctness under Triton's CPU interpreter (``TRITON_INTERPRET=1``,
fp64/fp32/fp16) against ``moekit.kernels.reference.loop_ffn``, and compiled for sm_90 without a
GPU (``benchmarks/compile_sm90.py``). Never run on a GPU: nothing about their speed is known and
the tuning candidates are unmeasured. See docs/kernels.md.
"""

from .activations import act_kind
from .autograd import triton_ffn, triton_moe_ffn
from .gemm import INTERPRETED
from .routing import routing_plan

__all__ = ["triton_ffn", "triton_moe_ffn", "routing_plan", "act_kind", "INTERPRETED"]
