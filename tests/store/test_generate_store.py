"""`moekit generate --expert-memory`: the same greedy text as without it, the budget and the
store's counts on stderr, and one-line errors for what it cannot do."""

import re

import pytest
import torch

from moekit.cli import main
from moekit.generate import load_run_model
from tiny_run import train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    yield from train_tiny(tmp_path_factory)


def generate(capsys, run, *extra):
    capsys.readouterr()
    argv = ["generate", "--run", run, "--prompt", "def f(x):", "--max-new-tokens", "30", "--temperature", "0"]
    code = main(argv + list(extra))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("policy", ["lfru", "lru", "lfu"])
def test_budgeted_generation_gives_the_same_text_and_reports_the_store(run, capsys, policy):
    code, ref, _ = generate(capsys, run)
    assert code == 0
    model, _ = load_run_model(run)
    cfg = model.cfg.moe
    expert_bytes = 3 * cfg.dim * cfg.hidden_dim * 4
    budget = cfg.top_k * expert_bytes  # one layer's top_k, shared by the layers: the least there is
    code, out, err = generate(capsys, run, "--expert-memory", str(budget), "--expert-policy", policy)
    assert code == 0 and out == ref
    L = len(model.moe_layers)
    m = re.search(
        rf"expert memory ([\d.]+) MiB \({cfg.top_k} of {cfg.num_experts * L} experts, {L} layers sharing the slots, "
        rf"{policy}\)",
        err,
    )
    assert m, err
    assert re.search(r"hit rate \d+\.\d%, \d+ experts read", err), err


def test_what_the_store_cannot_do_is_one_line(run, capsys):
    for extra, msg in [
        (["--expert-memory", "12XB"], "--expert-memory: expected a size"),
        (["--expert-memory", "1KB"], "decoding needs at least one layer's top_k="),
        (["--expert-memory", "1GB", "--expert-policy", "fifo"], "--expert-policy must be one of"),
        (["--expert-memory", "1GB", "--compile"], "leave out --compile"),
        (["--expert-memory", "1GB", "--model", "dense"], "is dense"),
        (["--prefetch"], "give --expert-memory too"),
    ]:
        code, out, err = generate(capsys, run, *extra)
        assert code != 0 and out == "", (extra, out)
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)


def test_the_budgeted_model_equals_the_run_model_on_a_prompt(run):
    ref, _ = load_run_model(run)
    model, _ = load_run_model(run, expert_memory=10**9)
    idx = torch.randint(0, 257, (1, 60))
    with torch.no_grad():
        assert torch.equal(model(idx).logits, ref(idx).logits)


def test_prefetch_from_the_command_line_gives_the_same_text(run, capsys):
    code, ref, _ = generate(capsys, run)
    code, out, err = generate(capsys, run, "--expert-memory", "1KiB", "--prefetch")
    assert code != 0 and "decoding needs at least" in err  # the budget is checked before the prefetch
    model, _ = load_run_model(run)
    cfg = model.cfg.moe
    budget = cfg.top_k * 3 * cfg.dim * cfg.hidden_dim * 4 * len(model.moe_layers)
    code, out, err = generate(capsys, run, "--expert-memory", str(budget), "--prefetch")
    assert code == 0 and out == ref
    assert re.search(r"prefetch recall \d+\.\d%, precision \d+\.\d%", err), err
