"""Activation checkpointing of the LM's blocks (issue 25, item 9): the same loss, gradients and
routing bookkeeping as without it (the re-run in the backward counts nothing twice and draws the
same noise). Its memory is measured in benchmarks/ac_memory.py."""

from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig
from moekit.models.lm import MoETransformer
from moekit.train.run import default_model_config


def _cfg(kind: str):
    if kind == "noisy":  # router noise in training: the re-run must draw the same
        return default_model_config(moe=MoEConfig(dim=128, hidden_dim=64, router="noisy_topk", top_k=2))
    return default_model_config()  # sigmoid routing with its load bookkeeping, a shared expert


def _step(cfg, mode: str, compiled: bool = False):
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    model.activation_checkpointing = mode
    if compiled:  # each block, as parallelize(compile=True) does
        for block in model.blocks:
            block.compile()
    idx = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    out = model(idx[:, :-1], idx[:, 1:])
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, dict(model.named_buffers())


@pytest.mark.parametrize("kind", ["default", "noisy"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_blocks_give_the_same_step(kind, mode):
    cfg = _cfg(kind)
    ref, ref_grads, ref_buffers = _step(cfg, "none")
    out, grads, buffers = _step(cfg, mode)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.aux_loss, ref.aux_loss)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=0, atol=1e-7, msg=n)
    for n, b in buffers.items():  # expert usage, step counts, the sigmoid router's load: counted once
        assert torch.equal(b, ref_buffers[n]), n


def test_a_bad_mode_is_refused_by_name():
    from moekit.config import TrainConfig

    with pytest.raises(ValueError, match="activation_checkpointing"):
        TrainConfig(activation_checkpointing="some")


def test_train_with_activation_checkpointing_takes_the_same_steps(tmp_path, monkeypatch):
    """`moekit train --activation-checkpointing full|selective`: every logged step (loss, auxiliary
    loss, gradient norm, tokens per expert) equals the run without it."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from moekit.cli import main
    from tiny_run import tiny_args

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    rows = {}
    for mode in ("none", "full", "selective"):
        argv = ["train", "--out", str(tmp_path), "--name", mode, "--no-baseline", "--seed", "3"]
        assert main(argv + tiny_args(3, 3) + ["--activation-checkpointing", mode]) == 0
        lines = (tmp_path / mode / "moe" / "metrics.jsonl").read_text().splitlines()
        rows[mode] = [
            {
                k: v
                for k, v in json.loads(line).items()
                if k in ("step", "loss", "aux_loss", "grad_norm", "tokens_per_expert")
            }
            for line in lines
        ]
    assert rows["none"] and rows["full"] == rows["none"] and rows["selective"] == rows["none"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compiled_checkpointed_blocks_count_the_routing_once(mode):
    """Compiled blocks under activation checkpointing: a compiled graph holds its buffer updates
    unconditionally, so the recomputation counted expert usage, step counts and the sigmoid
    router's load a second time; the bookkeeping now runs between the graphs."""
    cfg = _cfg("default")
    ref, _, ref_buffers = _step(cfg, "none")
    out, _, buffers = _step(cfg, mode, compiled=True)
    torch.testing.assert_close(out.loss, ref.loss)
    for n, b in buffers.items():
        assert torch.equal(b, ref_buffers[n]), n


def test_importing_moekit_leaves_triton_unimported():
    """torch.compiler.disable imports torch._dynamo, which imports Triton: done at import time, it
    made every interpreted kernel test fail when another test module was collected first."""
    import subprocess
    import sys

    code = "import sys, moekit, moekit.train.trainer; print('triton.language' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_model_tells_its_moe_layers_to_count_between_graphs_under_checkpointing():
    model = MoETransformer(_cfg("default"))
    assert not any(m.count_between_graphs or m.router.count_between_graphs for m in model.moe_layers)
    model.activation_checkpointing = "full"
    assert all(m.count_between_graphs and m.router.count_between_graphs for m in model.moe_layers)
    model.activation_checkpointing = "none"
    assert not any(m.count_between_graphs for m in model.moe_layers)
