"""``moekit inspect``: the expert-specialisation report of a trained run.

Routes fixed validation windows through the run's MoE model and writes to ``RUN/inspect/``:
``domain_heatmap.png``, ``load_heatmap.png``, ``report.json`` (every number) and
``report.html`` (one self-contained page: images as data URIs, inline CSS, no scripts).

Shape legend: L MoE layers, E experts (the widest layer's count when layers differ).
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm

from .._io import atomic_write_bytes, check_writable, os_error_text
from ..config import check_positive
from ..data import build_data
from ..generate import load_run_model
from ..layer import MoE
from ..runs import COMPARISON, load_run_config, read_run_json, sub_runs
from ..train.plots import agg_figure
from ..train.trainer import checkpoint_step, find_checkpoint, read_metrics
from .routing import RoutingData, available_windows, collect_routing, routing_batch_size, routing_table

DOMAIN_PNG, LOAD_PNG, REPORT_JSON, REPORT_HTML = "domain_heatmap.png", "load_heatmap.png", "report.json", "report.html"
NO_PREFERENCE = 0.05  # normalised MI below this reads as "no clear specialisation"
CLEAR = 0.20  # ... at or above this as "clear"
LEANING = 1.25  # an expert "leans" to a domain at this specialisation (and a meaningful load)
MIN_TOKENS = 20  # experts with fewer tokens are greyed out in the domain heatmap
ID_LIST_WIDTH = 18  # the text table's dead / overloaded columns shorten longer lists


# ---------------------------------------------------------------------------------------------- entry point
def inspect_run(
    run: Union[str, Path],
    out_dir: Optional[Union[str, Path]] = None,
    windows: int = 64,
    device: str = "cpu",
    top_k: Optional[int] = None,
    *,
    quiet: bool = False,
) -> dict:
    """Route ``windows`` validation windows through the run's MoE model, write the report files
    (to ``RUN/inspect`` or ``out_dir``), print a short table, and return the report as a dict.
    ``windows`` beyond the non-overlapping windows the validation split holds is capped to
    them, with a note on stderr (``report["windows_requested"]`` keeps the request)."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    check_positive("windows", windows, integer=True)
    out = Path(out_dir) if out_dir is not None else run_dir / "inspect"
    check_writable(out, "--out" if out_dir is not None else f"inspect writes its report to {out} (give --out DIR)")
    model, tok, model_cfg, train_cfg = _load_moe_run(run_dir, device)
    seq_len = min(train_cfg.seq_len, model_cfg.max_seq_len)
    routing = _route_validation(model, tok, train_cfg, seq_len, windows, device, top_k, quiet)
    layers = routing_table(routing, token_str=tok.token_str)

    report: dict[str, Any] = {
        "run": str(run_dir),
        "domains": routing.domains,
        "windows": routing.windows,
        "windows_requested": windows,
        "seq_len": seq_len,
        "tokens": int(routing.token_T.numel()),
        "top_k": routing.top_k,
        "base_rate": _token_base_rate(routing),
        "config": config_summary(model, train_cfg, run_dir),
        "layers": layers,
    }
    report["reading"] = reading(report)

    try:
        _write_report_files(report, out)
    except OSError as err:  # checked writable above; the disk may still fill up
        raise ValueError(f"inspect could not write its report: {os_error_text(err)}") from None
    if not quiet:
        print(text_table(report))
        print(f"report: {out / REPORT_HTML}")
    return report


def _load_moe_run(run_dir: Path, device: str) -> tuple:
    """(model, tokenizer, model config, train config) of the run's MoE sub-run."""
    model_cfg, train_cfg, raw = load_run_config(run_dir)
    if model_cfg.moe is None or "moe" not in dict(sub_runs(raw, model_cfg)):
        raise ValueError(f"inspect needs a MoE run; {run_dir} holds only a dense model")
    model, tok = load_run_model(str(run_dir), "moe", device)
    return model, tok, model_cfg, train_cfg


def _route_validation(
    model, tok, train_cfg, seq_len: int, windows: int, device: str, top_k: Optional[int], quiet: bool
) -> RoutingData:
    """The routing of ``windows`` validation windows, capped (with a note) to those the split holds."""
    data = build_data(train_cfg.data, train_cfg.tokenizer, train_cfg.vocab_size, train_cfg.code_chars, tok=tok)
    most = available_windows(data.val_ids_N.numel(), seq_len)
    if windows > most > 0 and not quiet:
        print(
            f"moekit inspect: note: windows {windows} is more than the validation split holds; routing all "
            f"{most} non-overlapping windows of {seq_len} tokens",
            file=sys.stderr,
        )
    batch = routing_batch_size(model, seq_len, train_cfg.batch_size, top_k)  # no grad: larger batches than training's
    return collect_routing(model, data, min(windows, max(1, most)), seq_len, batch, device, top_k=top_k)


def _write_report_files(report: dict, out: Path) -> None:
    """Write the heatmaps, ``report.json`` and ``report.html`` to ``out`` (recording them under ``report["files"]``)."""
    out.mkdir(parents=True, exist_ok=True)
    layers = report["layers"]
    focus = focus_domain(report["domains"])
    plot_domain_heatmap(layers, focus, report["base_rate"].get(focus, 0.5), out / DOMAIN_PNG)
    plot_load_heatmap(layers, out / LOAD_PNG)
    report["files"] = {name: str(out / name) for name in (DOMAIN_PNG, LOAD_PNG, REPORT_JSON, REPORT_HTML)}
    atomic_write_bytes(out / REPORT_JSON, json.dumps(report, indent=2, allow_nan=False).encode())
    images = {DOMAIN_PNG: (out / DOMAIN_PNG).read_bytes(), LOAD_PNG: (out / LOAD_PNG).read_bytes()}
    # "replace": a path that is not valid UTF-8 (a --data file name) shows '?' in the page
    atomic_write_bytes(out / REPORT_HTML, render_html(report, images).encode("utf-8", "replace"))


def _token_base_rate(routing) -> dict:
    counts = np.bincount(routing.domain_T.numpy(), minlength=len(routing.domains))
    return {d: float(c / max(1, counts.sum())) for d, c in zip(routing.domains, counts)}


def focus_domain(domains: list) -> str:
    """The domain whose share the domain heatmap shows: ``code`` when present, else the last one."""
    return "code" if "code" in domains else domains[-1]


def config_summary(model, train_cfg, run_dir: Path) -> dict:
    """What the report says about the run: architecture, routing, parameters, training, losses."""
    cfg, moe = model.cfg, model.cfg.moe
    out = {
        "n_layers": cfg.n_layers,
        "dim": cfg.dim,
        "n_heads": cfg.n_heads,
        "vocab_size": cfg.vocab_size,
        "moe_layers": [b.layer for b in model.blocks if isinstance(b.ffn, MoE)],
        "num_experts": moe.num_experts,
        "top_k": moe.top_k,
        "router": moe.router,
        "expert_hidden_dim": moe.hidden_dim,
        "num_shared_experts": moe.num_shared_experts,
        "capacity_factor": moe.capacity_factor,
        "eval_capacity_factor": moe.eval_capacity_factor,
        "params": model.param_counts(),
        "steps": trained_steps(Path(run_dir) / "moe"),
        "target_steps": train_cfg.steps,
        "tokenizer": train_cfg.tokenizer,
        "seq_len": train_cfg.seq_len,
        "data": train_cfg.data or "embedded",
    }
    comp = Path(run_dir) / COMPARISON
    if comp.is_file():
        reason = None
        try:
            summaries = read_run_json(comp, "comparison").get("summaries", {})
            out["val_loss"] = {k: v.get("val_loss") for k, v in summaries.items()}
        except ValueError as err:  # read_run_json's message names the file
            reason = str(err)
        except OSError as err:
            reason = os_error_text(err, comp)
        except AttributeError:
            reason = f"{comp} is not a valid comparison: its 'summaries' are not objects"
        if reason is not None:
            warnings.warn(f"{reason}; the report leaves out the validation losses", stacklevel=2)
    return out


def trained_steps(sub_dir: Path) -> Optional[int]:
    """The optimizer steps behind a sub-run's checkpoint (the weights inspected), read from the
    checkpoint's metadata without loading its tensors; else the last step of its metrics; else None."""
    path = find_checkpoint(Path(sub_dir))
    step = checkpoint_step(path) if path is not None else None
    if step is not None:
        return step
    try:
        steps = [r["step"] for r in read_metrics(sub_dir) if isinstance(r.get("step"), int)]
    except (json.JSONDecodeError, OSError):
        return None
    return steps[-1] if steps else None


def capacity_text(
    router: str, top_k: int, capacity_factor: Optional[float], eval_capacity_factor: Optional[float]
) -> str:
    """The capacity setting in words: ``None`` is dropless (for expert choice: top_k slots per token on average)."""

    def one(cf):
        if cf is not None:
            return f"{cf:g}"
        return f"{top_k:g} (top-k, expert choice)" if router == "expert_choice" else "none (dropless)"

    train = one(capacity_factor)
    if eval_capacity_factor is None or eval_capacity_factor == capacity_factor:
        return f"{train}, in training and evaluation"
    return f"{train} in training, {one(eval_capacity_factor)} in evaluation"


# ---------------------------------------------------------------------------------------------- reading
def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _names(ids: list) -> str:
    ids = [str(i) for i in ids]
    if len(ids) == 1:
        return f"expert {ids[0]}"
    return "experts " + ", ".join(ids[:-1]) + " and " + ids[-1]


def leaning_experts(layer: dict, domain: str, threshold: float = LEANING) -> list[int]:
    """Experts with a meaningful load (>= 1/4 of the mean) whose specialisation for ``domain`` >= ``threshold``."""
    mean_share = 1.0 / layer["num_experts"]
    return [
        x["expert"]
        for x in layer["experts"]
        if x["share"] >= 0.25 * mean_share and (x["specialisation"].get(domain) or 0.0) >= threshold
    ]


def _group_share(layer: dict, ids: list, domain: str) -> float:
    tokens = sum(layer["experts"][e]["tokens"] for e in ids)
    dom = sum(layer["experts"][e]["tokens"] * (layer["experts"][e]["domain_share"][domain] or 0.0) for e in ids)
    return dom / tokens if tokens else 0.0


def layer_reading(layer: dict, domains: list) -> str:
    """One or two sentences about one layer, generated from its numbers."""
    L, mi = layer["layer"], layer["mi"]
    parts = []
    if mi["normalised"] is None:
        parts.append(f"layer {L}: the data has a single domain, so there is no domain preference to measure")
    else:
        carried = (
            f"routing carries {mi['normalised']:.2f} of the domain information "
            f"({mi['mi_bits']:.3f} of {mi['domain_entropy_bits']:.3f} bits)"
        )
        noise = mi["mi_bits"] < 3 * mi["bias_bits"]  # independent routing would show about bias_bits
        if mi["normalised"] < NO_PREFERENCE or noise:
            note = (
                f", within sampling noise (independent routing shows about {mi['bias_bits']:.3f} bits here)"
                if noise
                else ""
            )
            parts.append(f"layer {L}: no clear specialisation; {carried}{note}")
        else:
            strength = "a clear" if mi["normalised"] >= CLEAR else "a weak"
            leaning = []
            for d in domains:
                ids = leaning_experts(layer, d)
                if ids:
                    verb = "takes" if len(ids) == 1 else "take"
                    leaning.append(
                        f"{_names(ids)} {verb} {_pct(_group_share(layer, ids, d))} {d} tokens "
                        f"against a base rate of {_pct(layer['base_rate'][d])}"
                    )
            parts.append(f"layer {L}: {strength} domain preference; {carried}" + "".join("; " + x for x in leaning))
            cond = layer.get("mi_given_token")
            if cond and cond["excess"] is not None:
                given = (
                    f"given the token id it carries {cond['normalised']:.2f} of the remaining domain information "
                    f"against {cond['null_normalised']:.2f} with the domain labels shuffled per token"
                )
                if cond["excess"] < NO_PREFERENCE:
                    parts.append(given + ", so the preference is mostly which tokens each domain uses, not context")
                else:
                    parts.append(given + ", so it also uses the context")
    E = layer["num_experts"]
    if layer["dead"]:
        parts.append(f"{_names(layer['dead'])} received no token")
    for e in layer["overloaded"]:
        parts.append(f"expert {e} takes {_pct(layer['experts'][e]['share'])} of the routed slots (mean {100 / E:.1f}%)")
    if "routing_entropy_normalised" in layer:
        parts.append(f"routing entropy is {layer['routing_entropy_normalised']:.2f} of its maximum log {E}")
    return "; ".join(parts) + "."


def reading(report: dict) -> list[str]:
    """The report's reading as paragraphs: the sample first, then one per layer."""
    rates = ", ".join(f"{d} {_pct(r)}" for d, r in report["base_rate"].items())
    intro = (
        f"Measured on {report['tokens']:,} validation tokens ({report['windows']} windows of {report['seq_len']}; "
        f"{rates}), "
        f"routing each to {report['top_k']} of {report['config']['num_experts']} experts."
    )
    if report["tokens"] < 2000:
        intro += " That is a small sample: treat small differences as noise."
    return [intro] + [layer_reading(layer, report["domains"]) for layer in report["layers"]]


# ---------------------------------------------------------------------------------------------- text table
def _extreme(layer: dict, domain: str) -> str:
    """The expert (with at least a quarter of the mean load) that prefers ``domain`` most."""
    floor = 0.25 / layer["num_experts"]
    live = [
        x
        for x in layer["experts"]
        if x["tokens"] > 0 and x["share"] >= floor and x["specialisation"].get(domain) is not None
    ]
    if not live:
        return "-"
    x = max(live, key=lambda x: (x["specialisation"][domain], x["tokens"]))
    return f"e{x['expert']} {_pct(x['domain_share'][domain])} ({x['specialisation'][domain]:.2f}x)"


def id_list(ids: list, width: int = ID_LIST_WIDTH) -> str:
    """Expert ids as ``3,7,12``; a list longer than ``width`` characters keeps the ids that fit
    and counts the rest (``0,1,2,3 +28 more``); ``-`` for none."""
    full = ",".join(map(str, ids))
    if len(full) <= width:
        return full or "-"
    for m in range(len(ids) - 1, 0, -1):
        text = ",".join(map(str, ids[:m])) + f" +{len(ids) - m} more"
        if len(text) <= width:
            return text
    return f"{len(ids)} experts"


def text_table(report: dict) -> str:
    """The short per-layer table printed to stdout: columns sized to their widest cell (long
    dead / overloaded lists shortened by :func:`id_list`), so every row lines up."""
    doms = report["domains"]
    lines = [
        f"moekit inspect: {report['run']}: {report['tokens']:,} tokens ({report['windows']} windows x "
        f"{report['seq_len']}), "
        f"top-{report['top_k']} of {report['config']['num_experts']} experts",
        "base rate: " + ", ".join(f"{d} {100 * r:.1f}%" for d, r in report["base_rate"].items()),
    ]
    cols = (
        [("layer", ">"), ("MI bits", ">"), ("MI/H", ">"), ("MI|tok", ">"), ("H/Hmax", ">")]
        + [(f"most {d}-leaning", "<") for d in doms]
        + [("dead", "<"), ("overloaded", "<")]
    )
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = []
    for layer in report["layers"]:
        mi, cond = layer["mi"], layer.get("mi_given_token") or {}
        rows.append(
            [
                str(layer["layer"]),
                f"{mi['mi_bits']:.4f}",
                f(mi["normalised"]),
                f(cond.get("excess")),
                f(layer.get("routing_entropy_normalised")),
            ]
            + [_extreme(layer, d) for d in doms]
            + [id_list(layer["dead"]), id_list(layer["overloaded"])]
        )
    widths = [max([len(name)] + [len(r[i]) for r in rows]) for i, (name, _) in enumerate(cols)]

    def line(cells: list) -> str:
        return "  ".join(f"{c:{align}{w}}" for c, (_, align), w in zip(cells, cols, widths)).rstrip()

    lines.append(line([name for name, _ in cols]))
    lines += [line(r) for r in rows]
    lines.append(
        "MI/H: I(expert; domain) / H(domain); MI|tok: the same given the token id, in excess of its value with "
        "labels shuffled per token; H/Hmax: routing entropy / log E; leaning: domain share (specialisation)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def _matrix(layers: list, value) -> np.ndarray:
    """(L, E) float matrix of ``value(expert dict)``, NaN-padded where a layer has fewer experts."""
    E = max(layer["num_experts"] for layer in layers)
    m = np.full((len(layers), E), np.nan)
    for i, layer in enumerate(layers):
        for x in layer["experts"]:
            v = value(x)
            m[i, x["expert"]] = np.nan if v is None else v
    return m


def _heatmap(m_LE: np.ndarray, labels: list, norm, cmap: str, title: str, cbar: str, annot, path: Path) -> None:
    L, E = m_LE.shape
    fig = agg_figure(figsize=(min(20, 1.6 + 0.62 * E), 1.3 + 0.55 * L))
    ax = fig.subplots()
    cm = colormaps[cmap].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(m_LE), cmap=cm, norm=norm, aspect="auto")
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    ax.set_yticks(range(L), labels)
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=10)
    fs = 8 if E <= 12 else 6 if E <= 24 else 0
    if fs:
        for i in range(L):
            for j in range(E):
                text = annot(i, j)
                if text:
                    v = m_LE[i, j]
                    dark = not np.isnan(v) and abs(norm(v) - 0.5) > 0.33
                    ax.text(j, i, text, ha="center", va="center", fontsize=fs, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_domain_heatmap(layers: list, focus: str, base: float, path: Path, min_tokens: int = MIN_TOKENS) -> Path:
    """Layers x experts, colour = the share of ``focus``-domain tokens among the expert's tokens, on a
    diverging scale centred on the base rate; cells show the share and the specialisation. Experts
    with fewer than ``min_tokens`` tokens are grey (their share is noise) and show their count."""
    count = _matrix(layers, lambda x: x["tokens"])
    share = _matrix(layers, lambda x: x["domain_share"].get(focus))
    spec = _matrix(layers, lambda x: x["specialisation"].get(focus))
    shown = np.where(count >= min_tokens, share, np.nan)
    centre = min(0.99, max(0.01, base))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=centre, vmax=1.0)

    def annot(i, j):
        if np.isnan(count[i, j]):
            return ""
        if count[i, j] == 0:
            return "dead"
        if np.isnan(shown[i, j]):
            return f"n={count[i, j]:.0f}"
        return f"{100 * share[i, j]:.0f}%\n{spec[i, j]:.2f}x"

    _heatmap(
        shown,
        [f"layer {layer['layer']}" for layer in layers],
        norm,
        "RdBu_r",
        f"share of {focus} tokens per expert (white = base rate {100 * base:.0f}%; grey: < {min_tokens} tokens)",
        f"{focus} share",
        annot,
        path,
    )
    return path


def plot_load_heatmap(layers: list, path: Path) -> Path:
    """Layers x experts, colour = the expert's share of the layer's routed slots (white = uniform)."""
    share = _matrix(layers, lambda x: x["share"])
    E = share.shape[1]
    top = float(np.nanmax(share)) if np.isfinite(share).any() else 2.0 / E
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0 / E, vmax=max(top, 2.0 / E))

    def annot(i, j):
        return "" if np.isnan(share[i, j]) else f"{100 * share[i, j]:.1f}%"

    _heatmap(
        share,
        [f"layer {layer['layer']}" for layer in layers],
        norm,
        "PuOr_r",
        f"share of routed slots per expert (white = uniform {100 / E:.1f}%)",
        "load share",
        annot,
        path,
    )
    return path


# ---------------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;
     margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}
tr.dead td{color:#999;background:#f7f7f7}tr.over td{font-weight:bold}
code{background:#f3f3f3;padding:0 2px;margin-right:3px;border-radius:2px;white-space:pre}
.reading{background:#f8f8ff;border-left:4px solid #88a;padding:.1em 1em;line-height:1.45}
img{max-width:100%;border:1px solid #eee}.small{color:#666;font-size:.85em}
"""


def show_token(s: str) -> str:
    """A token made visible and HTML-safe: spaces as ␣, newlines and control characters escaped."""
    out = []
    for ch in s:
        if ch == " ":
            out.append("␣")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif not ch.isprintable():
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return html.escape("".join(out), quote=True)


def _tokens_html(items: list, lift: bool = False) -> str:
    cells = []
    for t in items:
        extra = f" {t['lift']:.1f}x ({t['count']})" if lift else f" {t['count']}"
        cells.append(f"<code>{show_token(t['token'])}</code><span class=small>{extra}</span>")
    return " ".join(cells) or "-"


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _kv_table(rows: list) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th class=l>{html.escape(k)}</th><td class=l>{html.escape(str(v))}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _steps_text(steps: Optional[int], target: Optional[int]) -> str:
    if steps is None:
        return f"unknown steps (target {target})"
    if target is not None and steps < target:
        return f"{steps:,} of {target:,} steps (stopped early; moekit train --resume continues)"
    return f"{steps:,} steps"


def _config_html(report: dict) -> str:
    c = report["config"]
    p = c["params"]
    rows = [
        ("run", report["run"]),
        ("model", f"{c['n_layers']} layers, width {c['dim']}, {c['n_heads']} heads, vocabulary {c['vocab_size']}"),
        ("MoE layers", ", ".join(map(str, c["moe_layers"]))),
        (
            "experts",
            f"{c['num_experts']} routed (hidden {c['expert_hidden_dim']})"
            + (f" + {c['num_shared_experts']} shared" if c["num_shared_experts"] else ""),
        ),
        ("top-k", f"{c['top_k']} (this report: {report['top_k']})"),
        ("router", c["router"]),
        ("capacity factor", capacity_text(c["router"], c["top_k"], c["capacity_factor"], c["eval_capacity_factor"])),
        ("parameters", f"{p['total']:,} total, {p['active']:,} active per token"),
        (
            "training",
            f"{_steps_text(c.get('steps'), c.get('target_steps'))}, {c['tokenizer']} tokenizer, "
            f"sequence length {c['seq_len']}, data {c['data']}",
        ),
    ]
    if c.get("val_loss"):
        rows.append(("validation loss", ", ".join(f"{k} {_fmt(v, '.4f')}" for k, v in c["val_loss"].items())))
    rows.append(
        ("sample", f"{report['tokens']:,} tokens = {report['windows']} validation windows x {report['seq_len']}")
    )
    rows.append(("base rate", ", ".join(f"{d} {100 * r:.1f}%" for d, r in report["base_rate"].items())))
    return _kv_table(rows)


def _summary_html(report: dict) -> str:
    head = (
        "<tr><th>layer</th><th>I(expert; domain) bits</th><th>H(domain) bits</th><th>normalised</th>"
        "<th>independence bias</th><th>normalised, given token</th><th>same, labels shuffled per "
        "token</th><th>excess</th><th>routing entropy (nats)</th>"
        "<th>entropy / max</th><th>empty slots</th><th class=l>dead</th><th class=l>overloaded (&gt; 2x mean)</th></tr>"
    )
    rows = []
    for layer in report["layers"]:
        mi, cond = layer["mi"], layer.get("mi_given_token") or {}
        rows.append(
            f"<tr><td>{layer['layer']}</td><td>{mi['mi_bits']:.4f}</td><td>{mi['domain_entropy_bits']:.4f}</td>"
            f"<td>{_fmt(mi['normalised'], '.3f')}</td><td>{mi['bias_bits']:.5f}</td>"
            f"<td>{_fmt(cond.get('normalised'), '.3f')}</td>"
            f"<td>{_fmt(cond.get('null_normalised'), '.3f')}</td><td>{_fmt(cond.get('excess'), '.3f')}</td>"
            f"<td>{_fmt(layer.get('routing_entropy_nats'), '.3f')}</td>"
            f"<td>{_fmt(layer.get('routing_entropy_normalised'), '.3f')}</td>"
            f"<td>{layer['empty_slots']}</td><td class=l>{', '.join(map(str, layer['dead'])) or '-'}</td>"
            f"<td class=l>{', '.join(map(str, layer['overloaded'])) or '-'}</td></tr>"
        )
    return "<table>" + head + "".join(rows) + "</table>"


def _layer_html(layer: dict, domains: list, focus: str) -> str:
    head = (
        "<tr><th>expert</th><th>tokens</th><th>share</th>"
        + "".join(f"<th>{html.escape(d)} %</th>" for d in domains)
        + "".join(f"<th>spec. {html.escape(d)}</th>" for d in domains)
        + "<th class=l>top tokens (count)</th>"
        f"<th class=l>top tokens by smoothed lift (count here, &ge; {layer.get('lift_min_count', 5)})</th></tr>"
    )
    rows = []
    for x in layer["experts"]:
        cls = "dead" if x["tokens"] == 0 else "over" if x["expert"] in layer["overloaded"] else ""
        s = x["specialisation"].get(focus)
        tint = ""
        if s is not None and s > 0 and len(domains) > 1:
            a = min(0.45, abs(math.log2(s)) / 2)
            tint = f' style="background:rgba({"214,96,77" if s > 1 else "67,147,195"},{a:.2f})"'
        rows.append(
            f"<tr class='{cls}'><td>{x['expert']}</td><td>{x['tokens']:,}</td><td>{100 * x['share']:.1f}%</td>"
            + "".join(
                f"<td>{_fmt(None if x['domain_share'][d] is None else 100 * x['domain_share'][d], '.1f')}</td>"
                for d in domains
            )
            + "".join(f"<td{tint if d == focus else ''}>{_fmt(x['specialisation'][d])}</td>" for d in domains)
            + f"<td class=l>{_tokens_html(x['top_tokens'])}</td><td "
            f"class=l>{_tokens_html(x['top_lift'], lift=True)}</td></tr>"
        )
    mi = layer["mi"]
    empty = f", {layer['empty_slots']:,} empty" if layer["empty_slots"] else ""
    cap = (
        f"<p class=small>{layer['routed_slots']:,} routed slots ({layer['tokens']:,} tokens x "
        f"{layer['slots_per_token']}{empty}); "
        f"I(expert; domain) = {mi['mi_bits']:.4f} bits, normalised {_fmt(mi['normalised'], '.3f')}; "
        f"specialisation = P(domain | expert) / P(domain), 1.00 = no preference; lift = the share of a token's "
        f"occurrences routed to the expert over the expert's share of all occurrences, smoothed with "
        f"{layer.get('lift_prior', 0):g} pseudo-occurrences at the expert's share so that rare tokens rank below "
        f"frequent ones with the same preference.</p>"
    )
    return f"<h3>layer {layer['layer']}</h3>{cap}<table>{head}{''.join(rows)}</table>"


def render_html(report: dict, images: dict) -> str:
    """The whole report as one self-contained HTML page (``images``: file name -> PNG bytes)."""

    def img(name: str, alt: str) -> str:
        data = base64.b64encode(images[name]).decode("ascii")
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

    domains, focus = report["domains"], focus_domain(report["domains"])
    title = f"Expert specialisation: {Path(report['run']).name}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<div class=reading>" + "".join(f"<p>{html.escape(par)}</p>" for par in report["reading"]) + "</div>",
        "<h2>Run</h2>",
        _config_html(report),
        "<h2>Layers</h2>",
        _summary_html(report),
        "<p class=small>I(expert; domain) is computed over routed slots; normalised = I / H(domain) (0 = routing "
        "ignores the domain, 1 = the expert determines it). The independence bias is what the estimate shows on "
        "average when there is no dependence. 'Given token' is I(expert; domain | token id) / H(domain | token id), "
        "Miller-Madow corrected: the domain information the routing has beyond the token itself; as the estimate is "
        "biased upwards by rare tokens, it is repeated with the domain labels shuffled among each token's occurrences, "
        "and the excess over that is the part to read.</p>",
        "<h2>Domain preference</h2>",
        img(DOMAIN_PNG, "domain heatmap"),
        "<h2>Load</h2>",
        img(LOAD_PNG, "load heatmap"),
        "<h2>Experts per layer</h2>",
    ]
    body += [_layer_html(layer, domains, focus) for layer in report["layers"]]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
