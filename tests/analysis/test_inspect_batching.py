"""``moekit inspect`` routes in no-grad batches larger than training's, bounded by memory, with the
same report: checked on a real tiny training run (no mocks).

Shape legend: T tokens, K slots per token.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit.analysis import inspect_run, routing_table
from moekit.analysis.routing import ROUTE_BYTES, available_windows, collect_routing, routing_batch_size
from moekit.cli import main
from moekit.config import LMConfig, MoEConfig
from moekit.models.lm import MoETransformer

BATCH, SEQ_LEN = 4, 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny MoE run (bytes tokenizer, 10 steps of 4 windows) trained through the CLI, with its
    model, tokenizer and data."""
    from moekit.data import build_data
    from moekit.generate import load_run_model
    from moekit.runs import load_run_config

    root = tmp_path_factory.mktemp("batching")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        args = ["train", "--name", "moe", "--out", str(root), "--no-baseline", "--quiet", "--preset", "mixtral"]
        args += ["--steps", "10", "--eval-every", "10", "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN)]
        args += ["--dim", "32", "--layers", "2", "--set", "model.moe.hidden_dim=32", "--set", "model.max_seq_len=64"]
        args += [
            "--set",
            'train.tokenizer="bytes"',
            "--set",
            "train.code_chars=100000",
            "--set",
            "train.eval_windows=4",
        ]
        assert main(args) == 0
        _, train_cfg, _ = load_run_config(root / "moe")
        model, tok = load_run_model(str(root / "moe"), "moe")
        data = build_data(train_cfg.data, train_cfg.tokenizer, train_cfg.vocab_size, train_cfg.code_chars, tok=tok)
        yield dict(dir=root / "moe", root=root, model=model, tok=tok, data=data, train_cfg=train_cfg, mp=mp)


def _same(a, b, path="") -> None:
    """Equal JSON-like values: ints, strings and structure exactly, floats to rounding (1e-6 relative)."""
    assert type(a) is type(b), (path, a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_larger_batches_route_every_token_the_same(run):
    """Float64 (no ties decided by rounding): every (token, slot)'s expert is the same whether the
    windows go through 4 at a time (the training batch, as before) or in one memory-bounded batch."""
    model, data = run["model"], run["data"]
    windows = min(24, available_windows(data.val_ids_N.numel(), SEQ_LEN))
    big = routing_batch_size(model, SEQ_LEN, BATCH)
    assert big >= windows > BATCH, (big, windows)
    m64 = MoETransformer(model.cfg).double()
    m64.load_state_dict(model.state_dict())
    before = collect_routing(m64, data, windows, SEQ_LEN, BATCH)
    after = collect_routing(m64, data, windows, SEQ_LEN, routing_batch_size(m64, SEQ_LEN, BATCH))
    assert all(torch.equal(a, b) for a, b in zip(after.experts, before.experts))
    assert torch.equal(after.token_T, before.token_T) and torch.equal(after.domain_T, before.domain_T)
    for a, b in zip(after.entropy, before.entropy):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_inspect_report_numbers_unchanged(run):
    """The report inspect writes (float32, its new batch) has the routing counts and statistics of
    the routing collected in training-sized batches."""
    model, data, tok = run["model"], run["data"], run["tok"]
    windows = min(24, available_windows(data.val_ids_N.numel(), SEQ_LEN))
    report = inspect_run(run["dir"], out_dir=run["root"] / "inspect", windows=windows, quiet=True)
    before = routing_table(collect_routing(model, data, windows, SEQ_LEN, BATCH), token_str=tok.token_str)
    _same(report["layers"], before)
    slots = windows * SEQ_LEN * model.cfg.moe.top_k
    assert [sum(e["tokens"] for e in layer["experts"]) for layer in report["layers"]] == [slots] * 2


def test_batch_size_is_bounded_by_memory():
    """The documented default: 256 MiB routes 36 windows of 128 tokens through the default model
    (V=4096, D=128, 16 experts of width 128, top-4); a smaller budget never goes below the training
    batch; float64 halves the windows."""
    moe = MoEConfig(dim=128, hidden_dim=128, num_experts=16, top_k=4, num_shared_experts=1)
    model = MoETransformer(LMConfig(vocab_size=4096, dim=128, n_layers=1, n_heads=4, max_seq_len=128, moe=moe))
    assert ROUTE_BYTES == 256 * 2**20
    assert routing_batch_size(model, 128, 16) == 36
    assert routing_batch_size(model, 128, 16, budget_bytes=2**20) == 16
    assert routing_batch_size(model, 128, 16, top_k=8) < 36  # a per-call top_k counts
    assert routing_batch_size(model.double(), 128, 1) == 18


def test_batch_dependent_routing_keeps_the_training_batch():
    """With a capacity limit in eval mode a token's routing depends on the rest of the batch:
    inspect then routes in training-sized batches, as evaluation did."""
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=1, renormalize=False, capacity_factor=1.0)
    model = MoETransformer(LMConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=32, moe=moe))
    assert routing_batch_size(model, 32, 4) == 4
    model.cfg.moe.capacity_factor = None
    assert routing_batch_size(model, 32, 4) == 4, "the layer keeps its own config"
    dropless = MoETransformer(
        LMConfig(
            vocab_size=64,
            dim=32,
            n_layers=1,
            n_heads=4,
            max_seq_len=32,
            moe=MoEConfig(32, 32, 4, top_k=1, renormalize=False),
        )
    )
    assert routing_batch_size(dropless, 32, 4) > 4
