"""Fine-tuning a Hugging Face checkpoint with moekit's trainer, and generating from one."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="fine-tuning Hugging Face checkpoints needs transformers")

from moekit.cli import main  # noqa: E402
from moekit.data import BPETokenizer, build_data, embedded_corpus, random_batches  # noqa: E402


@pytest.fixture()
def hf_dir(tmp_path, monkeypatch):
    """A tiny random Mixtral with a real (locally trained) tokenizer.json, saved with save_pretrained."""
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    tok = BPETokenizer.train((d.text for d in embedded_corpus(code_chars=50_000)[:20]), 300)
    cfg = transformers.MixtralConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        router_aux_loss_coef=0.02,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if name.endswith("norm.weight") else p.normal_(0.0, 0.05)
    path = tmp_path / "hf"
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path, model.eval(), tok


def test_init_from_fine_tunes_the_checkpoint_with_its_balance_loss(hf_dir, tmp_path):
    """`moekit train --init-from` starts from the checkpoint's weights, trains with its tokenizer and its aux loss."""
    path, hf_model, tok = hf_dir
    args = [
        "train",
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "ft",
        "--init-from",
        str(path),
        "--steps",
        "8",
        "--eval-every",
        "4",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--quiet",
        "--set",
        "train.code_chars=60000",
        "--set",
        "train.eval_windows=8",
        "--set",
        "train.lr=0.003",
    ]
    assert main(args) == 0
    run = tmp_path / "runs" / "ft"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["init_from"] == str(path) and not cfg["baseline"]
    # transformers' balance loss pooled over the layers, weighed by router_aux_loss_coef * top_k (moekit's
    # normalisation is 1/top_k of transformers'); no z-loss (transformers' Mixtral has none)
    assert cfg["model"]["balance_pooling"] == "model"
    assert cfg["model"]["moe"]["balance_loss_weight"] == pytest.approx(0.02 * 2)
    assert cfg["model"]["moe"]["z_loss_weight"] == 0
    assert not (run / "dense").exists()
    rows = [json.loads(ln) for ln in (run / "moe" / "metrics.jsonl").read_text().splitlines()]
    # the first step's loss is transformers' own loss of the checkpoint on the trainer's first batch
    data = build_data(None, "bpe", 4096, 60_000, tok=tok)
    x, y = next(random_batches(data.train_ids_N, 32, 4, torch.Generator().manual_seed(0 + 1)))
    with torch.no_grad():
        ref = hf_model(x, output_router_logits=True)
        hf_loss = torch.nn.functional.cross_entropy(ref.logits.flatten(0, 1), y.flatten())
    assert rows[0]["loss"] == pytest.approx(float(hf_loss), abs=1e-4)
    # and its auxiliary loss is transformers' router_aux_loss_coef * aux_loss on that batch
    assert rows[0]["aux_loss"] == pytest.approx(0.02 * float(ref.aux_loss), abs=1e-5)
    assert rows[0]["aux_loss"] > 0 and rows[-1]["loss"] < rows[0]["loss"]
    assert main(["train", "--resume", str(run)]) == 0


def test_generate_from_a_hugging_face_folder(hf_dir, capsys):
    """`moekit generate --run HF_DIR` converts the checkpoint and decodes with its tokenizer.json; cache == no cache."""
    path, hf_model, tok = hf_dir
    gen = ["generate", "--run", str(path), "--prompt", "def ", "--max-new-tokens", "10", "--temperature", "0"]
    assert main(gen) == 0
    a = capsys.readouterr().out
    assert main(gen + ["--no-cache"]) == 0
    assert capsys.readouterr().out == a and a.startswith("def ")
    ids = torch.tensor([tok.encode("def ")])
    ref = hf_model.generate(ids, max_new_tokens=10, do_sample=False)
    assert a.rstrip("\n") == tok.decode(ref[0].tolist())


def test_init_from_errors(tmp_path):
    """A folder that is not a checkpoint, or one without tokenizer.json, is a one-line error."""
    assert main(["train", "--out", str(tmp_path), "--init-from", str(tmp_path / "nope")]) == 2
