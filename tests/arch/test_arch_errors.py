"""Argument checking and edge cases of the architecture modules."""
import pytest
import torch

from moekit import HierarchicalMoE, MultiGateMoE, SoftMoE
from moekit.models.vit import ViTConfig


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoE(8, 8, 2, 0)
    with pytest.raises(ValueError, match="expert must be"):
        SoftMoE(8, 8, 2, 1, expert="tanh")
    with pytest.raises(ValueError, match="num_tasks"):
        MultiGateMoE(4, 4, 2, 0, 4)
    with pytest.raises(ValueError, match="importance_loss_weight"):
        HierarchicalMoE(8, 8, 2, 2, importance_loss_weight=-1.0)
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="ffn"):
        ViTConfig(ffn="sparse")


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch, tokens, dim"):
        SoftMoE(8, 8, 2, 1)(torch.randn(4, 8))  # Soft MoE needs sequences: it mixes over their tokens
    with pytest.raises(ValueError, match="in_dim"):
        MultiGateMoE(4, 4, 2, 2, 4)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="dim=8"):
        HierarchicalMoE(8, 8, 2, 2)(torch.randn(3, 7))


def test_empty_inputs():
    res = HierarchicalMoE(8, 8, 2, 2)(torch.randn(0, 8))
    assert res.out.shape == (0, 8) and float(res.aux_loss) == 0.0
    assert SoftMoE(8, 8, 2, 1)(torch.randn(2, 0, 8)).out.shape == (2, 0, 8)


def test_config_objects():
    from moekit import HierarchicalMoEConfig, MultiGateMoEConfig, SoftMoEConfig

    cfg = SoftMoEConfig(dim=8, hidden_dim=8, num_experts=2)
    assert SoftMoE(cfg).cfg is cfg and SoftMoE(cfg=cfg).cfg is cfg
    assert SoftMoE(8, 8, 2).cfg == cfg
    assert HierarchicalMoE(cfg=HierarchicalMoEConfig(8, 8, 2, 2)).num_experts == 4
    assert MultiGateMoE(MultiGateMoEConfig(4, 4, 2, 2, 4)).num_tasks == 2
    assert SoftMoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match="not both"):
        SoftMoE(cfg, dim=8)
    with pytest.raises(TypeError, match="SoftMoEConfig"):
        SoftMoE(cfg=MultiGateMoEConfig(4, 4, 2, 2, 4))
    with pytest.raises(ValueError, match="top_k_experts"):
        HierarchicalMoEConfig(8, 8, 2, 2, top_k_experts=3)
    with pytest.raises(ValueError, match="backend"):
        SoftMoEConfig(8, 8, 2, backend="cuda")
