"""Config objects stay valid after construction (an assignment is checked like the constructor's
argument, with the same message), a layer keeps its own copy of the config it was built from, and
a layer given another layer's config says which config it takes (issue 22, items 10 and 11)."""

import copy
import dataclasses
import pickle

import pytest
import torch

from moekit import (
    HierarchicalMoE,
    HierarchicalMoEConfig,
    MoE,
    MoEConfig,
    MultiGateMoE,
    MultiGateMoEConfig,
    SoftMoE,
    SoftMoEConfig,
)
from moekit.config import LMConfig, TrainConfig
from moekit.models.vit import ViTConfig

MOE = dict(dim=8, hidden_dim=16, num_experts=4, top_k=2)
SOFT = dict(dim=8, hidden_dim=8, num_experts=2)
HIER = dict(dim=8, hidden_dim=8, num_groups=2, experts_per_group=2)
MMOE = dict(in_dim=4, expert_dim=4, num_experts=2, num_tasks=2, tower_hidden=4)
LM = dict(vocab_size=32, dim=16, n_layers=1, n_heads=2)

# (config class, valid arguments, field, a bad value for it)
BAD_ASSIGNMENTS = [
    (MoEConfig, MOE, "router", "bogus"),
    (MoEConfig, MOE, "dim", -3),
    (MoEConfig, MOE, "top_k", 5),  # > num_experts
    (MoEConfig, MOE, "renormalize", "False"),
    (MoEConfig, MOE, "capacity_factor", float("nan")),
    (MoEConfig, MOE, "num_groups", 2),  # without topk_groups
    (MoEConfig, {**MOE, "top_k": 1}, "router", "random"),  # GShard's random router needs top_k >= 2
    (SoftMoEConfig, SOFT, "slots_per_expert", 0),
    (SoftMoEConfig, SOFT, "backend", "cuda"),
    (HierarchicalMoEConfig, HIER, "top_k_experts", 3),
    (HierarchicalMoEConfig, HIER, "balance_loss_weight", float("inf")),
    (MultiGateMoEConfig, MMOE, "num_tasks", 0),
    (LMConfig, LM, "dim", 30),  # n_heads must divide it
    (LMConfig, LM, "qk_norm", "layer"),
    (TrainConfig, {}, "device", "foo"),
    (TrainConfig, {}, "lr", 0.0),
    (ViTConfig, {}, "ffn", "sparse"),
]


@pytest.mark.parametrize("cls, kwargs, name, bad", BAD_ASSIGNMENTS, ids=lambda v: getattr(v, "__name__", None))
def test_assignment_is_checked_with_the_constructors_message(cls, kwargs, name, bad):
    with pytest.raises(ValueError) as at_construction:
        cls(**{**kwargs, name: bad})
    cfg = cls(**kwargs)
    before = dataclasses.asdict(cfg)
    with pytest.raises(ValueError) as at_assignment:
        setattr(cfg, name, bad)
    assert str(at_assignment.value) == str(at_construction.value)
    assert "\n" not in str(at_assignment.value)
    assert dataclasses.asdict(cfg) == before, "a refused assignment leaves the config as it was"


def test_the_reported_assignments_fail_naming_the_field():
    cfg = MoEConfig(**MOE)
    with pytest.raises(ValueError, match=r"^router must be one of 'topk', .*; got 'bogus'$"):
        cfg.router = "bogus"  # was a bare KeyError when the layer was built
    with pytest.raises(ValueError, match=r"^dim must be a positive integer; got -3$"):
        cfg.dim = -3  # was torch's error when the layer was built
    cfg.top_k = 1  # a valid assignment goes through
    cfg.router = "switch"
    assert (cfg.top_k, cfg.router) == (1, "switch") and MoE(cfg).router.__class__.__name__ == "SwitchRouter"


def test_what_the_library_sets_itself_still_works():
    """Construction-time conversions and defaults, copies and pickles keep working and keep checking."""
    lm = LMConfig(**LM, moe={"dim": 16, "hidden_dim": 8})  # a dict section becomes its config in __post_init__
    assert isinstance(lm.moe, MoEConfig)
    assert LMConfig(**LM, moe={"hidden_dim": 8}).moe.dim == 16  # the MoE width follows the model's
    vit = ViTConfig()  # __post_init__ fills the default MoE
    assert vit.moe is not None and vit.moe.dim == vit.dim
    lm.moe = {"dim": 16, "hidden_dim": 4}  # an assigned dict section is converted as at construction
    assert isinstance(lm.moe, MoEConfig) and lm.moe.hidden_dim == 4
    cfg = MoEConfig(**MOE)
    for other in (
        dataclasses.replace(cfg, top_k=1),
        copy.copy(cfg),
        copy.deepcopy(cfg),
        pickle.loads(pickle.dumps(cfg)),
    ):
        with pytest.raises(ValueError, match="router must be one of"):
            other.router = "bogus"
    assert dataclasses.replace(cfg) == cfg and lm.dense_twin().moe is None
    assert set(vars(cfg)) == {f.name for f in dataclasses.fields(cfg)} and MoEConfig(**vars(cfg)) == cfg
    with pytest.raises(ValueError, match=r"moe\.dim must equal dim \(16\); got 8"):
        LMConfig(**LM, moe=MoEConfig(**MOE))  # set explicitly to another width: a clear error


def test_mutating_the_users_config_does_not_change_a_built_moe_layer():
    torch.manual_seed(0)
    cfg = MoEConfig(**MOE, z_loss_weight=0.0, renormalize=False)  # False: a top-1 layer is a valid reference
    moe = MoE(cfg).eval()
    x = torch.randn(3, 5, 8)
    before = moe(x)
    cfg.top_k = 1  # the user's object, after the layer was built
    cfg.balance_loss_weight = 0.5
    after = moe(x)
    torch.testing.assert_close(after.out, before.out)
    torch.testing.assert_close(after.aux_loss, before.aux_loss)
    assert (
        moe.cfg.top_k == 2
        and moe.router.cfg.top_k == 2
        and moe.cfg == MoEConfig(**MOE, z_loss_weight=0.0, renormalize=False)
    )
    # the reference: a layer built with top_k=1 and the same weights routes differently
    top1 = MoE(dataclasses.replace(moe.cfg, top_k=1)).eval()
    top1.load_state_dict(moe.state_dict())
    assert not torch.allclose(top1(x).out, before.out)


@pytest.mark.parametrize(
    "layer, wrong, right",
    [
        (SoftMoE, MoEConfig(**MOE), "SoftMoEConfig"),
        (HierarchicalMoE, MoEConfig(**MOE), "HierarchicalMoEConfig"),
        (MultiGateMoE, SoftMoEConfig(**SOFT), "MultiGateMoEConfig"),
        (SoftMoE, HierarchicalMoEConfig(**HIER), "SoftMoEConfig"),
        (MoE, SoftMoEConfig(**SOFT), "MoEConfig"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_a_layer_given_another_layers_config_says_which_it_takes(layer, wrong, right):
    for call in (lambda: layer(wrong), lambda: layer(cfg=wrong)):
        with pytest.raises(TypeError) as err:
            call()
        msg = str(err.value)
        assert f"{layer.__name__} takes cfg: a {right}" in msg and type(wrong).__name__ in msg, msg
        assert "positional" not in msg and "\n" not in msg, msg


def test_a_config_dict_in_place_of_the_config_is_a_clear_error():
    expected = r"^SoftMoE takes cfg: a SoftMoEConfig .*; got a dict; .*SoftMoEConfig\.from_dict"
    with pytest.raises(TypeError, match=expected):
        SoftMoE(dict(SOFT))
