"""The run folder's plots, read back from the real matplotlib figures of real tiny runs: every
legend entry names a series that is drawn, few-point curves are visible, expert colours have a
key, and a dense-only run is not called a MoE."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from moekit.cli import main
from moekit.train.plots import expert_load_figure, plot_run, val_loss_figure

TINY = [
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--dim",
    "32",
    "--layers",
    "2",
    "--quiet",
    "--tokenizer",
    "bytes",
    "--set",
    "train.code_chars=100000",
    "--set",
    "train.eval_windows=24",
    "--set",
    "model.max_seq_len=64",
    "--set",
    "model.ffn_hidden_dim=64",
    "--set",
    "model.moe.hidden_dim=32",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real tiny runs through the CLI: MoE + dense with one evaluation each (10 steps, 16 experts),
    a dense-only run, a MoE-only run with 32 experts, and a config without MoE layers."""
    root = tmp_path_factory.mktemp("plots")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        out = ["--out", str(root)]
        assert main(["train", "--name", "short", "--steps", "10", "--eval-every", "10", *out, *TINY]) == 0
        assert main(["train", "--name", "dense", "--dense", "--steps", "10", "--eval-every", "5", *out, *TINY]) == 0
        assert (
            main(
                [
                    "train",
                    "--name",
                    "wide",
                    "--no-baseline",
                    "--steps",
                    "4",
                    "--eval-every",
                    "2",
                    "--experts",
                    "32",
                    "--top-k",
                    "2",
                    *out,
                    *TINY,
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "train",
                    "--name",
                    "nomoe",
                    "--steps",
                    "4",
                    "--eval-every",
                    "2",
                    "--set",
                    "model.moe=null",
                    *out,
                    *TINY[:-2],
                ]
            )
            == 0
        )
    yield {name: root / name for name in ("short", "dense", "wide", "nomoe")}


def _finite_points(line) -> int:
    y = np.asarray(line.get_ydata(), dtype=float)
    return int(np.isfinite(y).sum())


def _is_drawn(line) -> bool:
    """A line shows something: a marker on at least one finite point, or a stroke between two."""
    n = _finite_points(line)
    has_marker = line.get_marker() not in (None, "", "None", " ")
    has_stroke = line.get_linestyle() not in ("None", "", " ") and line.get_linewidth() > 0
    return line.get_visible() and ((has_marker and n >= 1) or (has_stroke and n >= 2))


def _legend_entries(fig) -> list:
    """(handle, label) of every legend in the figure (axes legends and figure legends)."""
    out = []
    for leg in [ax.get_legend() for ax in fig.axes] + list(fig.legends):
        if leg is not None:
            out += list(zip(leg.legend_handles, [t.get_text() for t in leg.get_texts()]))
    return out


def _texts(fig) -> list[str]:
    texts = [t.get_text() for t in fig.findobj(plt.Text)]
    return [t for t in texts if t]


# ---------------------------------------------------------------------------------------------- val_loss.png
def test_one_evaluation_shows_a_marker_for_every_legend_entry(runs):
    fig = val_loss_figure(runs["short"])
    try:
        ax = fig.axes[0]
        drawn = [ln for ln in ax.get_lines() if _is_drawn(ln)]
        assert len(drawn) >= 2  # MoE and dense, one point each
        entries = _legend_entries(fig)
        assert entries and len(entries) == len({label for _, label in entries})
        for _, label in entries:
            line = next(ln for ln in ax.get_lines() if ln.get_label() == label)
            assert _is_drawn(line), f"legend entry {label!r} names a series that is not drawn"
        assert {ln.get_label() for ln in drawn if not ln.get_label().startswith("_")} == {label for _, label in entries}
    finally:
        plt.close(fig)


def test_a_domain_without_finite_values_gets_no_legend_entry(tmp_path):
    """A domain measured at no evaluation (NaN, None or absent) is left out, not listed empty."""
    for label, base in (("moe", 4.0), ("dense", 4.2)):
        (tmp_path / label).mkdir()
        rows = [
            {"step": s, "val_loss": base - s / 100, "val_loss_prose": base - s / 90, "val_loss_code": math.nan}
            for s in (5, 10, 15)
        ]
        rows[1]["val_loss_code"] = None
        (tmp_path / label / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = val_loss_figure(tmp_path)
    try:
        labels = [label for _, label in _legend_entries(fig)]
        assert not any("code" in label for label in labels), labels
        assert sum("prose" in label for label in labels) == 2
    finally:
        plt.close(fig)


def test_a_domain_equal_to_the_overall_curve_is_named_not_drawn_twice(tmp_path):
    (tmp_path / "moe").mkdir()
    rows = [{"step": s, "val_loss": 5.0 - s / 10, "val_loss_prose": 5.0 - s / 10} for s in (2, 4)]
    (tmp_path / "moe" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = val_loss_figure(tmp_path)
    try:
        assert [label for _, label in _legend_entries(fig)] == ["MoE, all (prose only)"]
        assert fig.axes[0].get_title() == "validation loss: MoE model"
    finally:
        plt.close(fig)


def test_dense_only_run_is_not_labelled_moe(runs):
    fig = val_loss_figure(runs["dense"])
    try:
        texts = _texts(fig)
        assert not [t for t in texts if "moe" in t.lower()], texts
        assert any("dense" in t for t in texts)
    finally:
        plt.close(fig)
    paths = plot_run(runs["dense"])
    assert [p.name for p in paths] == ["val_loss.png"]


def test_a_model_without_moe_layers_is_not_labelled_moe(runs):
    """``--set model.moe=null`` trains a dense model (in the run's ``dense`` folder): plotted as dense."""
    assert (runs["nomoe"] / "dense").is_dir() and not (runs["nomoe"] / "moe").exists()
    fig = val_loss_figure(runs["nomoe"])
    try:
        texts = _texts(fig)
        assert not [t for t in texts if "moe" in t.lower()], texts
        assert "validation loss: dense model" in texts
    finally:
        plt.close(fig)


def test_moe_only_run_is_not_called_a_comparison(runs):
    fig = val_loss_figure(runs["wide"])
    try:
        assert not [t for t in _texts(fig) if "dense" in t.lower()]
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- expert_load.png
def test_expert_load_has_a_legend_naming_every_expert(runs):
    fig = expert_load_figure(runs["short"])
    try:
        labels = [label for _, label in _legend_entries(fig)]
        assert sorted(labels, key=lambda s: int(s.split()[-1])) == [f"expert {e}" for e in range(16)]
        colours = {tuple(np.round(h.get_facecolor(), 3).ravel()) for h, _ in _legend_entries(fig)}
        assert len(colours) == 16  # one distinct colour per expert
    finally:
        plt.close(fig)


def test_expert_load_with_many_experts_has_a_colour_key(runs):
    fig = expert_load_figure(runs["wide"])
    try:
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == 1, "expected one colourbar keying the 32 experts"
        assert "expert" in (bars[0].get_ylabel() + bars[0].get_xlabel())
        lo, hi = sorted(bars[0].get_ylim())
        assert lo <= 0 and hi >= 31
    finally:
        plt.close(fig)


def test_plots_are_written_as_png(runs):
    paths = plot_run(runs["short"])
    assert {p.name for p in paths} == {"val_loss.png", "expert_load.png", "tokens_per_expert.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_plotting_modules_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """Importing moekit's plotting modules and writing a plot does not switch matplotlib's backend
    (run in a fresh process, whose backend this test sets first)."""
    code = (
        "import matplotlib; matplotlib.use('svg'); "
        "import moekit.train.plots as p, moekit.analysis.report; "
        "fig = p.agg_figure(); fig.subplots().plot([0, 1]); "
        f"fig.savefig({str(tmp_path / 'x.png')!r}); "
        "print(matplotlib.get_backend())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "svg"
    assert (tmp_path / "x.png").stat().st_size > 0
