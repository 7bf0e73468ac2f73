"""The whole MoE LM against its dense twin, next to transformers' MoE/dense pair of the same shape.

Four models, random init, measured side by side in one process:

- moekit MoE: the default ``moekit train`` model (``moekit.train.run.default_model_config()``: 4 layers,
  width 128, 4 heads, vocab 4096; 16 SwiGLU experts of width 128, top-4, one shared expert of 128)
- moekit dense: its twin with the same active parameters per token (``LMConfig.dense_twin()``, FFN 640)
- transformers Qwen2-MoE (``Qwen2MoeForCausalLM``): hidden 128, 4 layers, 4 heads, vocab 4096,
  16 experts of width 128, top-4, normalised top-k, one shared expert of width 128 (with its
  sigmoid gate), router aux loss on (``output_router_logits``)
- transformers Qwen2 (``Qwen2ForCausalLM``): the same with a dense FFN of width 640

Measures (interleaved: in every repetition each model runs once, the starting model rotating,
so drift on a shared machine hits all alike; medians over the repetitions, after warm-up):

- train: one training step on a 16 x 128-token batch of random tokens (a few batches rotated):
  forward, loss (moekit: ``out.loss + out.aux_loss`` from ``model(x, y)``, as the trainer;
  transformers: ``model(input_ids, labels).loss``, which includes Qwen2-MoE's aux loss), backward,
  AdamW step (moekit's trainer settings, ``make_optimizer``, for all four), ``zero_grad``; moekit's
  models also run ``after_optimizer_step`` (the sigmoid router's bias update), as the trainer
  does. No gradient clipping (the trainer clips; it costs the same per parameter for all).
- decode: greedy generation with the KV cache from a short random prompt, eval mode, at each
  ``--batches`` size; tokens/s = batch x new tokens / time of the whole ``generate`` call
  (prefill of the prompt included). moekit: ``model.generate(ids, n, temperature=0)``;
  transformers: ``model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True)``.

``--compile`` adds rows for moekit's two models under torch.compile: ``torch.compile(model)`` for
the training step, ``generate(..., compile=True)`` (static KV cache, ``decode_step`` compiled)
for decoding; transformers' models stay eager; a model that fails to compile gets a FAIL row.

    PYTHONPATH=src python benchmarks/lm_speed.py                       # 1 thread, train and decode
    PYTHONPATH=src python benchmarks/lm_speed.py --reps 2 --warmup 1 --new-tokens 8    # smoke run
    (add --markdown PATH to append the tables, with date, device, versions and command, to PATH)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

import moekit
from moekit.config import TrainConfig
from moekit.layer import after_optimizer_step
from moekit.models import MoETransformer
from moekit.train.run import default_model_config
from moekit.train.trainer import make_optimizer
from report import cpu_name, emit, write_markdown_to  # benchmarks/report.py


# ----------------------------------------------------------------------------- models
@dataclass
class Entry:
    label: str
    family: str  # "moekit" or "transformers"
    kind: str  # "moe" or "dense"
    model: torch.nn.Module
    total: int  # parameters (tied embeddings counted once)
    active: int  # parameters per token (routed experts counted at K/E)
    step: Optional[Callable[[torch.Tensor], float]] = None  # one training step on a (B, S+1) batch; returns the loss
    decode: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None  # greedy ids (B, P + n)
    results: dict = field(default_factory=dict)  # measure -> tokens/s or "FAIL: ..."
    last_loss: float = float("nan")


def moekit_models() -> tuple[Entry, Entry]:
    cfg = default_model_config()
    out = []
    for kind, c in (("moe", cfg), ("dense", cfg.dense_twin())):
        model = MoETransformer(c)
        counts = model.param_counts()
        out.append(
            Entry(
                f"moekit {'MoE' if kind == 'moe' else 'dense twin'}",
                "moekit",
                kind,
                model,
                counts["total"],
                counts["active"],
            )
        )
    return tuple(out)


def transformers_models(experts_impl: Optional[str]):
    """(Qwen2-MoE, Qwen2) of moekit's default shape, or (None, why) when transformers is missing."""
    try:
        import transformers
        from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
    except Exception as err:  # noqa: BLE001 - optional peer
        return None, f"transformers not importable ({type(err).__name__}: {err})"
    transformers.logging.set_verbosity_error()
    m = default_model_config()
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads or m.n_heads,
        max_position_embeddings=m.max_seq_len,
        tie_word_embeddings=m.tie_embeddings,
        rms_norm_eps=m.norm_eps,
        attn_implementation="sdpa",
    )
    e = m.moe
    moe_cfg = Qwen2MoeConfig(
        **common,
        num_experts=e.num_experts,
        num_experts_per_tok=e.top_k,
        moe_intermediate_size=e.hidden_dim,
        shared_expert_intermediate_size=e.num_shared_experts * (e.shared_hidden_dim or e.hidden_dim),
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        intermediate_size=m.dense_twin().ffn_hidden_dim,
        output_router_logits=True,
    )
    dense_cfg = Qwen2Config(**common, intermediate_size=m.dense_twin().ffn_hidden_dim)
    torch.manual_seed(0)
    moe = Qwen2MoeForCausalLM(moe_cfg)
    if experts_impl:
        moe.set_experts_implementation(experts_impl)
    dense = Qwen2ForCausalLM(dense_cfg)
    entries = []
    for kind, model in (("moe", moe), ("dense", dense)):
        with torch.no_grad():  # moekit's init (std 0.02), so no tensor is left as torch.empty
            for name, p in model.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, m.init_std)
        total = sum(p.numel() for p in model.parameters())
        routed = 0
        if kind == "moe":
            for layer in model.model.layers:
                routed += sum(p.numel() for p in layer.mlp.experts.parameters())
        active = int(total - routed * (1 - e.top_k / e.num_experts))
        impl = ""
        if kind == "moe":
            impl = f", {model.get_experts_implementation()[''] or 'default'} experts"
        entries.append(
            Entry(
                f"transformers {'Qwen2-MoE' if kind == 'moe' else 'Qwen2 (dense twin)'}{impl}",
                "transformers",
                kind,
                model,
                total,
                active,
            )
        )
    return tuple(entries), None


def attach_steps(e: Entry, compiled: bool = False) -> None:
    """Give ``e`` its training step (AdamW with the trainer's settings) and its greedy decode."""
    model = e.model
    opt = make_optimizer(model, TrainConfig())
    if e.family == "moekit":
        fwd = torch.compile(model) if compiled else model

        def step(batch):
            out = fwd(batch[:, :-1], batch[:, 1:])
            loss = out.loss + out.aux_loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            after_optimizer_step(model)
            return loss.detach()

        def decode(ids, n):
            return model.generate(ids, n, temperature=0, compile=compiled)
    else:

        def step(batch):
            ids = batch[:, :-1]
            loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        def decode(ids, n):
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                use_cache=True,
                pad_token_id=0,
            )

    e.step, e.decode = step, decode


# ----------------------------------------------------------------------------- timing
def interleaved(entries: list, fn: Callable[[Entry, int], None], reps: int, warmup: int) -> dict:
    """Seconds per call, median over ``reps`` rounds in which every entry runs once (the first
    entry of a round rotating), after ``warmup`` such rounds. An entry that raises is dropped
    and gets ``"FAIL: ..."`` instead of a time."""
    live = list(entries)
    times = {e.label: [] for e in entries}
    failed = {}
    for r in range(warmup + reps):
        k = r % len(live) if live else 0
        for e in live[k:] + live[:k]:
            try:
                t0 = time.perf_counter()
                fn(e, r)
                dt = time.perf_counter() - t0
            except Exception as err:  # noqa: BLE001 - a failing model gets a FAIL cell, never a time
                failed[e.label] = f"FAIL: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
                continue
            if r >= warmup:
                times[e.label].append(dt)
        live = [e for e in live if e.label not in failed]
    return {e.label: failed.get(e.label) or statistics.median(times[e.label]) for e in entries}


def measure_train(entries: list, args) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, default_model_config().vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(4)
    ]
    for e in entries:
        e.model.train()

    def run(e, r):
        e.last_loss = float(e.step(batches[r % len(batches)]))

    tokens = args.batch * args.seq
    for label, t in interleaved(entries, run, args.reps, args.warmup).items():
        e = next(x for x in entries if x.label == label)
        if not isinstance(t, str) and not math.isfinite(e.last_loss):
            t = f"FAIL: loss {e.last_loss} after {args.warmup + args.reps} steps"
        e.results["train"] = t if isinstance(t, str) else tokens / t
        e.results["train_ms"] = None if isinstance(t, str) else t * 1e3


def measure_decode(entries: list, args, batch: int) -> None:
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, default_model_config().vocab_size, (batch, args.prompt_len), generator=g)
    for e in entries:
        e.model.eval()

    def run(e, r):
        with torch.no_grad():
            out = e.decode(prompt, args.new_tokens)
        if tuple(out.shape) != (batch, args.prompt_len + args.new_tokens):
            raise RuntimeError(
                f"generated shape {tuple(out.shape)}, expected {(batch, args.prompt_len + args.new_tokens)}"
            )

    for label, t in interleaved(entries, run, args.reps, args.warmup).items():
        e = next(x for x in entries if x.label == label)
        e.results[f"decode{batch}"] = t if isinstance(t, str) else batch * args.new_tokens / t


# ----------------------------------------------------------------------------- tables
def fmt_rate(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v / 1e3:.2f} k" if v >= 1e4 else f"{v:.0f}"


def ratio(a, b) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return f"{a / b:.2f}"
    return "-"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--reps", type=int, default=7, help="timed rounds (every model once per round)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--what", default="train,decode", help="comma list: train, decode")
    ap.add_argument("--batch", type=int, default=16, help="training sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="training tokens per sequence")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes (comma list)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--prompt-len", type=int, default=8, help="random prompt tokens before decoding")
    ap.add_argument(
        "--compile", action="store_true", help="also time moekit's models under torch.compile (training and decoding)"
    )
    ap.add_argument(
        "--hf-experts",
        default=None,
        help="transformers' experts implementation for Qwen2-MoE (eager, grouped_mm, ...; default: transformers')",
    )
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers pair")
    ap.add_argument("--markdown", default=None, help="append the tables (with date, device, versions, command) here")
    args = ap.parse_args(argv)
    what = [w for w in args.what.split(",") if w]
    unknown = set(what) - {"train", "decode"}
    if unknown or not what:
        ap.error(f"--what takes a comma list of train, decode; got {args.what!r}")
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        ap.error(f"--batches takes a comma list of positive integers; got {args.batches!r}")
    for name in ("threads", "reps", "batch", "seq", "new_tokens", "prompt_len"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if args.warmup < 0 or not batches or min(batches) <= 0:
        ap.error("--warmup must be >= 0 and --batches positive integers")
    max_len = default_model_config().max_seq_len
    if args.seq + 1 > max_len or args.prompt_len + args.new_tokens > max_len:
        ap.error(f"--seq + 1 and --prompt-len + --new-tokens must fit the model's context ({max_len})")
    torch.set_num_threads(args.threads)
    write_markdown_to(args.markdown)

    entries = list(moekit_models())
    hf_note = None
    if not args.no_transformers:
        hf, hf_note = transformers_models(args.hf_experts)
        if hf is not None:
            entries += list(hf)
    for e in entries:
        attach_steps(e)
    compiled = []
    if args.compile:
        for e in entries[:2]:
            c = Entry(e.label + " (torch.compile)", e.family, e.kind, copy.deepcopy(e.model), e.total, e.active)
            attach_steps(c, compiled=True)
            compiled.append(c)

    versions = [f"torch {torch.__version__}"]
    try:
        import transformers

        versions.append(f"transformers {transformers.__version__}")
    except Exception:  # noqa: BLE001
        versions.append("transformers not installed")
    versions.append(f"moekit {moekit.__version__}")
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    emit()
    emit(f"### {datetime.date.today()} | {cpu_name()}, {torch.get_num_threads()} thread(s) | {' | '.join(versions)}")
    emit()
    emit(f"command: `python benchmarks/lm_speed.py {cmd}`")
    emit()
    setup = []
    if "train" in what:
        setup.append(f"training step {args.batch} x {args.seq} tokens (AdamW)")
    if "decode" in what:
        setup.append(
            f"decode: greedy, KV cache, {args.prompt_len}-token prompt, {args.new_tokens} new tokens per "
            "sequence, tokens/s counts every sequence of the batch"
        )
    emit(f"median of {args.reps} interleaved rounds after {args.warmup} warm-up round(s); " + "; ".join(setup))
    if hf_note:
        emit()
        emit(f"transformers rows skipped: {hf_note}")

    t_start = time.perf_counter()
    if "train" in what:
        measure_train(entries + compiled, args)
        gc.collect()
    if "decode" in what:
        for b in batches:
            measure_decode(entries + compiled, args, b)
            gc.collect()

    cols = (["train"] if "train" in what else []) + ([f"decode{b}" for b in batches] if "decode" in what else [])
    names = {"train": "train tokens/s"} | {f"decode{b}": f"decode batch {b} tokens/s" for b in batches}
    emit()
    emit(
        "| model | params total | active / token | "
        + " | ".join((["train ms / step"] if "train" in what else []) + [names[c] for c in cols])
        + " |"
    )
    emit("|---|---|---|" + "---|" * (len(cols) + ("train" in what)))
    for e in entries + compiled:
        ms = e.results.get("train_ms")
        cells = [f"{ms:.1f}" if ms is not None else "-"] if "train" in what else []
        cells += [fmt_rate(e.results.get(c)) for c in cols]
        emit(f"| {e.label} | {e.total / 1e6:.2f} M | {e.active / 1e6:.2f} M | " + " | ".join(cells) + " |")

    by = {(e.family, e.kind): e for e in entries}
    pairs = [
        ("moekit MoE / moekit dense", ("moekit", "moe"), ("moekit", "dense")),
        ("transformers MoE / transformers dense", ("transformers", "moe"), ("transformers", "dense")),
        ("moekit MoE / transformers MoE", ("moekit", "moe"), ("transformers", "moe")),
        ("moekit dense / transformers dense", ("moekit", "dense"), ("transformers", "dense")),
    ]
    emit()
    emit(
        "speed ratios (higher = the first is faster; MoE / dense of 1.0 = the MoE costs what its active parameters "
        "cost)"
    )
    emit()
    emit("| ratio | " + " | ".join(names[c] for c in cols) + " |")
    emit("|---|" + "---|" * len(cols))
    for label, a, b in pairs:
        if a in by and b in by:
            emit(f"| {label} | " + " | ".join(ratio(by[a].results.get(c), by[b].results.get(c)) for c in cols) + " |")
    if compiled:
        cm, cd = compiled
        emit(
            "| moekit MoE / moekit dense, both torch.compile | "
            + " | ".join(ratio(cm.results.get(c), cd.results.get(c)) for c in cols)
            + " |"
        )
        emit(
            "| moekit MoE torch.compile / transformers MoE | "
            + " | ".join(
                ratio(cm.results.get(c), by[("transformers", "moe")].results.get(c))
                if ("transformers", "moe") in by
                else "-"
                for c in cols
            )
            + " |"
        )
        for c_e, e in zip(compiled, entries[:2]):
            emit(
                f"| {e.label}: torch.compile / eager | "
                + " | ".join(ratio(c_e.results.get(c), e.results.get(c)) for c in cols)
                + " |"
            )
    print(f"\n({time.perf_counter() - t_start:.0f} s of measurement)", file=sys.stderr)


if __name__ == "__main__":
    main()
