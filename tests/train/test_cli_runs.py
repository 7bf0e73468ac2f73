"""The command line as a user meets it: typed --set values, one writer per run folder, validation
before any file is written, extending and resuming runs, help, --print-config and one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moekit.cli import build_configs, main, make_parser
from moekit.config import LMConfig, MoEConfig, TrainConfig
from moekit.train.checkpoint import read_checkpoint
from moekit.train.lock import RunLock
from moekit.train.trainer import METRICS, lr_at
from tiny_run import tiny_args

TINY = tiny_args(6, 3, 2, 16, 32, 1, 30000, 4, 16, 32, "--set", "train.checkpoint_every=2")


def configs(*argv):
    return build_configs(make_parser().parse_args(["train", *argv]))


def rows(path):
    return [json.loads(ln) for ln in open(path)]


def one_line_error(capsys, argv, *words):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# ------------------------------------------------------------------ typed --set (wrong answers before)
@pytest.mark.parametrize(
    "text, value",
    [
        ("False", False),
        ("false", False),
        ("no", False),
        ("0", False),
        ("True", True),
        ("yes", True),
        ("on", True),
        ("1", True),
    ],
)
def test_set_booleans_are_parsed(text, value):
    model, _ = configs("--set", f"model.moe.renormalize={text}", "--set", f"model.tie_embeddings={text}")
    assert model.moe.renormalize is value and model.tie_embeddings is value


def test_set_converts_every_declared_type():
    model, train = configs(
        "--set",
        "model.moe.top_k=1",
        "--set",
        "model.moe.capacity_factor=1.5",
        "--set",
        "model.moe.eval_capacity_factor=none",
        "--set",
        "model.n_kv_heads=2",
        "--set",
        "train.lr=2e-3",
        "--set",
        "train.data=null",
        "--set",
        "model.moe.router=topk",
        "--set",
        'model.moe.expert="gelu"',
        "--set",
        "train.steps=7",
    )
    assert model.moe.capacity_factor == 1.5 and model.moe.eval_capacity_factor is None and model.n_kv_heads == 2
    assert train.lr == 2e-3 and train.data is None and train.steps == 7 and isinstance(train.steps, int)
    assert model.moe.router == "topk" and model.moe.expert == "gelu"
    dense, _ = configs("--set", "model.moe=none")
    assert dense.moe is None
    fresh, _ = configs("--set", 'model.moe={"dim": 128, "hidden_dim": 64, "num_experts": 4, "top_k": 1}')
    assert fresh.moe == MoEConfig(dim=128, hidden_dim=64, num_experts=4, top_k=1)


@pytest.mark.parametrize(
    "item, words",
    [
        ("model.moe.renormalize=maybe", ["model.moe.renormalize", "true or false", "maybe"]),
        ("model.moe.top_k=2.5", ["model.moe.top_k", "integer", "2.5"]),
        ("train.lr=fast", ["train.lr", "number", "fast"]),
        ("model.moe=3", ["model.moe", "section", "model.moe.FIELD=VALUE"]),
        ("model.dim.x=3", ["model.dim", "not a config section"]),
        ("train.stepz=3", ["train.stepz", "--print-config"]),
        ("model.moe.top_k=none", ["model.moe.top_k", "none"]),
    ],
)
def test_set_rejects_text_that_is_not_the_fields_type(capsys, item, words):
    one_line_error(capsys, ["train", "--set", item], "--set", *words)


def test_config_objects_check_declared_types():
    with pytest.raises(ValueError, match="renormalize must be true or false; got 'False'"):
        MoEConfig(dim=8, hidden_dim=8, renormalize="False")
    with pytest.raises(ValueError, match="tie_embeddings"):
        LMConfig(tie_embeddings="no")
    with pytest.raises(ValueError, match="steps must be an integer"):
        TrainConfig.from_dict({"steps": "100"})
    assert MoEConfig(dim=8, hidden_dim=8, capacity_factor=2).capacity_factor == 2  # an int is a number


# ------------------------------------------------------------------ help, version, --print-config
def test_print_config_lists_every_field_and_round_trips(capsys):
    assert main(["train", "--print-config", "--set", "model.moe.renormalize=false"]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    n_fields = len(LMConfig.field_types()) - 1 + len(MoEConfig.field_types()) + len(TrainConfig.field_types())
    assert len(lines) == n_fields and all("  # " in ln for ln in lines), text
    assert "model.moe.renormalize=false" in text and "train.steps=1000" in text
    # each line's left part is a --set argument that gives the same config back
    sets = [a for ln in lines for a in ("--set", ln.split("  # ")[0].strip())]
    assert configs(*sets) == configs("--set", "model.moe.renormalize=false")
    assert main(["train", "--print-config", "json", "--steps", "5"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["steps"] == 5 and cfg["model"]["moe"]["top_k"] == 4


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "optimizer steps (= --set train.steps; default: 1000)" in " ".join(out.split())
    assert "--top-k-experts" in out and "(default: runs)" in out
    options = [a for a in make_parser()._subparsers._group_actions[0].choices["train"]._actions if a.option_strings]
    assert all(a.help for a in options), [a.option_strings for a in options if not a.help]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("moekit 0.")


def test_top_k_flag_names_agree():
    assert configs("--top-k-experts", "2")[0].moe.top_k == 2 == configs("--top-k", "2")[0].moe.top_k


# ------------------------------------------------------------------ one-line errors
def test_bad_input_gets_one_line_errors(tmp_path, capsys):
    run = str(tmp_path / "runs")
    one_line_error(capsys, ["train", "--out", run, "--device", "foo"], "device", "'foo'")
    one_line_error(capsys, ["generate", "--run", run, "--temperature", "nan"], "--temperature", "nan")
    one_line_error(capsys, ["generate", "--run", run, "--top-p", "0"], "--top-p")
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    one_line_error(capsys, ["train", "--config", str(bad)], str(bad), "top level must be an object")
    bad.write_text('{"model": {"dim": 64,}}')
    one_line_error(capsys, ["train", "--config", str(bad)], str(bad), "not valid JSON")
    bad.write_text('{"modle": {}}')
    one_line_error(capsys, ["train", "--config", str(bad)], str(bad), "'modle'")
    bad.write_text('{"train": 3}')
    one_line_error(capsys, ["train", "--config", str(bad)], str(bad), "'train' must be an object")
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    one_line_error(capsys, ["train", "--out", str(a_file), *TINY], str(a_file), "is a file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(capsys, ["train", "--out", run, "--data", str(empty), *TINY], "--data", "empty")
    assert not (tmp_path / "runs").exists(), "no run folder is created for a command that fails validation"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    one_line_error(capsys, ["train", "--out", str(tmp_path), "--device", "cuda", *TINY], "CUDA is not available")
    one_line_error(capsys, ["generate", "--run", str(tmp_path), "--device", "cuda"], "CUDA is not available")
    one_line_error(capsys, ["inspect", "--run", str(tmp_path), "--device", "cuda:1"], "CUDA is not available")
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"] or not list(tmp_path.iterdir())


def test_binary_data_warns(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 40 + b"some text\n" * 20)
    with pytest.warns(UserWarning, match=r"--data: .*blob.txt does not look like text \(\d+%"):
        assert (
            main(
                [
                    "train",
                    "--out",
                    str(tmp_path),
                    "--name",
                    "b",
                    "--data",
                    str(binary),
                    "--no-baseline",
                    *TINY,
                    "--steps",
                    "1",
                ]
            )
            == 0
        )
    text = tmp_path / "plain.txt"
    text.write_text("def f(x):\n    return x\n" * 200)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        assert (
            main(
                [
                    "train",
                    "--out",
                    str(tmp_path),
                    "--name",
                    "t",
                    "--data",
                    str(text),
                    "--no-baseline",
                    *TINY,
                    "--steps",
                    "1",
                ]
            )
            == 0
        )


def test_cli_warnings_print_as_one_line(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 40 + b"some text\n" * 20)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "moekit",
            "train",
            "--out",
            str(tmp_path),
            "--name",
            "b",
            "--data",
            str(binary),
            "--no-baseline",
            *TINY,
            "--steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "warning" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("moekit train: warning: --data:"), res.stderr


# ------------------------------------------------------------------ validation before the folder exists
def test_errors_found_late_leave_no_folder_behind(tmp_path, capsys):
    out = str(tmp_path)
    small = tmp_path / "small.txt"
    small.write_text("hello world\n")
    one_line_error(
        capsys, ["train", "--out", out, "--name", "r", *TINY, "--seq-len", "64"], "seq_len=64", "max_seq_len=32"
    )
    one_line_error(capsys, ["train", "--out", out, "--name", "r", *TINY, "--data", str(small)], "tokens", "--data")
    assert not (tmp_path / "r").exists()
    assert main(["train", "--out", out, "--name", "r", *TINY, "--no-baseline", "--steps", "2"]) == 0, (
        "the corrected command runs"
    )


# ------------------------------------------------------------------ one writer per run folder
def test_a_locked_run_folder_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "r"
    with RunLock(run):  # another process's training would hold this
        err = one_line_error(
            capsys, ["train", "--out", str(tmp_path), "--name", "r", *TINY], "in use by", f"pid {os.getpid()}"
        )
        assert not (run / "config.json").exists()
    assert main(["train", "--out", str(tmp_path), "--name", "r", *TINY, "--no-baseline", "--steps", "2"]) == 0
    assert "in use" in err


def test_resume_while_training_is_refused_then_extend_after_sigint(tmp_path, capsys):
    """A --resume of a run another process is training is refused (its metrics stay clean); after
    that process stops, --resume --steps finishes the run without duplicated steps."""
    args = [sys.executable, "-m", "moekit", "train", "--out", str(tmp_path), "--name", "c", *TINY, "--steps", "100000"]
    proc = subprocess.Popen(
        args, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = tmp_path / "c" / "moe" / METRICS
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    try:
        one_line_error(capsys, ["train", "--resume", str(tmp_path / "c")], "in use by", f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    step = read_checkpoint(tmp_path / "c" / "moe" / "checkpoint.safetensors")[1]["meta"]["step"]
    assert main(["train", "--resume", str(tmp_path / "c"), "--steps", str(step + 2)]) == 0
    steps = [r["step"] for r in rows(metrics)]
    assert steps == list(range(1, step + 3)), "one row per step, none duplicated"


# ------------------------------------------------------------------ extending and resuming
def test_resume_extends_a_finished_run_with_steps(tmp_path, capsys):
    run = tmp_path / "e"
    assert main(["train", "--out", str(tmp_path), "--name", "e", *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "9"]) == 0
    assert "resuming" in capsys.readouterr().out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 9
    train = TrainConfig.from_dict(cfg["train"])
    for label in ("moe", "dense"):
        r = rows(run / label / METRICS)
        assert [x["step"] for x in r] == list(range(1, 10)), label
        # the schedule of the longer run from the resume on (documented: recomputed for the new length)
        assert [x["lr"] for x in r[6:]] == pytest.approx([lr_at(s, train) for s in range(6, 9)])
        assert json.loads((run / label / "summary.json").read_text())["steps"] == 9
    assert json.loads((run / "comparison.json").read_text())["summaries"]["moe"]["steps"] == 9
    one_line_error(capsys, ["train", "--resume", str(run), "--steps", "4"], "steps=4", "9 steps")
    one_line_error(capsys, ["train", "--resume", str(run), "--lr", "0.1"], "--lr", "cannot be given")
    one_line_error(capsys, ["train", "--resume", str(run), "--set", "train.seed=3"], "--set")
    assert main(["train", "--resume", str(run)]) == 0, "resuming a finished run is a no-op"
    assert len(rows(run / "moe" / METRICS)) == 9


def test_a_deleted_checkpoint_is_refused_unless_asked(tmp_path, capsys):
    run = tmp_path / "d"
    assert main(["train", "--out", str(tmp_path), "--name", "d", *TINY, "--no-baseline", "--stop-at", "4"]) == 0
    (run / "moe" / "checkpoint.safetensors").unlink()
    one_line_error(
        capsys, ["train", "--resume", str(run)], "checkpoint.safetensors is missing", "4 steps", "--restart-missing"
    )
    assert len(rows(run / "moe" / METRICS)) == 4, "the refused resume changed nothing"
    assert main(["train", "--resume", str(run), "--restart-missing"]) == 0
    assert [r["step"] for r in rows(run / "moe" / METRICS)] == list(range(1, 7))


def test_a_config_without_moe_layers_is_trained_and_labelled_as_the_dense_model(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--name", "n", *TINY, "--steps", "2", "--set", "model.moe=none"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "n" / "dense" / "checkpoint.safetensors").exists() and not (tmp_path / "n" / "moe").exists()
    assert "\ndense " in out and "\nmoe " not in out


@pytest.mark.slow
def test_compile_trains_like_eager_and_its_checkpoint_resumes_eagerly(tmp_path):
    """--compile runs the training steps through torch.compile: the same losses as eager (to float
    rounding), a checkpoint with the model's own keys, and a resume without --compile continues it."""
    args = ["train", "--out", str(tmp_path), *TINY, "--no-baseline", "--steps", "3"]
    assert main([*args, "--name", "eager"]) == 0
    assert main([*args, "--name", "compiled", "--compile"]) == 0
    eager, compiled = rows(tmp_path / "eager" / "moe" / METRICS), rows(tmp_path / "compiled" / "moe" / METRICS)
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["train"]["compile"] is True
    keys = read_checkpoint(tmp_path / "compiled" / "moe" / "checkpoint.safetensors")[0]
    assert not [k for k in keys if "_orig_mod" in k]
    assert main(["train", "--resume", str(tmp_path / "compiled"), "--steps", "4"]) == 0
    assert len(rows(tmp_path / "compiled" / "moe" / METRICS)) == 4
