"""`moekit convert --hf glm4_moe`: the default `moekit train` model (sigmoid routing with its
correction bias, a shared expert) as a transformers GLM-4.5 MoE folder with the run's tokenizer:
transformers loads it with the same logits, and `moekit generate --run EXPORT` writes the run's
own greedy text."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.cli import main  # noqa: E402
from moekit.generate import load_run_model  # noqa: E402
from tiny_run import train_tiny  # noqa: E402 - after the importorskip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    yield from train_tiny(tmp_path_factory, "--steps", "3")


def test_the_default_trained_model_exports_to_glm4_moe(run, tmp_path, capsys):
    out = tmp_path / "glm"
    assert main(["convert", "--run", run, "--hf", "glm4_moe", "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and "glm4_moe" in capsys.readouterr().out
    model, _ = load_run_model(run)
    assert any(m.router.bias_E.abs().sum() > 0 for m in model.moe_layers)  # trained: the bias moved
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "Glm4MoeForCausalLM"
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx).logits, rtol=1e-5, atol=1e-5)
    greedy = ["--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", "--run", run, *greedy]) == 0
    own = capsys.readouterr().out
    assert main(["generate", "--run", str(out), *greedy]) == 0
    assert capsys.readouterr().out == own
    assert main(["convert", "--run", run, "--hf", "glm4_moe", "--out", str(out)]) != 0  # not over an export
    assert "not empty" in capsys.readouterr().err
