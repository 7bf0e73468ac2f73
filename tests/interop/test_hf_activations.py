"""load_hf / export_hf for transformers' ``hidden_act`` choices moekit's experts compute, and
Mixtral's ``router_jitter_noise`` in a fine-tune, against real tiny transformers models."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="moekit.interop tests need Hugging Face transformers")

from test_hf import TOL, build, ids, maxdiff  # noqa: E402 - after the importorskip

from moekit.interop import UnsupportedModelError, export_hf, load_hf  # noqa: E402
from moekit.interop.hf import HF_ACTIVATIONS, config_from_hf  # noqa: E402

# tighter than test_hf's TOL: GELU's erf form in place of its tanh approximation moves these
# logits by ~3e-5, the rounding of the same function by ~2e-7 (fp32) or ~1e-7 (float64: the
# rotary tables are float32 on both sides)
TOL_ACT = 2e-6


def _build(family, act, **kw):
    if family == "qwen2_moe":
        kw.setdefault("decoder_sparse_step", 2)  # a dense MLP layer too: it uses hidden_act as well
    return build(family, hidden_act=act, **kw)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate", "swish"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_gated_activations_load_and_export(family, act, tmp_path):
    hf = _build(family, act)
    x = ids()
    mk = load_hf(hf)
    kind = HF_ACTIVATIONS[act]
    assert mk.cfg.moe.expert == kind and mk.cfg.ffn_kind == kind
    with torch.no_grad():
        ref = hf(x).logits
        assert maxdiff(mk(x).logits, ref) <= TOL_ACT
        hf.double().set_experts_implementation("eager")  # transformers' grouped_mm has no float64
        assert maxdiff(load_hf(hf)(x).logits, hf(x).logits) <= TOL_ACT
    hf.float().save_pretrained(tmp_path / "hf")
    mk = load_hf(tmp_path / "hf")
    export_hf(mk, tmp_path / "out", family)
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["hidden_act"]
        == {
            "swiglu": "silu",
            "geglu": "gelu_pytorch_tanh",
        }[kind]
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert maxdiff(back(x).logits, ref) <= TOL_ACT


@pytest.mark.parametrize("act", ["gelu", "relu", "quick_gelu", "gelu_10"])
def test_activation_moekit_cannot_compute_is_a_named_error(act):
    with pytest.raises(UnsupportedModelError, match=rf"hidden_act='{act}'.*'silu'.*'gelu_pytorch_tanh'"):
        load_hf(build("mixtral", hidden_act=act))


def test_export_refuses_a_dense_layer_with_another_activation(tmp_path):
    mk = load_hf(_build("qwen2_moe", "gelu_pytorch_tanh"))
    mk.cfg.ffn_kind = "swiglu"
    with pytest.raises(UnsupportedModelError, match="ffn_kind='swiglu' != expert='geglu'"):
        export_hf(mk, tmp_path, "qwen2_moe")


# ---------------------------------------------------------------------------------------------- router jitter
def _gate_io(model, gates):
    """Record (input, router logits) of each MoE layer's router during one call."""
    seen = []
    hooks = [g.register_forward_hook(lambda _m, args, out: seen.append((args[0].detach(), out))) for g in gates]
    return seen, hooks


def test_mixtral_router_jitter_trains_as_transformers():
    """Same generator state, training mode: the jittered hidden states that reach router and experts,
    the router logits and the model's logits equal transformers'; the same number of draws is
    consumed; eval has no jitter."""
    hf = build("mixtral", router_jitter_noise=0.3)
    mk = load_hf(hf)
    assert (mk.cfg.moe.router_jitter, mk.cfg.moe.router_jitter_experts) == (0.3, True)
    x = ids()
    hf_seen, h1 = _gate_io(hf, [layer.mlp.gate for layer in hf.model.layers])
    mk_seen, h2 = _gate_io(mk, [m.router for m in mk.moe_layers])
    hf.train(), mk.train()
    with torch.no_grad():
        torch.manual_seed(7)
        ref = hf(x).logits
        after_ref = torch.rand(3)
        torch.manual_seed(7)
        got = mk(x).logits
        after_got = torch.rand(3)
    for h in h1 + h2:
        h.remove()
    assert len(hf_seen) == len(mk_seen) == 2
    for (x_hf, logits_hf), (x_mk, routing) in zip(hf_seen, mk_seen):
        assert maxdiff(x_mk, x_hf) <= TOL  # the jittered input
        assert maxdiff(routing.logits_TE, logits_hf[0] if isinstance(logits_hf, tuple) else logits_hf) <= TOL
    assert maxdiff(got, ref) <= TOL
    assert torch.equal(after_got, after_ref), "moekit consumed a different number of random draws"
    hf.eval(), mk.eval()
    with torch.no_grad():
        clean = hf(x).logits
        assert maxdiff(mk(x).logits, clean) <= TOL and maxdiff(clean, ref) > 10 * TOL


def test_switch_jitter_is_not_mixtrals():
    """moekit's default jitter (the router's input only, Switch) gives other training logits than
    transformers' Mixtral: why the loaded model uses ``router_jitter_experts``."""
    hf = build("mixtral", router_jitter_noise=0.3).train()
    mk = load_hf(hf).train()
    for m in mk.moe_layers:
        m.cfg.router_jitter_experts = False
    x = ids()
    with torch.no_grad():
        torch.manual_seed(7)
        ref = hf(x).logits
        torch.manual_seed(7)
        assert maxdiff(mk(x).logits, ref) > 10 * TOL


def test_router_jitter_round_trips_through_export(tmp_path):
    mk = load_hf(build("mixtral", router_jitter_noise=0.25))
    export_hf(mk, tmp_path, "mixtral")
    assert json.loads((tmp_path / "config.json").read_text())["router_jitter_noise"] == 0.25
    assert transformers.AutoConfig.from_pretrained(tmp_path).router_jitter_noise == 0.25
    again = load_hf(tmp_path)
    assert (again.cfg.moe.router_jitter, again.cfg.moe.router_jitter_experts) == (0.25, True)


def test_router_jitter_out_of_range_is_a_named_error():
    c = build("mixtral").config.to_dict()
    c["router_jitter_noise"] = 1.5
    with pytest.raises(UnsupportedModelError, match="router_jitter_noise=1.5"):
        config_from_hf(c)
