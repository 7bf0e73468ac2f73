"""``moekit train``'s config: --set, a --config file and the shortcut flags set a field the same way,
derived fields follow the field they derive from, and settings that cannot take effect are refused
with one line naming the field (issue 22, items 8 and 9)."""

import json

import pytest

from moekit.cli import build_configs, main, make_parser
from moekit.config import BPE_MIN_VOCAB, MoEConfig, TrainConfig
from moekit.data import BPETokenizer


def configs(*argv):
    return build_configs(make_parser().parse_args(["train", *argv]))


def config_file(tmp_path, content):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(content))
    return str(path)


def one_line_error(capsys, argv, *words):
    assert main(["train", "--print-config", *argv]) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# ------------------------------------------------------------------ item 8: model.dim and the MoE width
@pytest.mark.parametrize("dim", [64, 256])
def test_model_dim_is_set_alike_by_the_flag_set_and_a_config_file(tmp_path, dim):
    by_flag = configs("--dim", str(dim))
    by_set = configs("--set", f"model.dim={dim}")  # was: "moe.dim must equal dim (256); got 128"
    by_file = configs("--config", config_file(tmp_path, {"model": {"dim": dim}}))  # the same error
    assert by_flag == by_set == by_file
    model = by_set[0]
    assert model.dim == dim and model.moe.dim == dim
    # the widths that are settings of their own stay as configured, whichever way dim was set
    default = configs()[0]
    assert (model.moe.hidden_dim, model.ffn_hidden_dim) == (default.moe.hidden_dim, default.ffn_hidden_dim)


def test_moe_width_follows_model_dim_in_every_order(tmp_path):
    run_like = configs("--print-config")[0].to_dict()  # a run's config.json: moe.dim written out (128)
    path = config_file(tmp_path, {"model": run_like})
    assert configs("--config", path, "--dim", "64")[0].moe.dim == 64  # a later source changes the width
    assert configs("--config", path, "--set", "model.dim=64")[0].moe.dim == 64
    assert configs("--set", "model.moe.dim=64", "--set", "model.dim=64")[0].moe.dim == 64
    assert configs("--set", "model.dim=64", "--set", "model.moe.dim=64")[0].moe.dim == 64
    # a MoE section given whole without its width takes the model's
    fresh = configs("--dim", "64", "--set", 'model.moe={"hidden_dim": 32, "num_experts": 4, "top_k": 1}')[0]
    assert fresh.moe == MoEConfig(dim=64, hidden_dim=32, num_experts=4, top_k=1)
    section = {"model": {"dim": 64, "moe": {"hidden_dim": 32}}}
    assert configs("--config", config_file(tmp_path, section))[0].moe.dim == 64


@pytest.mark.parametrize(
    "argv",
    [
        ["--set", "model.moe.dim=64"],
        ["--dim", "256", "--set", "model.moe.dim=128"],
        ["--set", "model.dim=256", "--set", "model.moe.dim=128"],
    ],
)
def test_a_moe_width_set_against_model_dim_is_one_line(capsys, argv):
    one_line_error(capsys, argv, "model.moe.dim", "model.dim")


def test_a_config_file_that_sets_both_widths_apart_is_one_line(tmp_path, capsys):
    path = config_file(tmp_path, {"model": {"dim": 64, "moe": {"dim": 32}}})
    one_line_error(capsys, ["--config", path], "model.moe.dim=32", "model.dim=64")


# ------------------------------------------------------------------ item 9: vocabulary sizes
def test_model_vocab_size_set_apart_from_the_tokenizer_is_refused(capsys):
    # was silently ignored: the run's config.json recorded the tokenizer's 4096
    one_line_error(capsys, ["--set", "model.vocab_size=100"], "model.vocab_size=100", "train.vocab_size", "tokenizer")
    one_line_error(
        capsys, ["--tokenizer", "bytes", "--set", "model.vocab_size=4096"], "model.vocab_size=4096", "257", "bytes"
    )


def test_bpe_vocabulary_below_its_byte_alphabet_is_refused(capsys):
    # was silently a 257-token vocabulary
    one_line_error(capsys, ["--set", "train.vocab_size=100"], "vocab_size", str(BPE_MIN_VOCAB), "100")
    with pytest.raises(ValueError, match=r"^vocab_size \(the BPE vocabulary\) must be at least 257 .*; got 256$"):
        TrainConfig(vocab_size=256)
    assert TrainConfig(vocab_size=100, tokenizer="bytes").vocab_size == 100  # not used by the byte tokenizer
    # the reference: what a byte-level BPE asked for fewer tokens really holds
    texts = ["the quick brown fox " * 20, "def f(x): return x"]
    assert BPETokenizer.train(texts, 100).vocab_size == BPE_MIN_VOCAB == BPETokenizer.train(texts, 257).vocab_size


def test_model_vocab_size_follows_the_tokenizer(tmp_path):
    assert configs()[0].vocab_size == 4096
    assert configs("--set", "train.vocab_size=8000")[0].vocab_size == 8000
    assert configs("--set", "model.vocab_size=8000", "--set", "train.vocab_size=8000")[0].vocab_size == 8000
    assert configs("--tokenizer", "bytes")[0].vocab_size == 257
    # a run's config.json records the trained vocabulary, which a small corpus makes smaller than asked
    path = config_file(tmp_path, {"model": {"vocab_size": 289}, "train": {"vocab_size": 300}})
    assert configs("--config", path)[0].vocab_size == 289
    assert configs("--config", path, "--set", "train.vocab_size=500")[0].vocab_size == 500


def test_print_config_of_a_changed_width_round_trips(capsys):
    assert main(["train", "--print-config", "--set", "model.dim=64", "--tokenizer", "bytes"]) == 0
    lines = [ln.split("  # ")[0].strip() for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert "model.moe.dim=64" in lines and "model.vocab_size=257" in lines
    sets = [a for ln in lines for a in ("--set", ln)]
    assert configs(*sets) == configs("--set", "model.dim=64", "--tokenizer", "bytes")


def test_pipeline_parallel_takes_twice_its_stages_as_microbatches_unless_told():
    """`--pipeline-parallel N` alone: 2N microbatches (the 1F1B bubble (N-1)/(3N-1)); `--microbatches`
    or a config file's value wins."""
    assert configs("--pipeline-parallel", "2")[1].microbatches == 4
    assert configs("--pipeline-parallel", "2", "--microbatches", "2")[1].microbatches == 2
    assert configs("--set", "train.pipeline_parallel=4", "--set", "train.microbatches=6")[1].microbatches == 6
    assert configs()[1].microbatches == 1
