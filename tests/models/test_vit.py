"""V-MoE: Batch Prioritized Routing through the MoE layer, and the small ViT."""

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig
from moekit.models.vit import VisionTransformer, ViTConfig, patchify


def _bpr_moe(top_k):
    cfg = MoEConfig(
        dim=8,
        hidden_dim=8,
        num_experts=4,
        top_k=top_k,
        expert="gelu",
        renormalize=False,
        capacity_factor=0.5,
        capacity_priority="score",
    )
    return MoE(cfg).double()


@pytest.mark.parametrize("top_k", [1, 2])
def test_bpr_drops_the_lowest_priority_tokens_first(top_k):
    moe = _bpr_moe(top_k)
    x = torch.randn(64, 8, dtype=torch.float64)
    probs = moe.router.linear(x).softmax(-1)
    top_w, top_e = probs.topk(top_k, dim=-1)
    prio = top_w[:, 0]  # a token's priority: its top gate weight
    kept = moe(x).experts_TK  # after capacity; E marks a dropped slot
    E = 4
    for e in range(E):
        for k in range(top_k):
            wanted = top_e[:, k] == e
            got = kept[:, k] == e
            assert (got <= wanted).all()
            if (wanted & ~got).any() and got.any():
                # every kept k-th choice outranks every dropped k-th choice of this expert
                assert prio[got].min() >= prio[wanted & ~got].max()
        if top_k == 2 and (kept[:, 1] == e).any():
            # all first choices go before any second choice
            assert ((top_e[:, 0] == e) <= (kept[:, 0] == e)).all()
    C = int(-(-0.5 * 64 * top_k // E))  # ceil(cf * T * K / E)
    assert all(int((kept == e).sum()) <= C for e in range(E))
    assert (kept < E).sum() < 64 * top_k  # capacity < 1 drops something


def test_patchify_row_major():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (1, 4, 4)
    assert p[0, 0].tolist() == [0, 1, 4, 5] and p[0, 1].tolist() == [2, 3, 6, 7]


@pytest.mark.parametrize("ffn", ["moe", "soft", "dense"])
def test_vit_forward_backward(ffn):
    cfg = ViTConfig(dim=16, depth=2, heads=2, mlp_hidden=16, ffn=ffn, soft_experts=4)
    model = VisionTransformer(cfg)
    res = model(torch.randn(5, 1, 8, 8))
    assert res.logits.shape == (5, 10)
    assert len(res.moe) == (0 if ffn == "dense" else 1)
    (F.cross_entropy(res.logits, torch.arange(5)) + res.aux_loss).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "blocks.1.mlp" in n or "head" in n)
    assert model.flops_per_image(res, 5) > 0


def test_inference_sweep_changes_kept_slots_and_flops():
    model = VisionTransformer(ViTConfig(dim=16, depth=2, heads=2, mlp_hidden=16)).eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        full = model(x, top_k=2, capacity_factor=1.5)
        cheap = model(x, top_k=1, capacity_factor=0.25)
    assert cheap.moe[0].stats["tokens_per_expert"].sum() < full.moe[0].stats["tokens_per_expert"].sum()
    assert model.flops_per_image(cheap, 8) < model.flops_per_image(full, 8)


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:256], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target[:256])
    model = VisionTransformer(ViTConfig(dim=32, depth=2, heads=2, mlp_hidden=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        idx = torch.arange(step * 32, step * 32 + 32) % 256
        res = model(x[idx])
        loss = F.cross_entropy(res.logits, y[idx]) + res.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_bad_config_arguments():
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="ffn"):
        ViTConfig(ffn="sparse")
