"""Low-precision weights for decoding: each format's kernel against its dequantized reference (in
float64, on the same bf16/fp16-rounded rows), quantization errors within each format's step,
quantized experts against the float experts with dequantized weights (both paths: prompts and
few tokens), a model quantized in place, per-expert formats chosen from routing within a budget,
and bad input named."""

from __future__ import annotations

import pytest
import torch

from moekit.config import LMConfig, MoEConfig
from moekit.kernels.lowbit import FORMATS, LowBitWeight, format_bits, format_bytes, parse_format
from moekit.layer.experts import GroupedExperts
from moekit.layer.lowbit import QuantizedExperts
from moekit.models.lm import MoETransformer
from moekit.quantize import compare, plan_formats, quantize_model

ROUNDS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.bfloat16}


@pytest.mark.parametrize("fmt", [*FORMATS, "int4:32", "int4:128"])
@pytest.mark.parametrize("rows", [1, 5])
def test_each_kernel_equals_its_dequantized_weight(fmt, rows):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    q = LowBitWeight.quantize(w, fmt, 64)
    x = torch.randn(rows, 256)
    y = q.linear(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 64)
    x_in = x.to(ROUNDS.get(fmt.split(":")[0], torch.bfloat16)).double()  # the rows as the kernel takes them
    ref = x_in @ q.dequantize(torch.float64).t()
    out_round = 2**-7 if fmt != "fp32" and fmt != "fp16" else 2**-10  # the kernel's output dtype
    tol = out_round * ref.abs().max().item() + 1e-6
    assert (y.double() - ref).abs().max().item() <= tol, fmt


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "int8", "int4:32", "int4:64", "int4:256"])
def test_quantization_error_is_within_a_step_and_bytes_are_as_stated(fmt):
    torch.manual_seed(1)
    w = torch.randn(32, 512)
    q = LowBitWeight.quantize(w, fmt)
    err = (q.dequantize() - w).abs()
    base, group = parse_format(fmt)
    if base == "int8":
        assert (err <= w.abs().amax(1, keepdim=True) / 127 * 0.51 + 1e-6).all()
    elif base == "int4":
        g = w.reshape(32, -1, group)
        step = (g.amax(-1) - g.amin(-1)) / 15
        err_g = err.reshape(32, -1, group).amax(-1)
        assert (err_g <= step * 0.51 + step * 2**-7 * 8 + 1e-4).all()  # + the bf16 scale/zero rounding
    else:
        assert err.max() <= w.abs().max() * 2 ** -(8 if base == "bf16" else 11)
    assert q.nbytes == format_bytes(fmt, 32, 512)
    assert format_bits("int4:64") == 4.5 and format_bits("int8") == 8


def test_bad_formats_and_shapes_are_named():
    w = torch.randn(32, 64)
    for fmt in ("int3", "int4:48", "fp8", "int8:32"):
        with pytest.raises(ValueError, match="format must be one of"):
            LowBitWeight.quantize(w, fmt)
    with pytest.raises(ValueError, match="divide the input width 64"):
        LowBitWeight.quantize(w, "int4", 128)
    with pytest.raises(ValueError, match="divisible by 16"):
        LowBitWeight.quantize(torch.randn(40, 64), "int4", 32)
    with pytest.raises(ValueError, match="2-D"):
        LowBitWeight.quantize(torch.randn(4, 4, 4), "int8")


def dequantized_copy(experts: GroupedExperts, q: QuantizedExperts) -> GroupedExperts:
    ref = GroupedExperts(experts.num_experts, experts.dim, experts.hidden_dim, experts.kind)
    with torch.no_grad():
        for e in range(experts.num_experts):
            ref.w_up[e] = q.ups[e].dequantize().t()
            ref.w_down[e] = q.downs[e].dequantize().t()
    return ref


@pytest.mark.parametrize("formats", [["fp32"] * 8, ["int8"] * 8, ["int4:32", "int8", "fp16", "int4:64"] * 2])
def test_quantized_experts_equal_float_experts_on_their_dequantized_weights(formats):
    torch.manual_seed(2)
    ex = GroupedExperts(8, 64, 64, "swiglu")
    q = QuantizedExperts.of(ex, formats, 32)
    ref = dequantized_copy(ex, q)
    assert q.formats == [f if ":" in f or f != "int4" else "int4:32" for f in formats]
    x = torch.randn(20, 64)
    counts = torch.tensor([3, 0, 5, 2, 4, 0, 6, 0])
    tol = dict(rtol=2e-2, atol=2e-3) if formats[0] != "fp32" else dict(rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(q(x, counts), ref(x, counts, "loop"), **tol)
        experts = torch.tensor([[0, 3], [5, 5], [7, 1]])  # a repeated expert counts twice
        weights = torch.rand(3, 2)
        into = torch.randn(3, 64)
        got = q.few_slots(x[:3], experts, weights, into.clone())
        want = ref.few_slots(x[:3], experts, weights, into.clone())
        torch.testing.assert_close(got, want, **tol)
        one = q.few_slots(x[1:2], experts[1:2], weights[1:2], into[1:2].clone())  # batch-1 decoding's path
        torch.testing.assert_close(one, ref.few_slots(x[1:2], experts[1:2], weights[1:2], into[1:2].clone()), **tol)


def lm(**kw) -> LMConfig:
    moe = MoEConfig(dim=64, hidden_dim=64, num_experts=8, top_k=2, num_shared_experts=1, router="sigmoid")
    return LMConfig(vocab_size=97, dim=64, n_layers=3, n_heads=4, max_seq_len=64, moe=moe, **kw)


@pytest.mark.parametrize("experts,rest", [("fp16", "fp16"), ("int8", None), ("int8", "int8"), ("int4:32", "int4:32")])
def test_a_quantized_model_stays_close_to_its_reference(experts, rest):
    torch.manual_seed(3)
    ref = MoETransformer(lm()).eval()
    model = MoETransformer(lm())
    model.load_state_dict(ref.state_dict())
    report = quantize_model(model, experts, rest=rest, group_size=32)
    assert report.expert_bytes_after < report.expert_bytes_before
    assert all(isinstance(m.experts, QuantizedExperts) for m in model.moe_layers)
    idx = torch.randint(0, 97, (4, 32))
    q = compare(ref, model, idx[:, :-1], idx[:, 1:])
    bound = {"fp16": 1e-5, "int8": 1e-3, "int4:32": 3e-2}[experts]
    assert -1e-7 <= q.kl < bound and q.top1 > 0.8 and min(q.routing) > 0.6, q
    out = model.generate(idx[:1, :5], 10, temperature=0.0)
    assert out.shape == (1, 15)


def test_formats_chosen_from_routing_spend_the_budget_on_the_busiest_experts():
    torch.manual_seed(4)
    model = MoETransformer(lm())
    usage = [torch.tensor([0.6, 0.2, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01])] * 3
    ex = model.moe_layers[0].experts
    small = sum(format_bytes(f, *s) for f in ["int4:64"] for s in [(128, 64), (64, 64)])
    step = sum(format_bytes("int8", *s) for s in [(128, 64), (64, 64)]) - small
    budget = 24 * small + 3 * step  # room for about one expert per layer at int8
    plan = plan_formats(model, budget, choices=("int4:64", "int8"), usage=usage)
    assert [p[0] for p in plan] == ["int8"] * 3 and all(f == "int4:64" for p in plan for f in p[1:])
    assert ex.num_experts == 8
    with pytest.raises(ValueError, match="below the experts in int4:64"):
        plan_formats(model, 1000, usage=usage)
    report = quantize_model(model, "auto", bits=5.0, group_size=64)
    total = sum(e.w_up.numel() + e.w_down.numel() for e in [ex]) * 3
    assert report.expert_bytes_after <= total * 5 / 8
    with pytest.raises(ValueError, match="give budget_bytes or bits"):
        quantize_model(MoETransformer(lm()), "auto")


def test_input_moments_are_each_experts_routed_rows_and_give_its_output_error():
    """expert_input_moments against the routing the layer reports, and expert_output_error against
    the quantized expert's squared output error on those very rows, each input channel's part
    counted alone (float64)."""
    from moekit import MoE, MoEConfig
    from moekit.layer.experts import ACTIVATIONS
    from moekit.quantize import expert_input_moments, expert_output_error

    torch.manual_seed(5)
    moe = MoE(MoEConfig(dim=64, hidden_dim=64, num_experts=4, top_k=2)).double()
    x_BSD = torch.randn(3, 30, 64, dtype=torch.float64)
    ((s_up, s_down),) = expert_input_moments(moe, x_BSD, batch=2)
    ids_TK = moe.eval()(x_BSD).experts_TK
    x_TD, ex = x_BSD.reshape(-1, 64), moe.experts
    with torch.no_grad():  # the references
        for e in range(4):
            rows = x_TD[(ids_TK == e).any(-1)]
            a = ACTIVATIONS[ex.kind](rows @ ex.w_up[e])
            torch.testing.assert_close(s_up[e], rows.square().sum(0))
            torch.testing.assert_close(s_down[e], a.square().sum(0))
            want = 0.0  # with uncorrelated input channels: each output's error summed over the channels
            for w, inp in ((ex.w_up[e], rows), (ex.w_down[e], a)):
                q = LowBitWeight.quantize(w.t(), "int4:32").dequantize(torch.float64).t()
                want += float((inp.unsqueeze(-1) * (q - w)).pow(2).sum())
            got = expert_output_error(ex, e, "int4:32", (s_up, s_down))
            assert abs(got - want) <= 1e-9 * want, (e, got, want)


def test_calibrated_formats_go_to_the_experts_whose_output_error_is_largest():
    torch.manual_seed(4)
    model = MoETransformer(lm())
    stacks = [m.experts for m in model.moe_layers]
    D, F = stacks[0].dim, stacks[0].hidden_dim
    moments = []
    for i, ex in enumerate(stacks):  # expert i of layer i sees large inputs; the rest almost none
        s_up = torch.full((ex.num_experts, D), 1e-6, dtype=torch.float64)
        s_down = torch.full((ex.num_experts, F), 1e-6, dtype=torch.float64)
        s_up[i] *= 1e8
        s_down[i] *= 1e8
        moments.append((s_up, s_down))
    small = sum(format_bytes("int4:64", *s) for s in [(128, 64), (64, 64)])
    step = sum(format_bytes("int8", *s) for s in [(128, 64), (64, 64)]) - small
    plan = plan_formats(model, 24 * small + 3 * step, choices=("int4:64", "int8"), moments=moments)
    assert [[e for e, f in enumerate(p) if f == "int8"] for p in plan] == [[0], [1], [2]], plan
    with pytest.raises(ValueError, match="moments: one pair per MoE layer"):
        plan_formats(model, 24 * small, choices=("int4:64", "int8"), moments=moments[:1])
