"""moekit.interop against transformers' own Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE on tiny random models."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="moekit.interop tests need Hugging Face transformers")

from moekit.interop import (  # noqa: E402 - after the importorskip
    UnsupportedModelError,
    WeightMismatchError,
    accelerate,
    export_hf,
    load_hf,
)

TOL = 1e-4
COMMON = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)


def _configs(**extra):
    common = {**COMMON, **extra}
    return {
        "mixtral": transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, rope_theta=1e6),
        "qwen2_moe": transformers.Qwen2MoeConfig(
            **common,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            norm_topk_prob=False,
        ),
        "qwen3_moe": transformers.Qwen3MoeConfig(
            **common, intermediate_size=64, moe_intermediate_size=24, head_dim=8, num_experts=6, norm_topk_prob=True
        ),
        "olmoe": transformers.OlmoeConfig(**common, intermediate_size=24, num_experts=4, norm_topk_prob=False),
        # GLM-4.5's MoE: sigmoid routing with a correction bias in 2 groups, a shared expert, qk-norm,
        # q/k/v bias, a dense first layer, a routed scaling factor
        "glm4_moe": transformers.Glm4MoeConfig(  # one more layer: two MoE layers after the dense one
            **{**common, "num_hidden_layers": common["num_hidden_layers"] + 1},
            intermediate_size=64,
            moe_intermediate_size=24,
            n_routed_experts=4,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            use_qk_norm=True,
            attention_bias=True,
            head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0},
        ),
    }


def build(family, seed=0, **overrides):
    cfg = _configs(**{k: overrides.pop(k) for k in ("num_hidden_layers",) if k in overrides})[
        family
    ]  # constructor-only
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():  # fused expert tensors may be left uninitialised
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05 if p.dim() > 1 else 0.02)
        for name, b in model.named_buffers():  # GLM-4.5's selection bias: one that changes the routing
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    return model.eval()


def ids(seed=1, B=2, S=12):
    return torch.randint(0, 100, (B, S), generator=torch.Generator().manual_seed(seed))


def maxdiff(a, b):
    return (a - b).abs().max().item()


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_load_export_roundtrip(family, tmp_path):
    hf = build(family)
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
    hf.save_pretrained(tmp_path / "hf")
    mk = load_hf(tmp_path / "hf")
    with torch.no_grad():
        got = mk(x).logits
    assert maxdiff(got, ref) <= TOL
    mk2 = load_hf(hf)  # in-memory model
    with torch.no_grad():
        assert maxdiff(mk2(x).logits, ref) <= TOL
    export_hf(mk, tmp_path / "out", family)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # no family default outside the vocabulary
        token = getattr(back.config, name, None)
        assert token is None or 0 <= token < mk.cfg.vocab_size, (name, token)
    with torch.no_grad():
        assert maxdiff(back(x).logits, ref) <= TOL


def test_tied_sparse_step_and_shards(tmp_path):
    hf = build("qwen3_moe", tie_word_embeddings=True, decoder_sparse_step=2)
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    mk = load_hf(tmp_path / "sharded")
    assert mk.head is None and not mk.cfg.is_moe_layer(0) and mk.cfg.is_moe_layer(1)
    with torch.no_grad():
        assert maxdiff(mk(x).logits, ref) <= TOL
    export_hf(mk, tmp_path / "out", "qwen3_moe")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert maxdiff(back(x).logits, ref) <= TOL


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("backend", ["grouped", "loop"])
def test_accelerate_shares_weights(family, backend):
    hf = build(family)
    x = ids(B=2, S=16)
    with torch.no_grad():
        ref = hf(x).logits
    experts = hf.model.layers[0].mlp.experts
    ptrs = {n: p.data_ptr() for n, p in hf.named_parameters()}
    accelerate(hf, backend=backend)
    blk = hf.model.layers[0].mlp
    assert type(blk).__name__ == "AcceleratedMoEBlock"
    assert blk.experts is experts and blk.moe_experts.w_up.data_ptr() == experts.gate_up_proj.data_ptr()
    assert {n: p.data_ptr() for n, p in hf.named_parameters()} == ptrs  # same Parameters, nothing copied
    with torch.no_grad():
        assert maxdiff(hf(x).logits, ref) <= TOL
        experts.down_proj.mul_(2.0)  # a change to the shared tensor is seen
        assert maxdiff(hf(x).logits, ref) > TOL


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_accelerate_gradients_match(family):
    ref, acc = build(family), accelerate(build(family))
    x = ids()
    for m in (ref, acc):
        m(x).logits.square().mean().backward()
    grads = dict(ref.named_parameters())
    for name, p in acc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        want = grads[name].grad
        assert maxdiff(p.grad, want) <= 1e-5 * want.abs().max().item() + 1e-10, name  # measured <= 7e-7 relative


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*mixtral.*qwen2_moe.*qwen3_moe.*olmoe"):
        load_hf(tmp_path)
    with pytest.raises(UnsupportedModelError, match="llama"):
        accelerate(
            transformers.LlamaForCausalLM(
                transformers.LlamaConfig(
                    vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
                )
            )
        )


def test_qwen2_without_qkv_bias(tmp_path):
    hf = build("qwen2_moe", qkv_bias=False)
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        mk = load_hf(hf)
        assert not mk.cfg.attn_bias and maxdiff(mk(x).logits, ref) <= TOL
        export_hf(mk, tmp_path, "qwen2_moe")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert maxdiff(back(x).logits, ref) <= TOL


def test_unsupported_options():
    with pytest.raises(UnsupportedModelError, match="sliding"):
        load_hf(build("mixtral", sliding_window=8))
    with pytest.raises(UnsupportedModelError, match="clip_qkv"):
        load_hf(build("olmoe", clip_qkv=3.0))


def test_missing_and_mismatched_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = build("mixtral")
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    for key in ("model.layers.1.block_sparse_moe.experts.2.w3.weight", "model.layers.0.self_attn.k_proj.weight"):
        bad = dict(sd)
        del bad[key]
        save_file(bad, path)
        with pytest.raises(WeightMismatchError, match="missing tensor.*" + key.replace(".", r"\.")):
            load_hf(tmp_path)
    bad = dict(sd)
    key = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    bad[key] = bad[key][:, :20].contiguous()
    save_file(bad, path)
    with pytest.raises(
        WeightMismatchError, match=key.replace(".", r"\.") + r".*expected shape \(32, 48\), got \(32, 20\)"
    ):
        load_hf(tmp_path)
    bad = dict(sd)
    bad["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(32, 31)
    save_file(bad, path)
    with pytest.raises(
        WeightMismatchError, match=r"blocks\.0\.attn\.wo\.weight.*expected shape \(32, 32\), got \(32, 31\)"
    ):
        load_hf(tmp_path)
    bad = dict(sd)
    bad["model.layers.0.mlp.extra"] = torch.zeros(3)
    save_file(bad, path)
    with pytest.raises(WeightMismatchError, match=r"unexpected tensor.*model\.layers\.0\.mlp\.extra"):
        load_hf(tmp_path)


def test_export_rejects_incompatible(tmp_path):
    from moekit.config import LMConfig, MoEConfig
    from moekit.models.lm import MoETransformer

    m = MoETransformer(
        LMConfig(
            vocab_size=50,
            dim=32,
            n_layers=1,
            n_heads=4,
            moe=MoEConfig(dim=32, hidden_dim=16, num_experts=4, router="sigmoid"),
        )
    )
    with pytest.raises(UnsupportedModelError, match="router='sigmoid'"):
        export_hf(m, tmp_path, "mixtral")
    with pytest.raises(UnsupportedModelError, match="unsupported family 'gpt2'"):
        export_hf(m, tmp_path, "gpt2")


def _randomize(module, seed=0, std=0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            p.normal_(0.0, std)
    return module.eval()


@pytest.mark.parametrize("norm", [True, False])
def test_deepseek_v3_block(norm):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from moekit.interop import deepseek_v3_moe

    cfg = transformers.DeepseekV3Config(
        hidden_size=32,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        n_shared_experts=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm,
    )
    block = _randomize(DeepseekV3MoE(cfg))
    block.gate.e_score_correction_bias.normal_(0.0, 0.3)  # makes selection differ from the raw scores
    moe = deepseek_v3_moe(block, cfg)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        assert maxdiff(moe(x).out, block(x)) <= 1e-5


def test_gpt_oss_block():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from moekit.interop import gpt_oss_moe

    cfg = transformers.GptOssConfig(
        hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, swiglu_limit=0.08
    )  # a small limit so that the clamps are exercised
    cfg._experts_implementation = "eager"
    block = _randomize(GptOssMLP(cfg), std=0.1)
    moe = gpt_oss_moe(block, cfg)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        ref = block(x)[0]
        assert maxdiff(moe(x).out, ref) <= 1e-5


def test_accelerate_router_jitter_in_training():
    hf = build("mixtral", router_jitter_noise=0.2).train()
    x = ids()
    torch.manual_seed(5)
    with torch.no_grad():
        ref = hf(x).logits
        accelerate(hf)
        torch.manual_seed(5)
        assert maxdiff(hf(x).logits, ref) <= TOL  # the same jitter draws
        hf.eval()
        assert maxdiff(hf(x).logits, ref) > TOL  # and no jitter in eval


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_accelerated_model_keeps_state_dict_save_and_router_logits(family, tmp_path):
    """After accelerate(): the same state-dict keys, save_pretrained/from_pretrained round-trips, and the
    load-balancing loss from output_router_logits equals transformers' (its router hooks still fire)."""
    import copy

    ref = build(family)
    acc = accelerate(copy.deepcopy(ref))
    assert set(acc.state_dict()) == set(ref.state_dict())
    x = ids()
    r_ref = ref(x, labels=x, output_router_logits=True)
    r_acc = acc(x, labels=x, output_router_logits=True)
    assert maxdiff(r_acc.logits, r_ref.logits) <= TOL
    assert r_acc.aux_loss.item() == pytest.approx(r_ref.aux_loss.item(), abs=1e-5)
    assert len(r_acc.router_logits) == len(r_ref.router_logits) == 2  # output_router_logits is preserved
    for got, want in zip(r_acc.router_logits, r_ref.router_logits):
        assert got.shape == want.shape and maxdiff(got, want) <= 1e-5
    acc.save_pretrained(tmp_path / "acc")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "acc").eval()
    assert maxdiff(back(x).logits, r_ref.logits) <= TOL


def _eager_bf16(family, **overrides):
    hf = build(family, **overrides)
    hf.set_experts_implementation("eager")
    return hf.to(torch.bfloat16)


def _assert_bf16_close(got, ref):
    """bf16 agreement: at most 1% of the elements differ, by at most one rounding step of the
    largest output (before routing weights were combined in transformers' order, ~half differed)."""
    assert got.dtype == ref.dtype == torch.bfloat16
    mismatched = (got != ref).float().mean().item()
    assert mismatched <= 0.01, mismatched
    assert maxdiff(got.float(), ref.float()) <= 2.0**-8 * ref.float().abs().max().item()


@pytest.mark.parametrize(
    "family,overrides", [("mixtral", {}), ("qwen2_moe", {}), ("olmoe", {}), ("qwen3_moe", {"num_experts_per_tok": 3})]
)
def test_accelerate_bf16_matches_eager(family, overrides):
    """In bf16 the accelerated block equals transformers' eager block (routing weights multiplied in
    the router's dtype, each product rounded, a token's slots summed in ascending expert id)."""
    import copy

    ref = _eager_bf16(family, **overrides)
    acc = accelerate(copy.deepcopy(ref), backend="grouped")
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = ids(B=2, S=16)
    with torch.no_grad():
        for i in range(2):
            _assert_bf16_close(acc.model.layers[i].mlp(h), ref.model.layers[i].mlp(h))
        _assert_bf16_close(acc(x).logits, ref(x).logits)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_accelerate_activations(family, act):
    """Every ACT2FN activation (transformers' own test configs use gelu) runs accelerated, equal to
    transformers' eager experts in fp32 and in bf16."""
    import copy

    ref = build(family, hidden_act=act)
    ref.set_experts_implementation("eager")
    acc = accelerate(copy.deepcopy(ref), backend="grouped")
    x = ids()
    with torch.no_grad():
        assert maxdiff(acc(x).logits, ref(x).logits) <= TOL
        ref, acc = ref.to(torch.bfloat16), acc.to(torch.bfloat16)
        _assert_bf16_close(acc(x).logits, ref(x).logits)
    assert type(acc.model.layers[0].mlp.experts.act_fn).__name__ == type(transformers.activations.ACT2FN[act]).__name__


def test_accelerate_triton_needs_a_fused_activation():
    with pytest.raises(ValueError, match="triton.*hidden_act='gelu_new'.*'grouped'"):
        accelerate(build("olmoe", hidden_act="gelu_new"), backend="triton")


def test_set_experts_implementation_after_accelerate():
    """A later set_experts_implementation() is honoured (with a warning): the blocks run transformers'
    original block with that implementation; accelerate() again returns to moekit's path."""
    import copy
    import warnings

    ref = build("mixtral").to(torch.bfloat16)
    ref.set_experts_implementation("eager")
    acc = accelerate(copy.deepcopy(ref), backend="loop")
    calls = []
    acc.model.layers[0].mlp.experts.register_forward_hook(lambda *a: calls.append(1))
    x = ids()
    with torch.no_grad():
        want = ref(x).logits
        acc(x)
        assert not calls  # moekit's path: transformers' experts module is not called
        acc.set_experts_implementation("grouped_mm")
        with pytest.warns(UserWarning, match="set to 'grouped_mm' after accelerate"):
            acc(x)
        assert calls
        ref.set_experts_implementation("grouped_mm")
        assert torch.equal(acc(x).logits, ref(x).logits)  # transformers' grouped_mm path, bit for bit
        acc.set_experts_implementation("eager")
        with pytest.warns(UserWarning, match="'eager'"):
            assert torch.equal(acc(x).logits, want)
        calls.clear()
        accelerate(acc)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            acc(x)
        assert not calls


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("mixtral", {"router_aux_loss_coef": 0.02}),
        (
            "qwen2_moe",
            {"router_aux_loss_coef": 0.03, "num_hidden_layers": 4, "decoder_sparse_step": 2},
        ),  # 2 MoE of 4 layers
        ("qwen3_moe", {"router_aux_loss_coef": 0.05, "num_experts_per_tok": 3}),
        ("olmoe", {}),  # router_aux_loss_coef from the config class's default (0.01)
    ],
)
def test_training_losses_equal_transformers(family, overrides, tmp_path):
    """load_hf(..., training_losses=True) (what `moekit train --init-from` fine-tunes) adds exactly
    transformers' router_aux_loss_coef * aux_loss (output_router_logits=True): same value, same
    gradient on every router, no other auxiliary term."""
    hf = build(family, **overrides).train()
    with torch.no_grad():  # a skewed router, so that the balance loss is far from its uniform value
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.add_(0.3 * torch.randn_like(layer.mlp.gate.weight))
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if family == "olmoe":
        del cfg["router_aux_loss_coef"]
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    coef = hf.config.router_aux_loss_coef
    mk = load_hf(tmp_path, training_losses=True).train()
    assert mk.cfg.moe.z_loss_weight == 0 and mk.cfg.balance_pooling == "model"
    x = ids(B=3, S=16)
    ref = hf(x, output_router_logits=True)
    want = coef * ref.aux_loss
    got = mk(x)
    assert maxdiff(got.logits, ref.logits) <= TOL
    assert got.aux_loss.item() == pytest.approx(want.item(), abs=1e-5, rel=1e-5)
    assert sum(r.aux_loss.item() for r in got.moe if r is not None) == 0.0  # nothing per layer
    want.backward()
    got.aux_loss.backward()
    moe_layers = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
    assert len(moe_layers) == len(mk.moe_layers) == len(ref.router_logits)
    for i in moe_layers:
        g_ref = hf.model.layers[i].mlp.gate.weight.grad
        g_mk = mk.blocks[i].ffn.router.linear.weight.grad
        assert maxdiff(g_mk, g_ref) <= 1e-5 * g_ref.abs().max().item() + 1e-9, i
    # without training_losses: no auxiliary loss at all (logits only)
    assert float(load_hf(tmp_path)(x).aux_loss) == 0.0


@pytest.mark.parametrize("bad", [-0.1, "0.01", float("nan")])
def test_training_losses_bad_coefficient(bad, tmp_path):
    build("mixtral").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["router_aux_loss_coef"] = bad
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="router_aux_loss_coef must be a finite number >= 0"):
        load_hf(tmp_path, training_losses=True)
    load_hf(tmp_path)  # not read without training_losses
