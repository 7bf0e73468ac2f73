"""moekit's own CPU decode kernels (moekit.kernels.native) against float64 references on the
dequantized weights: every format, odd shapes (the vector loops' tails), several rows, alpha and
accumulation, one thread against two, the portable C build against the same references; a layer's
chosen experts in one call against the per-expert path, mixed formats, every activation, an int4
expert falling back, buffers replaced after the first call; bad input named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.kernels import native
from moekit.kernels.lowbit import LowBitWeight
from moekit.layer.experts import ACTIVATIONS, GroupedExperts
from moekit.layer.lowbit import QuantizedExperts, experts_on_tokens

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for moekit's native kernels")
SHAPES = [(1, 1, 1), (37, 77, 3), (129, 200, 8), (64, 1024, 1), (48, 300, 2)]  # (out, in, rows)


def reference(q: LowBitWeight, x_RI: torch.Tensor) -> torch.Tensor:
    return x_RI.double() @ q.dequantize(torch.float64).t()


def tolerance(q: LowBitWeight, x_RI: torch.Tensor) -> torch.Tensor:
    """float32 accumulation, plus for int8 the rows' two-level quantization: each element of x
    within max|x| / (127 * 508) of its value."""
    w_abs = q.dequantize(torch.float64).abs()
    tol = 1e-5 * (x_RI.double().abs() @ w_abs.t()) + 1e-30
    if q.fmt == "int8":
        tol = tol + 1.6e-5 * x_RI.double().abs().amax(1, keepdim=True) * w_abs.sum(1)
    return tol


@pytest.mark.parametrize("fmt", native.FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_gemv_equals_the_dequantized_weight_in_float64(fmt, shape):
    n_out, n_in, rows = shape
    torch.manual_seed(n_out * n_in + rows)
    q = LowBitWeight.quantize(torch.randn(n_out, n_in), fmt)
    x = torch.randn(rows, n_in) * torch.rand(n_in) ** 3 * 4  # uneven columns, as activations are
    y = native.linear(x, q.data, q.scales, threads=1)
    assert y.dtype == torch.float32 and y.shape == (rows, n_out)
    assert ((y.double() - reference(q, x)).abs() <= tolerance(q, x)).all(), fmt
    assert torch.equal(native.linear(x, q.data, q.scales, threads=2), y)  # rows split: each row's sum unchanged
    acc = torch.randn(rows, n_out)
    got = native.linear(x, q.data, q.scales, out_RO=acc.clone(), alpha=-0.5)
    want = acc.double() - 0.5 * reference(q, x)
    assert ((got.double() - want).abs() <= 0.5 * tolerance(q, x) + 1e-6).all()


AVX2 = "avx2" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


@pytest.mark.parametrize("build", ["portable", "avx2"])
def test_each_instruction_sets_build_computes_the_same(build):
    """The portable C and the AVX2 kernels (built here even on an AVX-512 CPU) against float64, on
    shapes with every tail length of their loops."""
    if build == "avx2" and not AVX2:
        pytest.skip("no AVX2 on this CPU")
    lib = native.load(native.FLAGS + (("-DMK_PORTABLE",) if build == "portable" else ("-DMK_NO_AVX512",)))
    assert lib is not None and native.instruction_set(lib) == build
    assert native.instruction_set() in ("avx2", "avx512-vnni")  # the process never takes the portable build
    torch.manual_seed(3)
    for fmt in native.FORMATS:
        for n_in in (150, 64, 7, 97):
            q = LowBitWeight.quantize(torch.randn(33, n_in), fmt)
            x = torch.randn(2, n_in)
            y = native.linear(x, q.data, q.scales, lib=lib)
            assert ((y.double() - reference(q, x)).abs() <= tolerance(q, x)).all(), (fmt, n_in)


@pytest.mark.parametrize("build", ["default", "avx2"])
def test_int8_products_at_the_extremes_of_the_bytes_do_not_saturate(build):
    """Weights of -128 and 127 against rows at their largest magnitude: the pairwise int16 sums of
    the AVX2 kernel (vpmaddubsw) would saturate on unsigned bytes times these."""
    if build == "avx2" and not AVX2:
        pytest.skip("no AVX2 on this CPU")
    lib = native.load(native.FLAGS + ("-DMK_NO_AVX512",)) if build == "avx2" else native.library()
    data = torch.tensor([[-128] * 96, [127] * 96, [-128, 127] * 48, [127, -128] * 48], dtype=torch.int8)
    scales = torch.ones(4, dtype=torch.bfloat16)
    x = torch.tensor([[1.0] * 96, [-1.0] * 96, [1.0, -1.0] * 48, [-1.0, 1.0] * 48])
    y = native.linear(x, data, scales, lib=lib)
    assert torch.equal(y, (x.double() @ data.double().t()).float())


def test_a_lowbit_weight_takes_the_kernels_for_a_few_rows_and_torch_for_many():
    torch.manual_seed(4)
    q = LowBitWeight.quantize(torch.randn(64, 128), "int8")
    few, many = torch.randn(native.MAX_ROWS, 128), torch.randn(native.MAX_ROWS + 1, 128)
    assert native.handles("int8", few, q.data) and not native.handles("int8", many, q.data)
    assert not native.handles("int4", few, q.data)
    assert torch.equal(q.linear(few), native.linear(few, q.data, q.scales))
    ref = many.to(torch.bfloat16).double() @ q.dequantize(torch.float64).t()  # torch's kernel: bf16 rows
    torch.testing.assert_close(q.linear(many).double(), ref, rtol=2e-2, atol=2e-2)


def per_expert_reference(q: QuantizedExperts, x_TD, experts_TK, weights_TK, into_TD) -> torch.Tensor:
    act = ACTIVATIONS[q.kind]

    def expert(e: int, x):
        return act(x @ q.ups[e].dequantize(torch.float64).t()) @ q.downs[e].dequantize(torch.float64).t()

    return experts_on_tokens(expert, q.num_experts, q.dim, x_TD.double(), experts_TK, weights_TK.double(), into_TD)


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_a_layers_chosen_experts_in_one_call_equal_each_expert_alone(kind):
    torch.manual_seed(5)
    formats = ["fp32", "fp16", "bf16", "int8", "int8", "bf16", "fp16", "fp32"]
    q = QuantizedExperts.of(GroupedExperts(8, 96, 40, kind), formats)
    x = torch.randn(1, 96)
    experts = torch.tensor([[3, 1, 7, 3, 8]])  # a repeated expert counts twice; id 8: an empty slot
    weights = torch.rand(1, 5)
    into = torch.randn(1, 96)
    got = q.few_slots(x, experts, weights, into.clone())
    assert q._table is not None  # the one call was taken
    want = per_expert_reference(q, x, experts, weights, into.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = q.few_slots(x, experts, weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(q.few_slots(x, experts, weights), one)  # each row summed by one thread, in order


def test_an_int4_expert_falls_back_and_replaced_buffers_are_read_anew():
    torch.manual_seed(6)
    q = QuantizedExperts.of(GroupedExperts(4, 64, 64, "swiglu"), ["int8", "int4:32", "bf16", "int8"], 32)
    x, w = torch.randn(1, 64), torch.rand(1, 2)
    mixed = torch.tensor([[0, 1]])
    got = q.few_slots(x, mixed, w)
    torch.testing.assert_close(got.double(), per_expert_reference(q, x, mixed, w, None), rtol=2e-2, atol=2e-3)
    assert q._native_table([0, 1]) is None and q._native_table([0, 2]) is not None
    native_only = torch.tensor([[0, 3]])
    before = q.few_slots(x, native_only, w)
    q.up[3].data = q.up[3].data.flip(0).clone()  # a new tensor in place of the one the table points at
    after = q.few_slots(x, native_only, w)
    assert not torch.allclose(before, after)
    want = per_expert_reference(q, x, native_only, w, None)
    torch.testing.assert_close(after.double(), want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


def test_a_nan_or_an_infinity_in_the_rows_gives_nan_not_a_finite_number():
    torch.manual_seed(9)
    for fmt in native.FORMATS:
        q = LowBitWeight.quantize(torch.randn(16, 64), fmt)
        x = torch.randn(2, 64)
        x[0, 5], x[1, 7] = float("nan"), float("inf")
        y = native.linear(x, q.data, q.scales)
        assert not torch.isfinite(y).any(), fmt
    q = QuantizedExperts.of(GroupedExperts(4, 64, 32, "swiglu"), ["int8"] * 4)
    x = torch.randn(1, 64)
    x[0, 3] = float("nan")
    assert q.few_slots(x, torch.tensor([[0, 2]]), torch.rand(1, 2)).isnan().all()


def test_bad_input_is_named():
    q = LowBitWeight.quantize(torch.randn(8, 16), "int8")
    with pytest.raises(ValueError, match="agree in I"):
        native.linear(torch.randn(1, 15), q.data, q.scales)
    with pytest.raises(ValueError, match="scales_O"):
        native.linear(torch.randn(1, 16), q.data, None)
    with pytest.raises(ValueError, match="out_RO"):
        native.linear(torch.randn(1, 16), q.data, q.scales, out_RO=torch.zeros(1, 7))
    with pytest.raises(ValueError, match="w_OI must be"):
        native.linear(torch.randn(1, 16), q.data.to(torch.int32), None)


def test_turned_off_the_weights_compute_with_torchs_kernels():
    code = (
        "import torch; from moekit.kernels import native; from moekit.kernels.lowbit import LowBitWeight;"
        "q = LowBitWeight.quantize(torch.randn(8, 16), 'int8'); x = torch.randn(1, 16);"
        "ref = x.to(torch.bfloat16).double() @ q.dequantize(torch.float64).t();"
        "assert not native.available(); torch.testing.assert_close(q.linear(x).double(), ref, rtol=1e-2, atol=1e-2)"
    )
    env = dict(os.environ, MOEKIT_NATIVE="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_float_experts_at_one_token_take_one_native_call_once_rows_major():
    torch.manual_seed(7)
    ex = GroupedExperts(8, 64, 48, "swiglu")
    x, ids, w, into = torch.randn(1, 64), torch.tensor([[5, 2, 8]]), torch.rand(1, 3), torch.randn(1, 64)
    up, down = ex.w_up.detach().double(), ex.w_down.detach().double()
    act = ACTIVATIONS["swiglu"]
    want = into.double() + sum(w[0, k] * act(x.double() @ up[e]) @ down[e] for k, e in enumerate([5, 2]))
    with torch.no_grad():
        stacked = ex.few_slots(x, ids, w, into.clone())
        assert ex._native_table(x) is None  # (E, D, H) stacked: MKL's layout, PyTorch's GEMVs
        ex.rows_major_()
        rows = ex.few_slots(x, ids, w, into.clone())
        assert ex._native_table(x) is not None
    for got in (stacked, rows):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert ex._native_table(x) is None  # autograd on: no native call (they have no backward)


def test_a_float_linear_map_at_a_few_rows_is_native_without_autograd():
    from moekit.kernels import threads

    torch.manual_seed(8)
    w, b, x = torch.randn(96, 64, requires_grad=True), torch.randn(96), torch.randn(2, 1, 64)
    want = torch.nn.functional.linear(x.double(), w.detach().double(), b.double())
    with torch.no_grad():
        got = threads.linear(x, w, b)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    threads.linear(x, w, b).sum().backward()  # with autograd: PyTorch's op, so the gradient flows
    assert w.grad is not None and torch.allclose(w.grad, x.reshape(-1, 64).sum(0).expand(96, 64))


def test_several_maps_of_one_input_in_one_call_equal_each_alone():
    from moekit.layer.lowbit import LowBitLinear, lowbit_linears

    torch.manual_seed(10)
    maps = [
        LowBitLinear(LowBitWeight.quantize(torch.randn(n, 96), f))
        for n, f in [(64, "int8"), (33, "bf16"), (17, "fp32")]
    ]
    x = torch.randn(2, 1, 96)
    got = lowbit_linears(x, maps)
    assert got is not None and [tuple(y.shape) for y in got] == [(2, 1, 64), (2, 1, 33), (2, 1, 17)]
    for y, m in zip(got, maps):
        assert torch.equal(y, m(x))  # the same kernel, row for row
    assert lowbit_linears(x, [*maps, LowBitLinear(LowBitWeight.quantize(torch.randn(16, 96), "int4:32"))]) is None
    assert lowbit_linears(x.double(), maps) is None
