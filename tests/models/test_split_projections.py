"""The attention's q/k/v and the dense FFN's gate/up projections are separate tensors (so a
tensor-parallel layout can shard each by heads or hidden units); checkpoints written with the
former fused layout (``attn.wqkv``; ``w_up`` holding [gate | up]) still load to the same model."""

import pytest
import torch

from moekit import FeedForward, MoEConfig
from moekit.config import LMConfig
from moekit.models import MoETransformer


def _fused_state(model: MoETransformer) -> dict:
    """The model's state dict in the layout moekit wrote before the split."""
    sd = dict(model.state_dict())
    for key in [k for k in sd if k.endswith("attn.wq.weight") or k.endswith("attn.wq.bias")]:
        prefix, kind = key.rsplit("wq.", 1)
        sd[prefix + f"wqkv.{kind}"] = torch.cat([sd.pop(prefix + f"w{n}.{kind}") for n in "qkv"], 0)
    for key in [k for k in sd if k.endswith("w_gate")]:
        prefix = key[: -len("w_gate")]
        sd[prefix + "w_up"] = torch.cat([sd.pop(key), sd[prefix + "w_up"]], 1)
    return sd


@pytest.mark.parametrize("attn_bias", [False, True])
def test_a_checkpoint_in_the_fused_layout_loads_to_the_same_model(attn_bias):
    torch.manual_seed(0)
    moe = MoEConfig(dim=32, hidden_dim=16, num_experts=4, top_k=2, num_shared_experts=1)
    cfg = LMConfig(
        vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16, moe=moe,
        moe_every=2, attn_bias=attn_bias,
    )  # fmt: skip
    model = MoETransformer(cfg).eval()
    old = _fused_state(model)
    assert any(k.endswith("attn.wqkv.weight") for k in old) and not any(k.endswith("w_gate") for k in old)
    torch.manual_seed(1)
    fresh = MoETransformer(cfg).eval()
    fresh.load_state_dict(old)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_fused_attention_tensor_of_another_size_is_reported_not_split():
    cfg = LMConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=16)
    sd = _fused_state(MoETransformer(cfg))
    sd["blocks.0.attn.wqkv.weight"] = torch.zeros(5, 32)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*blocks\.0\.attn\.wqkv\.weight"):
        MoETransformer(cfg).load_state_dict(sd)


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "gelu"])
def test_dense_ffn_equals_the_experts_fused_form_with_gradients(kind):
    torch.manual_seed(0)
    ffn = FeedForward(12, 20, kind).double()
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    up = ffn.fused_up.detach().clone().requires_grad_(True)
    down = ffn.w_down.detach().clone().requires_grad_(True)
    from moekit.layer.experts import ACTIVATIONS

    want = ACTIVATIONS[kind](x @ up) @ down
    got = ffn(x)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    (gx_got,) = torch.autograd.grad(got, x, g, retain_graph=True)
    gx_want, g_up, g_down = torch.autograd.grad(want, (x, up, down), g)
    torch.testing.assert_close(gx_got, gx_want)
    ffn.zero_grad()
    got.backward(g)
    got_up = ffn.w_up.grad if ffn.w_gate is None else torch.cat([ffn.w_gate.grad, ffn.w_up.grad], 1)
    torch.testing.assert_close(got_up, g_up)
    torch.testing.assert_close(ffn.w_down.grad, g_down)


def test_a_checkpoint_file_in_the_fused_layout_reads_into_the_model(tmp_path):
    """Run folders written before the split (single-file checkpoints) still generate, inspect and
    load: read tensor by tensor (read_model_into) or whole (load_checkpoint), the same model; their
    optimizer state cannot resume, said by name."""
    from moekit.train.checkpoint import CheckpointError, load_checkpoint, read_model_into, save_checkpoint

    torch.manual_seed(0)
    moe = MoEConfig(dim=32, hidden_dim=16, num_experts=4, top_k=2, num_shared_experts=1)
    cfg = LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, moe=moe,
                   first_dense_layers=1, attn_bias=True)  # fmt: skip
    model = MoETransformer(cfg).eval()
    path = tmp_path / "old.safetensors"
    save_checkpoint(path, None, model_state=_fused_state(model), meta={"step": 3})
    ids = torch.randint(0, 64, (2, 9))
    for read in (lambda m: read_model_into(path, m), lambda m: load_checkpoint(path, m)):
        torch.manual_seed(1)
        fresh = MoETransformer(cfg).eval()
        read(fresh)
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match="optimizer state does not resume"):
        load_checkpoint(path, MoETransformer(cfg), opt)


def _module_of(sd: dict) -> torch.nn.Module:
    """A module whose state dict is ``sd`` (each tensor a buffer at its dotted path)."""
    root = torch.nn.Module()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_buffer(leaf, t.clone())
    return root


def test_a_sharded_checkpoint_in_the_fused_layout_loads_into_the_model(tmp_path):
    """A DCP folder (what torchrun runs write) from before the split: one process loads its
    weights into today's model; its optimizer state is refused by name."""
    from moekit.train.checkpoint import CheckpointError
    from moekit.train.distcp import load_distributed, save_distributed

    torch.manual_seed(0)
    moe = MoEConfig(dim=32, hidden_dim=16, num_experts=4, top_k=2, num_shared_experts=1)
    cfg = LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16, moe=moe, first_dense_layers=1)
    model = MoETransformer(cfg).eval()
    path = tmp_path / "old.dcp"
    save_distributed(path, _module_of(_fused_state(model)), None, None, meta={"step": 1})
    torch.manual_seed(1)
    fresh = MoETransformer(cfg).eval()
    load_distributed(path, fresh, None, None, rng=False)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="optimizer state does not resume"):
        load_distributed(path, fresh, torch.optim.AdamW(fresh.parameters()), None, rng=False)
