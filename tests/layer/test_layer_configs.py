"""The config objects of SoftMoE, HierarchicalMoE and MultiGateMoE: built like MoEConfig, accepted
as ``cfg`` (or built from the old keyword arguments), validated, round-tripped through dicts."""

import pytest

from moekit import HierarchicalMoE, HierarchicalMoEConfig, MultiGateMoE, MultiGateMoEConfig, SoftMoE, SoftMoEConfig


def test_config_objects():
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
