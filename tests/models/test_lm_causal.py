"""The language model is causal with every MoE setting it accepts: changing the tokens at positions
>= p of a sequence leaves that sequence's logits at positions < p unchanged, in eval and in train
mode. The settings that would break it (expert choice, Zhou et al. 2022; capacity limits whose
drops a later token can cause) are refused with a one-line ValueError naming the reason, and the
refused ones are shown to be really non-causal when forced into the model.

(Capacity is decided over the whole batch in token order, sequence after sequence: a sequence's
drops may depend on the sequences before it in the batch. That is not a look into its own future,
so each check changes one sequence and reads that sequence.)
"""

from typing import Optional

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.cli import main
from moekit.config import ROUTER_KINDS, LMConfig
from moekit.layer import router as router_module
from moekit.models.lm import MoETransformer

V, S, B, P = 48, 20, 3, 11  # vocabulary, sequence length, batch, first changed position

ACCEPTED = {
    "topk": dict(router="topk", top_k=2),
    "topk-shared-gated": dict(router="topk", top_k=2, num_shared_experts=1, shared_expert_gate=True),
    "noisy_topk": dict(router="noisy_topk", top_k=2, router_jitter=0.1),
    "switch": dict(router="switch", top_k=1, renormalize=False),
    "hash": dict(router="hash", top_k=1),
    "random": dict(router="random", top_k=2),
    "sigmoid": dict(router="sigmoid", top_k=2),
    "sigmoid-groups": dict(router="sigmoid", top_k=2, num_groups=2, topk_groups=1),
    # top-1 capacity, kept in token order: a token competes only with the tokens before it
    "switch-capacity": dict(router="switch", top_k=1, renormalize=False, capacity_factor=0.5),
    "switch-capacity-eval": dict(
        router="switch", top_k=1, renormalize=False, capacity_factor=0.75, eval_capacity_factor=0.5
    ),
    "topk1-capacity": dict(router="topk", top_k=1, renormalize=False, capacity_factor=0.5),
    "sigmoid1-capacity": dict(router="sigmoid", top_k=1, renormalize=False, capacity_factor=0.5),
    "hash-capacity": dict(router="hash", top_k=1, capacity_factor=0.5),
    "hash-capacity-score": dict(router="hash", top_k=1, capacity_factor=0.5, capacity_priority="score"),
}

REFUSED = {
    "expert_choice": (dict(router="expert_choice", top_k=2), "expert_choice"),
    "expert_choice-capacity": (dict(router="expert_choice", top_k=1, capacity_factor=1.0), "expert_choice"),
    "topk2-capacity": (dict(router="topk", top_k=2, capacity_factor=0.5), "top_k=2"),
    "sigmoid2-eval-capacity": (dict(router="sigmoid", top_k=2, eval_capacity_factor=0.5), "top_k=2"),
    "noisy_topk-capacity": (dict(router="noisy_topk", top_k=2, capacity_factor=0.5), "top_k=2"),
    "random-capacity": (dict(router="random", top_k=2, capacity_factor=0.5), "top_k=2"),
    "switch-reroute": (
        dict(router="switch", top_k=1, renormalize=False, capacity_factor=0.5, overflow="reroute"),
        "reroute",
    ),
    "switch-score": (
        dict(router="switch", top_k=1, renormalize=False, capacity_factor=0.5, capacity_priority="score"),
        "score",
    ),
}


def _moe_cfg(**kw) -> MoEConfig:
    return MoEConfig(dim=32, hidden_dim=16, num_experts=4, router_dtype="float64", **kw)


def _lm_cfg(moe: Optional[MoEConfig]) -> LMConfig:
    return LMConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, max_seq_len=S, moe=moe)


def _model(moe_kw: dict) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(_lm_cfg(_moe_cfg(**moe_kw))).double()


def _worst_leak(model: MoETransformer, train: bool) -> float:
    """Largest change of a sequence's logits at positions < P when its tokens at >= P change (one
    sequence at a time; the same random draws for both forwards: noise, jitter, GShard's dispatch)."""
    model.train(train)
    g = torch.Generator().manual_seed(1)
    idx_BS = torch.randint(0, V, (B, S), generator=g)
    torch.manual_seed(5)
    logits_BSV = model(idx_BS).logits
    worst = 0.0
    for b in range(B):
        changed_BS = idx_BS.clone()
        changed_BS[b, P:] = (idx_BS[b, P:] + torch.randint(1, V, (S - P,), generator=g)) % V  # every one differs
        torch.manual_seed(5)
        other_BSV = model(changed_BS).logits
        assert not torch.equal(other_BSV[b, P:], logits_BSV[b, P:])  # the change reached the model
        worst = max(worst, float((other_BSV[b, :P] - logits_BSV[b, :P]).abs().max().detach()))
    return worst


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_settings_keep_the_model_causal(name, train):
    model = _model(ACCEPTED[name])
    assert _worst_leak(model, train) <= 1e-12
    if model.cfg.moe.capacity_factor_for(train) is not None:  # the capacity really drops tokens here
        model.train(train)
        res = model(torch.randint(0, V, (B, S))).moe[0]
        assert float(res.stats["dropped_fraction"]) > 0


@pytest.mark.parametrize("name", list(REFUSED))
def test_non_causal_settings_are_refused_with_the_reason(name):
    kw, words = REFUSED[name]
    moe = _moe_cfg(**kw)
    with pytest.raises(ValueError, match="causal language model") as err:
        _lm_cfg(moe)
    assert words in str(err.value) and "\n" not in str(err.value)
    cfg = _lm_cfg(None)
    with pytest.raises(ValueError, match="causal language model"):
        cfg.moe = moe  # refused by the config's assignment check, or else by the model
        MoETransformer(cfg)


def test_a_moe_config_changed_inside_the_lm_config_is_refused_by_the_model():
    """Assigning a field of ``cfg.moe`` checks the MoEConfig alone; the model checks the LM's rule."""
    for field, value in (("router", "expert_choice"), ("capacity_factor", 0.5)):
        cfg = _lm_cfg(_moe_cfg(**ACCEPTED["topk"]))
        setattr(cfg.moe, field, value)
        with pytest.raises(ValueError, match="causal language model cannot use this MoE layer"):
            MoETransformer(cfg)


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_settings_are_really_non_causal(name):
    """The reference for the refusals: forced into the model (its MoE layers replaced after it was
    built), each refused setting changes earlier logits when later tokens change."""
    model = _model(ACCEPTED["topk"])
    torch.manual_seed(0)
    for block in model.blocks:
        block.ffn = MoE(_moe_cfg(**REFUSED[name][0])).double()
    assert max(_worst_leak(model, False), _worst_leak(model, True)) > 1e-6


def test_a_per_call_top_k_that_breaks_causality_is_refused():
    """A top-1 capacity model asked for 2 experts per token (forward or generate) would drop by
    later tokens: refused. Fewer experts on a dropless model stays allowed."""
    model = _model(ACCEPTED["switch-capacity-eval"]).eval()
    idx = torch.randint(0, V, (1, 5))
    with pytest.raises(ValueError, match="top_k=2"):
        model(idx, top_k=2)
    with pytest.raises(ValueError, match="top_k=2"):
        model.generate(idx, 2, top_k_experts=2)
    assert model(idx, top_k=1).logits.shape == (1, 5, V)
    dropless = _model(ACCEPTED["topk"]).eval()
    assert dropless(idx, top_k=1).logits.shape == (1, 5, V)


def test_a_registered_router_that_looks_at_the_whole_batch_is_refused():
    class WholeBatch(router_module.ExpertChoiceRouter):
        pass

    router_module.register_router("test_whole_batch", WholeBatch)
    try:
        with pytest.raises(ValueError, match="causal language model cannot use router 'test_whole_batch'"):
            MoETransformer(_lm_cfg(_moe_cfg(router="test_whole_batch", top_k=2)))
    finally:
        del router_module.ROUTERS["test_whole_batch"]
        ROUTER_KINDS.remove("test_whole_batch")


def test_cli_reports_the_refusal_in_one_line(capsys, tmp_path):
    rc = main(["train", "--out", str(tmp_path), "--set", "model.moe.router=expert_choice"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("moekit train: error: moe: a causal language model cannot use this MoE layer")
    assert "expert_choice" in err and not any(tmp_path.iterdir())
